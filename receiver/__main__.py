"""``python -m vmcast.receiver``: the ``receive`` command on its own (``vmcast receive`` is the same command)."""

import typer

from .cli import receive

app = typer.Typer(add_completion=False)
app.command("receive")(receive)

if __name__ == "__main__":
    app()
