"""``vmcast receive``: receive one image from a multicast stream, verify it, and say so.

The command is the plain function `receive`, which the root typer app registers
(``app.command("receive")(receive)``); ``python -m vmcast.receiver`` runs it on its own.

Exit codes (also in ``--help``; defined in `vmcast.receiver.errors` and, for 7-10,
`vmcast.receiver.registration.errors`):

* 0: verified: every block and the whole-image SHA-1 matched, and the target was synced (and registered,
  with ``--register``)
* 1: unexpected error (including an I/O error on the target)
* 2: usage error
* 3: target refused before a byte was written (too small, mounted, in use, cannot be inspected)
* 4: verification failed for good, or the stream failed (the image changed under us); with ``--register``
  also: the file changed between its verification and the upload
* 5: server unreachable, or it answered with an error (unknown image, unknown format)
* 6: nothing of the stream within --timeout seconds (by multicast, or by the HTTP fallback)
* 7-10: with ``--register``: verified and kept, but not registered (7 format refused, 8 cloud credentials,
  9 the cloud failed, 10 and its clean-up failed too)
* 130: interrupted (SIGINT, SIGTERM); the lease is released and the state saved all the same

Output: progress and log lines on stderr; on success one line on stdout,
``verified sha1=<hex> bytes=<n> seconds=<s> rate=<MB/s> ...`` (plus ``registered cloud=... id=...`` with
``--register``), or with ``--json`` one JSON object (also on failure: ``{"verified": false, "exit_code": ...,
"error": ...}``; a registration failure after a verified receive: ``"verified": true`` with ``"exit_code"``
and ``"registration_error"``).

Imports: ``vmcast`` loads this module to build the command, for ``--help`` and usage errors too, so it imports
at the top only typer and what the options need (`defaults`). The receive's machinery (`agent`, with trio,
httpx and the rest of the receiver: ~0.17 s) is imported once the options have been checked, and the
registration code (`registering`) only with ``--register``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import sys
import traceback
from typing import TYPE_CHECKING, Annotated

import typer

from .defaults import (
    CLOUDS,
    DEFAULT_FALLBACK_AFTER,
    DEFAULT_TIMEOUT,
    RECEIVE_BUFFER_AUTO,
    STATE_SUFFIX,
    VISIBILITIES,
)
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    EXIT_VERIFIED,
    ReceiveError,
)
from .redaction import redact

if TYPE_CHECKING:
    from .agent import ReceiveRequest, ReceiveResult
    from .registering import Prepared, RegisterRequest
    from .registration.registered import RegisteredImage

DEFAULT_FORMAT = "raw"

_SIZE = re.compile(r"(?i)\s*(\d+)\s*([kmg]i?b?|b)?\s*")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def receive(
    output: Annotated[str, typer.Option("--output", "-o", help=f"File or block device to write (a file is created, sized to the image). Its state is kept beside it, in OUTPUT{STATE_SUFFIX}: running the same command again resumes an interrupted receive.", show_default=False)],
    image: Annotated[str | None, typer.Argument(help="Image name on the server (needs --server).", show_default=False)] = None,
    server: Annotated[str | None, typer.Option(help="vmcast server URL, e.g. http://127.0.0.1:8470.", show_default=False)] = None,
    image_format: Annotated[str | None, typer.Option("--format", help=f"Format to stream the image in, with a server (default: {DEFAULT_FORMAT}).", show_default=False)] = None,
    group: Annotated[str | None, typer.Option(help="Multicast group to join, without a server.", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="UDP port, without a server.", show_default=False)] = None,
    cookie: Annotated[str | None, typer.Option(help="The stream's cookie, 16 hex digits, without a server.", show_default=False)] = None,
    interface: Annotated[str | None, typer.Option(help="Local IPv4 address to join on (default: the one the kernel routes to the server, or to the group, through).", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Give up (exit 6) after this many seconds in which nothing of the stream arrived, by multicast or by the HTTP fallback. With a server it must exceed --fallback-after.")] = DEFAULT_TIMEOUT,
    fallback_after: Annotated[float, typer.Option(min=0.1, help="With a server: when nothing of the stream arrived by multicast within this many seconds of joining, fetch the image by HTTP instead (GET /v1/streams/ID/data with Range). HTTP also fetches the last few blocks (at most 1% of them, or 16) still missing a whole loop after joining.")] = DEFAULT_FALLBACK_AFTER,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="Never fetch by HTTP: what multicast loses comes from repair requests and the next loop.")] = False,
    no_repair: Annotated[bool, typer.Option("--no-repair", help="With a server: send no repair requests (UDP, to the server's repair port) for lost frames; they come from the next loop or the HTTP fallback.")] = False,
    min_receivers: Annotated[int | None, typer.Option(min=1, help="With a server, if this receiver's lease starts the stream: the server sends only metadata until this many receivers have joined, then starts at the image's first frame (like udp-sender --min-receivers; give every receiver started together the same N). Each receiver says when it has joined. Default 1: a stream this receiver starts waits for its join, so it misses nothing of the first loop.", show_default=False)] = None,
    max_wait: Annotated[float | None, typer.Option(min=0.001, help="With --min-receivers: the stream starts anyway after this many seconds (default: the server's, 30).", show_default=False)] = None,
    wait_for_stream: Annotated[float | None, typer.Option(min=0.001, metavar="SECONDS", help="With a server: start no stream; wait up to this many seconds for one of IMAGE to be started (by vmcast stream start, another receiver, or POST /v1/streams), then join it; exit 6 if none starts. Start receivers first and the stream after, like udp-receiver before udp-sender: e.g. every receiver with --wait-for-stream 600, then vmcast stream start IMAGE --min-receivers N.", show_default=False)] = None,
    no_gro: Annotated[bool, typer.Option("--no-gro", help="Do not ask the kernel for UDP GRO: one datagram per receive system call instead of up to 64 KiB of them (for comparison; GRO is off by itself where the kernel lacks it).")] = False,
    no_batch: Annotated[bool, typer.Option("--no-batch", help="Keep one receive system call per datagram where the link does not coalesce them (a rate-limited link, a NIC without GRO); by default the receiver then takes up to 64 queued datagrams per call (recvmmsg) and whole runs of frames in one step (for comparison).")] = False,
    rcvbuf: Annotated[str, typer.Option(help="Socket receive buffer to ask for: 'auto' (1/32 of the memory this receiver may use, the machine's or its cgroup's limit, between 64m and 1g), or bytes with suffixes k, m, g (powers of 1024), 4k to 1g. It holds what the sender is ahead of this receiver; the kernel takes the memory only for datagrams queued. Linux doubles it for its bookkeeping; without root it is capped at net.core.rmem_max.")] = RECEIVE_BUFFER_AUTO,
    keep_cache: Annotated[bool, typer.Option("--keep-cache", help="Leave the image in the page cache. By default its pages are dropped as soon as they are verified, hashed and on the disk (like dd oflag=nocache): a multi-GiB image does not push out what the machine caches, and the next writes reuse the pages freed, which is cheaper on a virtual machine. Keep it when the image is read again right away and fits in memory.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write a block device that is in use, or overwrite a non-empty file that is not an earlier receive of this image.")] = False,
    register: Annotated[str | None, typer.Option(help=f"After a verified receive, register the image in this cloud: {' or '.join(CLOUDS)} (as vmcast register does; the lease is released first). A failure keeps the verified file: retry with vmcast register OUTPUT --glance|--ec2.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="With --register: the image or AMI name (default: the image's name on the server, else the output's file name).", show_default=False)] = None,
    visibility: Annotated[str | None, typer.Option(help=f"With --register glance: {', '.join(VISIBILITIES)} (default: private).", show_default=False)] = None,
    os_cloud: Annotated[str | None, typer.Option("--os-cloud", help="With --register glance: the cloud in clouds.yaml (default: OS_CLOUD, or the OS_* variables).", show_default=False)] = None,
    region: Annotated[str | None, typer.Option(help="With --register ec2: the AWS region (default: AWS_DEFAULT_REGION, or the profile's).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (or the error) as one JSON object on stdout.")] = False,
) -> None:
    """Receive an image from a multicast stream into a file or block device, and verify it.

    With a server: vmcast receive IMAGE --server URL --output PATH. It takes a lease (released on exit), asks the server for lost frames, and falls back to HTTP when multicast does not arrive.

    Without one: vmcast receive --group G --port P --cookie HEX --output PATH.

    Interrupted (Ctrl-C, SIGTERM, a crash)? Run the same command again: it resumes from the blocks already verified. Run it again after a success: it hashes the file again and returns at once.

    \b
    Exit codes:
      0    verified: every block and the image SHA-1 matched, target
           synced (and registered, with --register)
      1    unexpected error (including an I/O error on the target)
      2    usage error
      3    target refused (too small, mounted, in use, cannot be
           inspected); nothing written
      4    verification failed for good, or the stream failed (the
           image changed); --register: the file changed before upload
      5    server unreachable, or an API error (unknown image, format)
      6    nothing of the stream within --timeout seconds (by multicast
           or by HTTP)
      7    verified and kept, not registered (--register): the format
           was refused (not the declared one, not raw for EC2, ...)
      8    not registered: cloud credentials missing, wrong or not
           allowed (checked before receiving)
      9    not registered: the cloud failed or timed out (what was
           created was deleted)
      10   not registered, and deleting what was created failed too
      130  interrupted (SIGINT/SIGTERM); lease released, state saved
    """
    request = _request(
        output=output, image=image, server=server, image_format=image_format, group=group, port=port, cookie=cookie,
        interface=interface, timeout=timeout, force=force, fallback_after=None if no_fallback else fallback_after,
        no_repair=no_repair, rcvbuf=rcvbuf, gro=not no_gro, min_receivers=min_receivers, max_wait=max_wait,
        wait_for_stream=wait_for_stream, batch=not no_batch, keep_cache=keep_cache,
    )  # fmt: skip
    registration = _registration(register=register, name=name, visibility=visibility, os_cloud=os_cloud, region=region)
    code = run(request, as_json=as_json, registration=registration)
    if code != EXIT_VERIFIED:
        raise typer.Exit(code)


def run(request: ReceiveRequest, *, as_json: bool, registration: RegisterRequest | None = None) -> int:
    """Run a receive (and the registration asked for) to its end, print the outcome, and return the exit code."""
    # Here, not at the top: see "Imports" above.
    import trio

    from .agent import receive as receive_image

    handler = _StderrHandler()
    loggers = [logging.getLogger("vmcast.receiver")]
    previous_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    prepared: Prepared | None = None
    try:
        if registration is not None:
            # Only with --register: see "Imports" above.
            from .registering import RegistrationError, prepare

            try:
                prepared = prepare(registration)  # fail on a bad cloud configuration before receiving
            except RegistrationError as error:
                return _failed(error.exit_code, error, as_json=as_json)
            handler.secrets = prepared.secrets
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
        if prepared is None:
            _print_result(result, as_json=as_json)
            return EXIT_VERIFIED
        return _register(prepared, result, as_json=as_json)
    finally:
        if prepared is not None:
            prepared.close()
        for logger, level in zip(loggers, previous_levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _register(prepared: Prepared, result: ReceiveResult, *, as_json: bool) -> int:
    """Register the verified output; print the receive's result with the registration's (or its error)."""
    # Only with --register: see "Imports" above.
    from .registering import RegistrationError
    from .registering import register as register_image

    default_name = result.image or os.path.basename(result.output)
    print(f"vmcast receive: registering {result.output} in {prepared.request.cloud}", file=sys.stderr, flush=True)
    try:
        registered = register_image(prepared, result.proof, default_name=default_name)
    except RegistrationError as error:
        message = prepared.redact(str(error))
        return _registration_failed(result, prepared.request.cloud, error.exit_code, message, as_json=as_json)
    except KeyboardInterrupt:
        return _registration_failed(result, prepared.request.cloud, EXIT_INTERRUPTED, "interrupted; what the registration created was deleted", as_json=as_json)
    except Exception as error:  # noqa: BLE001 - a bug: show it (redacted), exit 1
        sys.stderr.write(prepared.redact("".join(traceback.format_exception(error))))
        return _registration_failed(result, prepared.request.cloud, EXIT_UNEXPECTED, prepared.redact(f"{type(error).__name__}: {error}"), as_json=as_json)
    _print_result(result, as_json=as_json, registered=registered)
    return EXIT_VERIFIED


def format_result(result: ReceiveResult) -> str:
    """The success line: ``verified sha1=<hex> bytes=<n> seconds=<s> rate=<MB/s> ...``, all key=value."""
    fields = [
        f"sha1={result.sha1}",
        f"bytes={result.bytes}",
        f"seconds={result.seconds:.3f}",
        f"rate={result.rate:.2f}",
        f"bytes_received={result.bytes_received}",
        f"resumed_blocks={result.resumed_blocks}",
        f"duplicates={result.duplicates}",
        f"corrupt_blocks={result.corrupt_blocks}",
        f"kernel_drops={'unknown' if result.kernel_drops is None else result.kernel_drops}",
        f"repair_requests={result.repair_requests}",
        f"repair_frames_requested={result.repair_frames_requested}",
        f"fallback_blocks={result.fallback_blocks}",
    ]
    if result.fallback_reason:
        fields.append(f"fallback_reason={result.fallback_reason}")
    if result.already_verified:
        fields.append("already_verified=true")
    fields += [f"drops.{reason}={count}" for reason, count in sorted(result.drops.items())]
    return "verified " + " ".join(fields)


def format_registered(registered: RegisteredImage) -> str:
    """The registration line: ``registered cloud=<glance|ec2> id=<id> name=<name> created=<true|false>``."""
    return f"registered cloud={registered.cloud} id={registered.id} name={json.dumps(registered.name)} created={str(registered.created).lower()}"


def _print_result(result: ReceiveResult, *, as_json: bool, registered: RegisteredImage | None = None) -> None:
    if as_json:
        summary = result.as_dict()
        if registered is not None:
            summary["registered"] = {"cloud": registered.cloud, "id": registered.id, "name": registered.name, "created": registered.created}
        print(json.dumps(summary, sort_keys=True), flush=True)
        return
    print(format_result(result), flush=True)
    if registered is not None:
        what = "AMI" if registered.cloud == "ec2" else "Glance image"
        how = "registered" if registered.created else "already registered (nothing uploaded):"
        print(f"vmcast receive: {how} {what} {registered.id} ({registered.name})", file=sys.stderr, flush=True)
        print(format_registered(registered), flush=True)


def _failed(code: int, error: BaseException, *, as_json: bool) -> int:
    message = str(error) or type(error).__name__
    print(f"vmcast receive: {message}", file=sys.stderr, flush=True)
    if as_json:
        print(json.dumps({"verified": False, "exit_code": code, "error": message, "error_type": type(error).__name__}), flush=True)
    return code


def _registration_failed(result: ReceiveResult, cloud: str, code: int, message: str, *, as_json: bool) -> int:
    """The receive was verified, the registration was not: say both (the file is kept, for vmcast register)."""
    print(f"vmcast receive: {result.output} is verified and kept, but not registered: {message}", file=sys.stderr, flush=True)
    print(f"vmcast receive: to try again: vmcast register {result.output} --{cloud}", file=sys.stderr, flush=True)
    if as_json:
        summary = result.as_dict()
        summary.update(registered=None, exit_code=code, registration_error=message)
        print(json.dumps(summary, sort_keys=True), flush=True)
    else:
        print(format_result(result), flush=True)
    return code


def _registration(*, register: str | None, name: str | None, visibility: str | None, os_cloud: str | None, region: str | None) -> RegisterRequest | None:
    """The registration asked for, if any; options that need another --register are usage errors."""
    if register is None:
        given = [option for option, value in (("--name", name), ("--visibility", visibility), ("--os-cloud", os_cloud), ("--region", region)) if value is not None]
        if given:
            raise typer.BadParameter("needs --register glance or --register ec2", param_hint=" / ".join(given))
        return None
    cloud = register.strip().lower()
    if cloud not in CLOUDS:
        raise typer.BadParameter(f"{register!r}: give {' or '.join(CLOUDS)}", param_hint="--register")
    if cloud == "ec2":
        wrong = [option for option, value in (("--visibility", visibility), ("--os-cloud", os_cloud)) if value is not None]
        if wrong:
            raise typer.BadParameter("Glance only (this is --register ec2)", param_hint=" / ".join(wrong))
    elif region is not None:
        raise typer.BadParameter("EC2 only (this is --register glance)", param_hint="--region")
    if visibility is not None and visibility not in VISIBILITIES:
        raise typer.BadParameter(f"{visibility!r}: one of {', '.join(VISIBILITIES)}", param_hint="--visibility")
    # Only with --register: see "Imports" above.
    from .registering import RegisterRequest

    return RegisterRequest(cloud=cloud, name=name, visibility=visibility or "private", os_cloud=os_cloud, region=region)


def parse_size(text: str) -> int:
    """``65536``, ``256k``, ``64m``, ``1g`` (powers of 1024) -> bytes; ValueError otherwise."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 262144, 256k, 64m)")
    return int(match[1]) * _UNITS[(match[2] or "").lower()[:1]]


def _request(
    *, output: str, image: str | None, server: str | None, image_format: str | None, group: str | None, port: int | None,
    cookie: str | None, interface: str | None, timeout: float, force: bool, fallback_after: float | None, no_repair: bool, rcvbuf: str,
    gro: bool = True, min_receivers: int | None = None, max_wait: float | None = None, wait_for_stream: float | None = None,
    batch: bool = True, keep_cache: bool = False,
) -> ReceiveRequest:  # fmt: skip
    """Check the options' combinations and turn them into a request; a bad one is a usage error (exit 2)."""
    # Here, not at the top: see "Imports" above.
    from .agent import FromGroup, FromServer, ReceiveRequest
    from .multicast import is_multicast

    direct = {"--group": group, "--port": port, "--cookie": cookie}
    if image is not None or server is not None:
        if image is None or server is None:
            raise typer.BadParameter("they go together (or, without a server, give --group, --port and --cookie)", param_hint="IMAGE / --server")
        mixed = [name for name, value in direct.items() if value is not None]
        if mixed:
            raise typer.BadParameter("not with a server: the lease says where the stream is", param_hint=" / ".join(mixed))
        url = _parse_server(server)
        # A stream this receiver starts holds at least until the receiver has joined: between the lease and
        # the join (tens to hundreds of ms) it would otherwise send frames only the next loop brings.
        source: FromServer | FromGroup = FromServer(
            server=url, image=image, format=image_format or DEFAULT_FORMAT, min_receivers=min_receivers or 1, max_wait=max_wait,
            wait_for_stream=wait_for_stream,
        )
        if fallback_after is not None and fallback_after >= timeout:
            raise typer.BadParameter(
                f"--fallback-after ({fallback_after:g} s) must be shorter than --timeout ({timeout:g} s), or the receive gives up "
                f"before it falls back to HTTP; raise --timeout, lower --fallback-after, or pass --no-fallback",
                param_hint="--fallback-after / --timeout",
            )
    else:
        missing = [name for name, value in direct.items() if value is None]
        if missing:
            raise typer.BadParameter(f"missing {', '.join(missing)}: give IMAGE and --server, or all of --group, --port and --cookie", param_hint="--group / --port / --cookie")
        if image_format is not None:
            raise typer.BadParameter("needs a server: without one the sender decides the format", param_hint="--format")
        if min_receivers is not None or max_wait is not None:
            raise typer.BadParameter("needs a server: it is the server that holds a stream for receivers", param_hint="--min-receivers / --max-wait")
        if wait_for_stream is not None:
            raise typer.BadParameter("needs a server: without one, the receiver joins the group and waits for its datagrams (see --timeout)", param_hint="--wait-for-stream")
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
    receive_buffer: int | None = None  # auto: sized when the socket is opened (`multicast.auto_receive_buffer`)
    if rcvbuf != RECEIVE_BUFFER_AUTO:
        try:
            receive_buffer = parse_size(rcvbuf)
        except ValueError as error:
            raise typer.BadParameter(f"{error}, or {RECEIVE_BUFFER_AUTO!r}", param_hint="--rcvbuf") from None
        if not 4096 <= receive_buffer <= 1 << 30:
            raise typer.BadParameter(f"{rcvbuf!r}: between 4k and 1g (the most Linux grants)", param_hint="--rcvbuf")
    return ReceiveRequest(
        source=source, output=output, interface=interface, timeout=timeout, force=force, rcvbuf=receive_buffer,
        repair=not no_repair, fallback_after=fallback_after, gro=gro, batch=batch, keep_cache=keep_cache,
    )  # fmt: skip


def _parse_server(server: str) -> str:
    # Here, not at the top: see "Imports" above.
    import httpx

    try:
        url = httpx.URL(server)
    except httpx.InvalidURL as error:
        raise typer.BadParameter(f"{server!r}: {error}", param_hint="--server") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise typer.BadParameter(f"{server!r} is not an http(s) URL with a host", param_hint="--server")
    return str(url).rstrip("/")


class _StderrHandler(logging.Handler):
    """Log lines on whatever `sys.stderr` is at the time (rich's live display redirects it), with the cloud's
    secrets (once a registration is prepared) redacted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("vmcast receive: %(message)s"))
        self.secrets: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(redact(self.format(record), self.secrets), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break a receive
            self.handleError(record)
