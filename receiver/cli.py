"""``vmcast receive``: receive one image from a multicast stream, verify it, and say so.

The command is the plain function `receive`, which the root typer app registers
(``app.command("receive")(receive)``); ``python -m vmcast.receiver`` runs it on its own.

Exit codes (also in ``--help``; defined in `vmcast.receiver.errors`):

* 0: verified: every block and the whole-image SHA-1 matched, and the target was synced
* 1: unexpected error (including an I/O error on the target)
* 2: usage error
* 3: target refused before a byte was written (too small, mounted, in use, cannot be inspected)
* 4: verification failed for good, or the stream failed (the image changed under us)
* 5: server unreachable, or it answered with an error (unknown image, unknown format)
* 6: no datagram of the stream within --timeout seconds
* 130: interrupted (SIGINT, SIGTERM); the lease is released all the same

Output: progress and log lines on stderr; on success one line on stdout,
``verified sha1=<hex> bytes=<n> seconds=<s> rate=<MB/s> ...``, or with ``--json`` one JSON object (also on
failure: ``{"verified": false, "exit_code": ..., "error": ...}``).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
import sys
import traceback
from typing import Annotated

import httpx
import trio
import typer

from .agent import FromGroup, FromServer, ReceiveRequest, ReceiveResult
from .agent import receive as receive_image
from .errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, EXIT_VERIFIED, ReceiveError
from .multicast import is_multicast

DEFAULT_FORMAT = "raw"

def receive(
    output: Annotated[str, typer.Option("--output", "-o", help="File or block device to write (a file is created, sized to the image).", show_default=False)],
    image: Annotated[str | None, typer.Argument(help="Image name on the server (needs --server).", show_default=False)] = None,
    server: Annotated[str | None, typer.Option(help="vmcast server URL, e.g. http://127.0.0.1:8470.", show_default=False)] = None,
    image_format: Annotated[str | None, typer.Option("--format", help=f"Format to stream the image in, with a server (default: {DEFAULT_FORMAT}).", show_default=False)] = None,
    group: Annotated[str | None, typer.Option(help="Multicast group to join, without a server.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="UDP port, without a server.", show_default=False)] = None,
    cookie: Annotated[str | None, typer.Option(help="The stream's cookie, 16 hex digits, without a server.", show_default=False)] = None,
    interface: Annotated[str | None, typer.Option(help="Local IPv4 address to join on (default: the one the kernel routes to the server, or to the group, through).", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Give up after this many seconds without a datagram of the stream.")] = 30.0,
    force: Annotated[bool, typer.Option("--force", help="Write a block device that is in use, or overwrite a non-empty file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (or the error) as one JSON object on stdout.")] = False,
) -> None:
    """Receive an image from a multicast stream into a file or block device, and verify it.

    With a server: vmcast receive IMAGE --server URL --output PATH (takes a lease, releases it on exit).
    Without one: vmcast receive --group G --port P --cookie HEX --output PATH.

    \b
    Exit codes:
      0    verified (every block and the image SHA-1 matched; target synced)
      1    unexpected error (including an I/O error on the target)
      2    usage error
      3    target refused (too small, mounted, in use, cannot be inspected); nothing written
      4    verification failed for good, or the stream failed (the image changed)
      5    server unreachable, or an API error (unknown image or format)
      6    no datagram of the stream within --timeout seconds
      130  interrupted (SIGINT/SIGTERM); the lease is still released
    """
    request = _request(output=output, image=image, server=server, image_format=image_format, group=group, port=port, cookie=cookie, interface=interface, timeout=timeout, force=force)
    code = run(request, as_json=as_json)
    if code != EXIT_VERIFIED:
        raise typer.Exit(code)


def run(request: ReceiveRequest, *, as_json: bool) -> int:
    """Run a receive to its end, print the outcome, and return the exit code."""
    handler = _StderrHandler()
    logger = logging.getLogger("vmcast.receiver")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = trio.run(functools.partial(receive_image, request, progress=sys.stderr, interactive=sys.stderr.isatty()))
    except ReceiveError as error:
        return _failed(error.exit_code, error, as_json=as_json)
    except KeyboardInterrupt as error:  # before the signal watcher is installed, or a second Ctrl-C
        return _failed(EXIT_INTERRUPTED, error, as_json=as_json)
    except BaseExceptionGroup as group:  # from the nursery: a bug, or a second Ctrl-C during the cleanup
        if group.subgroup(KeyboardInterrupt) is not None:
            return _failed(EXIT_INTERRUPTED, KeyboardInterrupt(), as_json=as_json)
        traceback.print_exception(group, file=sys.stderr)
        return _failed(EXIT_UNEXPECTED, group, as_json=as_json)
    except Exception as error:  # noqa: BLE001 - a bug: show it whole, and exit 1
        traceback.print_exception(error, file=sys.stderr)
        return _failed(EXIT_UNEXPECTED, error, as_json=as_json)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    _print_result(result, as_json=as_json)
    return EXIT_VERIFIED


def format_result(result: ReceiveResult) -> str:
    """The success line: ``verified sha1=<hex> bytes=<n> seconds=<s> rate=<MB/s> ...``, all key=value."""
    fields = [
        f"sha1={result.sha1}",
        f"bytes={result.bytes}",
        f"seconds={result.seconds:.3f}",
        f"rate={result.rate:.2f}",
        f"duplicates={result.duplicates}",
        f"corrupt_blocks={result.corrupt_blocks}",
        f"kernel_drops={'unknown' if result.kernel_drops is None else result.kernel_drops}",
    ]
    fields += [f"drops.{reason}={count}" for reason, count in sorted(result.drops.items())]
    return "verified " + " ".join(fields)


def _print_result(result: ReceiveResult, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.as_dict(), sort_keys=True), flush=True)
    else:
        print(format_result(result), flush=True)


def _failed(code: int, error: BaseException, *, as_json: bool) -> int:
    message = str(error) or type(error).__name__
    print(f"vmcast receive: {message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"verified": False, "exit_code": code, "error": message, "error_type": type(error).__name__}), flush=True)
    return code


def _request(*, output: str, image: str | None, server: str | None, image_format: str | None, group: str | None, port: int | None, cookie: str | None, interface: str | None, timeout: float, force: bool) -> ReceiveRequest:
    """Check the options' combinations and turn them into a request; a bad one is a usage error (exit 2)."""
    direct = {"--group": group, "--port": port, "--cookie": cookie}
    if image is not None or server is not None:
        if image is None or server is None:
            raise typer.BadParameter("they go together (or, without a server, give --group, --port and --cookie)", param_hint="IMAGE / --server")
        mixed = [name for name, value in direct.items() if value is not None]
        if mixed:
            raise typer.BadParameter("not with a server: the lease says where the stream is", param_hint=" / ".join(mixed))
        url = _parse_server(server)
        source: FromServer | FromGroup = FromServer(server=url, image=image, format=image_format or DEFAULT_FORMAT)
    else:
        missing = [name for name, value in direct.items() if value is None]
        if missing:
            raise typer.BadParameter(f"missing {', '.join(missing)}: give IMAGE and --server, or all of --group, --port and --cookie", param_hint="--group / --port / --cookie")
        if image_format is not None:
            raise typer.BadParameter("needs a server: without one the sender decides the format", param_hint="--format")
        if not is_multicast(group):
            raise typer.BadParameter(f"{group!r} is not an IPv4 multicast address (224.0.0.0/4)", param_hint="--group")
        if not re.fullmatch(r"[0-9a-fA-F]{16}", cookie):
            raise typer.BadParameter(f"{cookie!r} is not 16 hex digits", param_hint="--cookie")
        source = FromGroup(group=group, port=port, cookie=bytes.fromhex(cookie))
    if interface is not None:
        try:
            ipaddress.IPv4Address(interface)
        except ValueError:
            raise typer.BadParameter(f"{interface!r} is not an IPv4 address", param_hint="--interface") from None
    return ReceiveRequest(source=source, output=output, interface=interface, timeout=timeout, force=force)


def _parse_server(server: str) -> str:
    try:
        url = httpx.URL(server)
    except httpx.InvalidURL as error:
        raise typer.BadParameter(f"{server!r}: {error}", param_hint="--server") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{server!r} is not an http(s) URL with a host", param_hint="--server")
    return str(url).rstrip("/")


class _StderrHandler(logging.Handler):
    """Log lines on whatever `sys.stderr` is at the time (rich's live display redirects it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("vmcast receive: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a receive
            self.handleError(record)
