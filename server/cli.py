"""The `vmcast` command: the root typer app (`serve`, `stream ...`, and the receiver's `receive`).

`main()` is the console script. Every failure a user can cause ends with a one-line message on stderr and a
non-zero exit status, never a traceback: 1 for a server or network problem, 2 for bad options.

Imports: the console script loads this module for every subcommand, so it imports at the top only what
building the commands needs. What one command alone uses is imported inside it: the API client and its
models (they load the stream registry, the sender and sqlite3), the settings (pydantic-settings), rich,
uvicorn; ~0.1 s of the ~0.45 s that ``vmcast receive`` took to start. That is the command that counts: every
receiver pays its start-up before it asks for a lease, and the stream (and its clock) starts then. For the
same reason the commands that live in the receiver's package, ``receive`` and ``register``, are imported
(and built) only when the command line names them, or lists them (``vmcast --help``): ``vmcast receive``
does not load the registration code, nor ``vmcast serve`` the receiver (`_RootGroup`).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import socket
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
import typer.main
from typer.core import TyperGroup

from .defaults import DEFAULT_MAX_WAIT, DEFAULT_SERVER, MAX_PAYLOAD, START_TIMEOUT
from .errors import ClientError, ServerError
from .rates import format_rate

if TYPE_CHECKING:
    from rich.console import Console

# The commands defined in other modules, by name, in the order `vmcast --help` lists them (before this module's):
# imported when first used, see "Imports" above.
_COMMANDS_ELSEWHERE = {
    "receive": "vmcast.receiver.cli:receive",
    "register": "vmcast.receiver.registration.cli:register",
}


class _Commands(MutableMapping[str, Any]):
    """A group's commands by name, where a command given as ``"module:function"`` is imported and built the
    first time it is looked up (to run it, to list it in ``--help``, to complete it); its name is known
    before, so ``vmcast recieve`` still suggests ``receive`` without importing it."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> Any:
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = self._entries[name] = _build_command(name, entry)
        return entry

    def __setitem__(self, name: str, command: Any) -> None:
        self._entries[name] = command

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _build_command(name: str, where: str) -> Any:
    """The click command of the function at ``"module:function"``, built as the root app builds its own."""
    module, function = where.split(":")
    single = typer.Typer(
        add_completion=False, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode
    )
    single.command(name)(getattr(importlib.import_module(module), function))
    return typer.main.get_command(single)


class _RootGroup(TyperGroup):
    """The ``vmcast`` group: this module's commands, and those of `_COMMANDS_ELSEWHERE`, loaded when used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands({**_COMMANDS_ELSEWHERE, **self.commands})


app = typer.Typer(
    name="vmcast",
    help=(
        "Deliver the same disk image to many machines at once over UDP multicast, and prove every copy correct.\n\n"
        "A server ([bold]vmcast serve[/]) offers the images of a directory and streams each in a loop to its own "
        "multicast group; [bold]vmcast stream start[/] asks it for a stream and prints the group, port and cookie "
        "that receivers ([bold]vmcast receive[/]) join."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_RootGroup,
)
stream_app = typer.Typer(
    help="Start, list and stop streams on a running [bold]vmcast serve[/] (over its HTTP API).",
    no_args_is_help=True,
)
app.add_typer(stream_app, name="stream")


def _err() -> Console:
    # Made when used (not at import), so the width follows the terminal and COLUMNS of the moment. Messages are
    # not wrapped (soft_wrap): a log or a pipe keeps each on one line; tables still fit the width.
    from rich.console import Console  # here: see "Imports" above

    return Console(stderr=True, soft_wrap=True)


def _out() -> Console:
    from rich.console import Console

    return Console(soft_wrap=True)


def escape(text: str) -> str:
    """`rich.markup.escape`, imported when first needed (see "Imports" above)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# Settings field -> the option that sets it, to name options in error messages.
_OPTION_OF = {
    "images_dir": "--images",
    "host": "--host",
    "port": "--port",
    "interface": "--interface",
    "group_range": "--group-range",
    "mcast_port": "--mcast-port",
    "rate": "--rate",
    "payload": "--payload",
    "ttl": "--ttl",
    "gso": "--gso",
    "fec": "--fec",
    "cache_dir": "--cache-dir",
    "qemu_img": "--qemu-img",
    "repair_port": "--repair-port",
    "repair_rate": "--repair-rate",
    "lease_ttl": "--lease-ttl",
    "state_db": "--state-db",
}


def _fail(message: str, *, status: int = 1) -> NoReturn:
    _err().print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(status)


# -- vmcast serve ------------------------------------------------------------------------------------------------


@app.command()
def serve(
    images: Annotated[
        Path,
        typer.Option(
            "--images",
            help="Directory of the images to serve. An image's name is its file name; raw, qcow2 and the other formats qemu-img reads are detected.",
            show_default=False,
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address the HTTP API listens on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port of the HTTP API.")] = 8470,
    interface: Annotated[
        str,
        typer.Option(
            help="Where multicast leaves this machine: one of its IPv4 addresses, or an interface name such as eth0. The default keeps streams on this machine."
        ),
    ] = "127.0.0.1",
    group_range: Annotated[
        str, typer.Option(help="IPv4 multicast range (CIDR) the streams' groups are taken from, one group per stream.")
    ] = "239.255.0.0/16",
    mcast_port: Annotated[int, typer.Option(help="UDP destination port of every stream.")] = 8471,
    rate: Annotated[
        str,
        typer.Option(
            help="Send rate of each stream, in bits per second with IP/UDP headers counted: 1gbit, 300mbit, 500k, 2.5g, or 0 for unpaced."
        ),
    ] = "1gbit",
    payload: Annotated[
        int,
        typer.Option(
            help=f"Image bytes per datagram, 1 to {MAX_PAYLOAD}. Up to 1456 fits a 1500-byte Ethernet MTU; more needs jumbo frames."
        ),
    ] = 1400,
    ttl: Annotated[int, typer.Option(help="IP multicast TTL (hops): 1 stays on the local network segment.")] = 1,
    gso: Annotated[
        bool,
        typer.Option(
            "--gso/--no-gso",
            help="Hand the kernel up to 64 data datagrams per system call (UDP GSO, Linux 4.18+): the same datagrams on the wire for much less sender CPU. Falls back to one per call by itself where the kernel or route refuses it.",
        ),
    ] = True,
    fec: Annotated[
        bool,
        typer.Option(
            "--fec/--no-fec",
            envvar="VMCAST_FEC",
            help="Repair losses with RaptorQ parity where --payload is a multiple of 8 (the default): one parity frame repairs any one lost frame of a block at every receiver, so the sender resends about the worst receiver's loss rather than the sum of all receivers' losses. Test bed, 4 receivers, 1 GiB, 300 Mbit/s, 5% loss: 32.3-33.8 s with parity (6.2-7.2% of the image resent as parity), 36.6-37.4 s resending frames (19.8%); 10,000 simulated receivers at 1%: 2.9% resent instead of 194%. It costs CPU only where frames are lost: 2.6-6 ms on the sender per 1 MiB block asked for, 3-6 ms on a receiver per block it recovers (~5 CPU-s per GiB at 1-5% loss); a receiver whose socket keeps overflowing (short of CPU) asks for the blocks it loses wholesale as frames while it does. --no-fec always resends the lost frames themselves.",
        ),
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where conversions of images (qcow2 to raw, raw to qcow2...) and manifests are cached.  \\[default: ~/.cache/vmcast]",
            show_default=False,
        ),
    ] = None,
    qemu_img: Annotated[str, typer.Option(help="The qemu-img executable.")] = "qemu-img",
    repair_port: Annotated[
        int | None,
        typer.Option(
            help="UDP port, on --host, where receivers send repair requests for lost frames (UDP and TCP ports are separate, so the same number as --port is free).  \\[default: the number of --port]",
            show_default=False,
        ),
    ] = None,
    repair_rate: Annotated[
        str,
        typer.Option(
            help="Cap shared by all HTTP range downloads (GET /v1/streams/ID/data, the unicast fallback), in bits per second like --rate; 0 for unlimited. Keeps repairs from starving multicast."
        ),
    ] = "200mbit",
    lease_ttl: Annotated[
        float,
        typer.Option(
            help="Seconds a lease lives unless renewed (POST /v1/leases/ID/renew); a stream whose leases all expire stops."
        ),
    ] = 30.0,
    state_db: Annotated[
        Path | None,
        typer.Option(
            help="SQLite database of running streams and leases: after a restart, even after kill -9, streams resume on the same group, port and cookie.  \\[default: CACHE-DIR/state.sqlite3]",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning or error.")] = "info",
) -> None:
    """Serve the images of a directory over HTTP and stream them over multicast on request.

    Each stream loops over its image at --rate until the last lease on it is released or expires (--lease-ttl).
    A qcow2 image is offered as qcow2 and as raw; its raw form is made once with qemu-img and cached in
    --cache-dir. Receivers ask for lost frames by UDP on --repair-port (resent over multicast) or fetch them by
    HTTP Range (capped by --repair-rate). Streams and leases are kept in --state-db and survive a restart.
    API documentation: http://HOST:PORT/docs; Prometheus metrics: http://HOST:PORT/metrics.

    [bold]Example[/] (one machine; add --interface 192.0.2.10 to reach a LAN):

        vmcast serve --images /srv/images --rate 300mbit
    """
    # Here, like everything only `serve` needs: see "Imports" above.
    from pydantic import ValidationError

    from .settings import Settings, payload_warning

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {
        "images_dir": images, "host": host, "port": port, "interface": interface, "group_range": group_range,
        "mcast_port": mcast_port, "rate": rate, "payload": payload, "ttl": ttl, "gso": gso, "fec": fec, "qemu_img": qemu_img,
        "repair_port": repair_port, "repair_rate": repair_rate, "lease_ttl": lease_ttl, "state_db": state_db,
    }  # fmt: skip
    if cache_dir is not None:
        options["cache_dir"] = cache_dir
    try:
        settings = Settings(**options)
    except ValidationError as error:
        for problem in error.errors():
            option = _OPTION_OF.get(str(problem["loc"][0]), str(problem["loc"][0])) if problem["loc"] else "options"
            _err().print(f"[bold red]error:[/] {option}: {escape(problem['msg'].removeprefix('Value error, '))}")
        raise typer.Exit(2) from None
    warning = payload_warning(settings.payload)
    if warning:
        _err().print(f"[bold yellow]warning:[/] --payload: {escape(warning)}")

    import uvicorn

    from .app import check_settings, create_app, start_services
    from .repair_listener import bind_repair_socket

    # Fail here, with the message alone, rather than in uvicorn's startup: first what holds nothing, then the
    # ports, then what is held exclusively (the state database).
    try:
        check_settings(settings)
    except ServerError as error:
        _fail(str(error), status=2)
    listener = _listen(settings.host, settings.port)
    bound_port = listener.getsockname()[1]
    repair_socket = None
    try:
        repair_socket = bind_repair_socket(settings.host, settings.resolved_repair_port(bound_port))
        services = start_services(settings, repair_socket=repair_socket)
    except ServerError as error:
        listener.close()
        if repair_socket is not None:
            repair_socket.close()
        _fail(str(error), status=2)
    url = f"http://{settings.host}:{bound_port}"
    _err().print(
        f"vmcast serving {escape(str(settings.images_dir))} at {url} (API docs: {url}/docs); streams to "
        f"{settings.group_range} port {settings.mcast_port} by {escape(settings.interface)} at "
        f"{format_rate(settings.rate)}; repair requests on UDP port {services.repair_listener.port}"
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, services=services), log_level=log_level.lower(), access_log=False)
    )
    server.run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """The HTTP API's listening socket, bound here so that a taken port is a clear message (and no race)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        _fail(f"--host: cannot resolve {host!r}: {error.strerror}", status=2)
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == 98:  # EADDRINUSE
            _fail(
                f"--port: port {port} on {host} is already in use (another vmcast serve?); choose another with --port",
                status=2,
            )
        _fail(f"--host/--port: cannot listen on {host}:{port}: {error.strerror}", status=2)
    listener.listen(2048)
    return listener


# -- vmcast stream ...  --------------------------------------------------------------------------------------------

ServerOption = Annotated[
    str,
    typer.Option("--server", envvar="VMCAST_SERVER", help="URL of the vmcast server's HTTP API."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON instead of a table.")]


@stream_app.command("start")
def stream_start(
    image: Annotated[
        str, typer.Argument(help="Image name, as the server lists it (its file name).", show_default=False)
    ],
    format: Annotated[
        str, typer.Option("--format", help="Format to stream the image in: the image's own, raw or qcow2 (converted once).")
    ] = "raw",
    server: ServerOption = DEFAULT_SERVER,
    json_output: JsonOption = False,
    timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for the server; the first start of a large image in another format converts it first."),
    ] = START_TIMEOUT,
    min_receivers: Annotated[
        int | None,
        typer.Option(min=1, help="If this starts the stream: send only metadata until this many receivers have joined its group (vmcast receive says so), then start at the image's first frame. Your own lease does not count.", show_default=False),
    ] = None,
    max_wait: Annotated[
        float, typer.Option(min=0.001, help="With --min-receivers: start anyway after this many seconds.")
    ] = DEFAULT_MAX_WAIT,
) -> None:
    """Start the stream of an image, or join it if it runs, and print its lease, group, port and cookie.

    Starting an image that already streams in that format shares the stream; each start returns its own lease,
    and the stream stops when every lease is released ([bold]vmcast stream stop[/]).

    With [bold]--min-receivers N[/] a new stream holds until N receivers are listening (like udp-sender's
    --min-receivers), so that receivers started together need one loop of the image between them.

    Receivers started before it with [bold]vmcast receive --wait-for-stream SECONDS[/] join it the moment it starts.

    [bold]Example:[/]

        vmcast stream start debian-12.qcow2 --format raw --server http://10.0.0.5:8470
        vmcast stream start debian-12.qcow2 --min-receivers 40 --max-wait 120
    """
    from rich.table import Table

    from .client import ServerClient  # here: see "Imports" above

    try:
        with ServerClient(server, start_timeout=timeout) as client:
            started = client.start_stream(image, format, min_receivers=min_receivers, max_wait=max_wait)
    except ClientError as error:
        _fail(str(error))
    if json_output:
        _out().print_json(started.model_dump_json(by_alias=True))
        return
    table = Table(title=f"stream of {escape(started.image)} ({started.format})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in (
        ("lease", started.lease_id),
        ("stream", started.stream_id),
        ("group", f"{started.group}:{started.port}"),
        ("cookie", started.cookie),
        ("size", f"{started.length:,} bytes"),
        ("sha1", started.sha1),
        ("frame size", f"{started.frame_size} bytes"),
        *([("holding for", f"{started.waiting_for} more receiver(s)")] if started.waiting_for else []),
    ):
        table.add_row(name, escape(value))
    _out().print(table)
    _out().print(f"Stop with: vmcast stream stop {started.lease_id} --server {escape(server)}")


@stream_app.command("stop")
def stream_stop(
    lease_id: Annotated[str, typer.Argument(help="The lease that `vmcast stream start` printed.", show_default=False)],
    server: ServerOption = DEFAULT_SERVER,
    json_output: JsonOption = False,
) -> None:
    """Release a lease; the stream stops when its last lease is released.

    Safe to repeat: releasing a lease again changes nothing and says so.

    [bold]Example:[/]

        vmcast stream stop 0b6f8f9e-2c1d-4c55-9a4e-4f7f0a9d1e2b --server http://10.0.0.5:8470
    """
    from .client import ServerClient

    try:
        with ServerClient(server) as client:
            released = client.release(lease_id)
    except ClientError as error:
        _fail(str(error))
    if json_output:
        _out().print_json(released.model_dump_json())
        return
    _out().print(escape(released.detail))


@stream_app.command("list")
def stream_list(server: ServerOption = DEFAULT_SERVER, json_output: JsonOption = False) -> None:
    """List the running streams with their counters.

    [bold]Example:[/]

        vmcast stream list --server http://10.0.0.5:8470
    """
    from rich.table import Table

    from .client import ServerClient

    try:
        with ServerClient(server) as client:
            streams = client.streams()
    except ClientError as error:
        _fail(str(error))
    if json_output:
        _out().print_json(data=[stream.model_dump(mode="json", by_alias=True) for stream in streams])
        return
    if not streams:
        _out().print("no streams running")
        return
    # Every stream of a server has the same configured rate: it goes in the title, not in a column.
    rates = {format_rate(stream.rate_bps) for stream in streams}
    table = Table(title=f"streams on {escape(server)}, each at {', '.join(sorted(rates))}")
    right = {"refs", "loops", "sent", "measured"}
    for column in ("stream", "image", "format", "group:port", "cookie", "refs", "loops", "sent", "measured", "state"):
        # What a receiver needs (group, cookie) is never cut; other columns fold rather than lose characters.
        table.add_column(
            column,
            justify="right" if column in right else "left",
            no_wrap=column in {"group:port", "cookie"},
            overflow="fold",
        )
    for stream in streams:
        table.add_row(
            stream.stream_id[:8],
            escape(stream.image),
            stream.format,
            f"{stream.group}:{stream.port}",
            stream.cookie,
            str(stream.references),
            str(stream.loops_completed),
            _bytes(stream.bytes_sent),
            format_rate(stream.measured_bps, zero="0"),
            f"holding ({stream.waiting_for} to come)" if stream.waiting_for else "resting" if stream.resting else stream.state,
        )
    _out().print(table)


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


@app.command()
def demo(
    rate: Annotated[str, typer.Option(help="Sender rate, bits per second on the wire (e.g. 300mbit, 1gbit; 0 = unpaced).")] = "1gbit",
    receivers: Annotated[int, typer.Option(min=1, max=16, help="Receiver processes; the last one joins mid-loop.")] = 3,
    workdir: Annotated[Path | None, typer.Option(help="Keep images, copies and logs here (default: a temporary directory, removed after).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the temporary directory.")] = False,
) -> None:
    """A real distribution on this machine: vmcast serve plus receivers over loopback multicast.

    Generates a 128 MiB qcow2 image (96 MiB random, 32 MiB zeros), serves it, and starts receivers that ask for
    it as raw (the server converts it once with qemu-img); the last receiver joins while the first loop is
    under way. Prints each receiver's verified SHA-1 and throughput, checked against qemu-img run independently.
    Exit status 0 only if every receiver holds a verified, identical copy.

    Example: vmcast demo --rate 2gbit --receivers 4
    """
    from .demo import run_demo

    raise typer.Exit(run_demo(workdir=workdir, rate=rate, receivers=receivers, keep=keep))


def main() -> None:
    """The `vmcast` console script.

    Once a command has returned its exit status, everything it does is done: output flushed, a receive's
    target synced and its state saved, the server's streams stopped. The interpreter would then tear down
    every module and object, ~75 ms for a receive (which a deployment waiting for forty receivers started
    together pays on every one); so the exit handlers run (logging's, thread pools', multiprocessing's) and
    the process ends with the status, without that teardown. An exception the command did not handle goes
    the usual way, traceback and all.
    """
    try:
        app()
    except SystemExit as done:
        status = done.code
    else:
        status = 0
    if isinstance(status, str):  # SystemExit("message") prints it and exits 1
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): what it could not take is lost either way
            pass
    os._exit(status or 0)


if __name__ == "__main__":
    main()
