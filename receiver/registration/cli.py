"""``vmcast register PATH --glance|--ec2``: verify an image file again, then register it in a cloud.

The command is the plain function `register`, which the root typer app registers
(``app.command("register")(register)``); ``python -m vmcast.receiver.registration.cli`` runs it on its own.

Only a `VerifiedImage` can be registered, so the file is always hashed first, against ``--sha1`` or, without
it, against the SHA-1 in the receiver's state file beside the image (``PATH.vmcast.json``, written by
``vmcast receive``: ``{"sha1", "len", "image", "format"}``), which also gives the declared format, the source
image name and the default ``--name``.

Output: on success the image or AMI id alone on stdout (``ID=$(vmcast register ...)`` works), a sentence and
log lines on stderr, progress bars on stderr when it is a terminal; with ``--json`` one JSON object on stdout
instead (``{"registered": true, "id": ..., ...}``, or ``{"registered": false, "exit_code": ..., "error": ...}``).
Exit codes: see `register`'s help, or `vmcast.receiver.registration.errors`.

Credentials never appear in the output: errors are this package's, already redacted; an unexpected error's
traceback is printed through the same redaction.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ReceiveError
from ..verified import VerifiedImage, verify_file
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_REGISTERED,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    CloudNotConfigured,
    redact,
)
from .registered import RegisteredImage

STATE_SUFFIX = ".vmcast.json"
"""The receiver's state file is the image path plus this suffix."""

VISIBILITIES = ("private", "shared", "community", "public")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverState:
    """What the receiver wrote beside the image (``PATH.vmcast.json``); only the fields used here."""

    sha1: str
    length: int | None
    image: str | None
    format: str | None


def register(
    path: Annotated[Path, typer.Argument(help="Image file (or block device) to register.", show_default=False)],
    glance: Annotated[bool, typer.Option("--glance", help="Register into OpenStack Glance (credentials: --os-cloud, OS_CLOUD or OS_* variables).")] = False,
    ec2: Annotated[bool, typer.Option("--ec2", help="Register as an EC2 AMI through the EBS direct APIs (raw images only; credentials: the AWS_* variables, ~/.aws or an instance profile).")] = False,
    sha1: Annotated[str | None, typer.Option(help=f"Expected SHA-1 of the file (default: the one in PATH{STATE_SUFFIX}, written by vmcast receive).", show_default=False)] = None,
    size: Annotated[int | None, typer.Option(min=1, help=f"Expected length in bytes (default: the one in PATH{STATE_SUFFIX}). For a block device: the image's length, which may be less than the device's.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Image or AMI name (default: the source image name from the state file, else the file name).", show_default=False)] = None,
    image_format: Annotated[str | None, typer.Option("--format", help="Declared format of the file: raw, qcow2, vmdk, vhd, vhdx, vdi (default: from the state file, else raw). The content must match it.", show_default=False)] = None,
    visibility: Annotated[str, typer.Option(help=f"Glance visibility: {', '.join(VISIBILITIES)}.")] = "private",
    os_cloud: Annotated[str | None, typer.Option("--os-cloud", help="Cloud name in clouds.yaml (default: OS_CLOUD, or the OS_* variables).", show_default=False)] = None,
    region: Annotated[str | None, typer.Option(help="AWS region (default: AWS_DEFAULT_REGION / the profile's).", show_default=False)] = None,
    parallelism: Annotated[int, typer.Option(min=1, max=64, help="EC2: concurrent block uploads.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result (or the error) as one JSON object on stdout.")] = False,
) -> None:
    """Verify an image file against its SHA-1, then register it in Glance or as an EC2 AMI.

    Registering is idempotent: if the cloud already holds this exact image (same SHA-1, proven by the cloud's own hash in Glance, by the vmcast_sha1 tag on an AMI of the account in EC2), its id is printed and nothing is uploaded. On failure, whatever this run created in the cloud is deleted again.

    The id is printed alone on stdout; with --json, one JSON object instead (also on failure).

    \b
    Exit codes:
      0    registered, or already registered
      1    unexpected error
      2    usage error (no --sha1 and no state file, --glance and --ec2 both or neither...)
      4    the file does not match its SHA-1 or size, or changed during the upload
      7    format refused: content differs from the declared format, not raw for EC2, backing file...
      8    cloud credentials missing, wrong or not allowed
      9    the cloud failed or timed out (what was created was deleted)
      10   as 9, and deleting what was created failed too: the message lists it
      130  interrupted (what was created was deleted)
    """
    code = run(
        path=path, cloud=_cloud(glance=glance, ec2=ec2, as_json=as_json), sha1=sha1, size=size, name=name,
        image_format=image_format, visibility=visibility, os_cloud=os_cloud, region=region,
        parallelism=parallelism, as_json=as_json,
    )  # fmt: skip
    if code != EXIT_REGISTERED:
        raise typer.Exit(code)


def run(
    *,
    path: Path,
    cloud: str,
    sha1: str | None,
    size: int | None,
    name: str | None,
    image_format: str | None,
    visibility: str,
    os_cloud: str | None,
    region: str | None,
    parallelism: int,
    as_json: bool,
) -> int:
    """Verify and register; print the outcome; return the exit code."""
    secrets: list[str] = []
    handler = _StderrHandler(secrets)
    logger = logging.getLogger("vmcast.receiver.registration")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        if visibility not in VISIBILITIES:
            return _usage(f"--visibility must be one of {', '.join(VISIBILITIES)}", as_json=as_json)
        state = _read_state(path)
        if sha1 is None and state is None:
            return _usage(f"no --sha1 given and no state file {path}{STATE_SUFFIX}: pass the expected SHA-1", as_json=as_json)
        expected = (sha1 or state.sha1).strip().lower()  # type: ignore[union-attr]
        if len(expected) != 40 or any(c not in "0123456789abcdef" for c in expected):
            return _usage(f"not a SHA-1 (40 hex digits): {expected!r}", as_json=as_json)
        if state is not None and state.sha1 != expected:
            _say(f"warning: {path}{STATE_SUFFIX} is about another image (sha1 {state.sha1}); ignoring it")
            state = None
        # The cloud configuration first (no request yet): a typo in --os-cloud should not cost a hashing pass.
        target = _openstack_connection(os_cloud, secrets) if cloud == "glance" else _boto3_session(region, secrets)
        try:
            expected_size = size if size is not None else (state.length if state else None)
            with _progress_bar(f"verifying {path.name}", expected_size or _size_of(path)) as advance:
                image = verify_file(
                    path, expected_sha1=expected, expected_size=expected_size,
                    format=image_format or (state.format if state else None),
                    source=state.image if state else None, progress=advance,
                )  # fmt: skip
            _say(f"verified {image.path}: sha1 {image.sha1}, {image.size} bytes, declared {image.format}")
            image_name = name or (state.image if state and state.image else path.name)
            result = _register(image, target, cloud=cloud, name=image_name, visibility=visibility, region=region, parallelism=parallelism)
        finally:
            if cloud == "glance":
                target.close()
    except ReceiveError as error:
        return _failed(error.exit_code, redact(str(error), secrets), as_json=as_json)
    except KeyboardInterrupt:
        return _failed(EXIT_INTERRUPTED, "interrupted", as_json=as_json)
    except Exception as error:  # noqa: BLE001 - a bug: show it (redacted), exit 1
        sys.stderr.write(redact("".join(traceback.format_exception(error)), secrets))
        return _failed(EXIT_UNEXPECTED, redact(f"{type(error).__name__}: {error}", secrets), as_json=as_json)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    _print_result(result, as_json=as_json)
    return EXIT_REGISTERED


def _register(
    image: VerifiedImage, target: Any, *, cloud: str, name: str, visibility: str, region: str | None, parallelism: int
) -> RegisteredImage:
    """Register into Glance (`target`: an openstacksdk connection) or EC2 (`target`: a boto3 session)."""
    if cloud == "glance":
        from .glance import register_in_glance

        with _progress_bar("uploading to Glance", image.size) as advance:
            return register_in_glance(image, connection=target, name=name, visibility=visibility, progress=advance)
    from .ec2 import register_in_ec2

    with _progress_bar("uploading to EBS", image.size) as advance:
        return register_in_ec2(image, name=name, session=target, region=region, parallelism=parallelism, progress=advance)


def _openstack_connection(os_cloud: str | None, secrets: list[str]) -> Any:
    try:
        import openstack
        import openstack.exceptions
    except ImportError:
        raise CloudNotConfigured(cloud="glance", reason="openstacksdk is not installed (pip install 'vmcast[clouds]')") from None
    try:
        connection = openstack.connect(cloud=os_cloud) if os_cloud else openstack.connect()
    except Exception as error:  # noqa: BLE001 - a configuration problem, whatever the SDK calls it
        where = f"cloud {os_cloud!r}" if os_cloud else "OS_CLOUD / OS_* variables"
        raise CloudNotConfigured(cloud="glance", reason=redact(f"{where}: {error}")) from None
    auth = connection.config.config.get("auth") or {}
    secrets.extend(str(v) for k, v in auth.items() if v and any(w in k.lower() for w in ("password", "secret", "token")))
    return connection


def _boto3_session(region: str | None, secrets: list[str]) -> Any:
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise CloudNotConfigured(cloud="ec2", reason="boto3 is not installed (pip install 'vmcast[clouds]')") from None
    try:
        session = boto3.Session(region_name=region) if region else boto3.Session()
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as error:
        raise CloudNotConfigured(cloud="ec2", reason=redact(str(error))) from None
    if credentials is None:
        raise CloudNotConfigured(cloud="ec2", reason="no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, or an instance profile)")
    if not session.region_name:
        raise CloudNotConfigured(cloud="ec2", reason="no AWS region: pass --region or set AWS_DEFAULT_REGION")
    frozen = credentials.get_frozen_credentials()
    secrets.extend(s for s in (frozen.secret_key, frozen.token) if s)
    return session


# --------------------------------------------------------------------------------------- helpers


def _cloud(*, glance: bool, ec2: bool, as_json: bool) -> str:
    if glance == ec2:
        raise typer.Exit(_usage("give exactly one of --glance and --ec2", as_json=as_json))
    return "glance" if glance else "ec2"


def _read_state(path: Path) -> ReceiverState | None:
    """The receiver's state file beside `path`, or None if there is none (or it cannot be used: said so)."""
    state_path = Path(f"{path}{STATE_SUFFIX}")
    try:
        fields = json.loads(state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _say(f"warning: ignoring {state_path}: {error}")
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("sha1"), str):
        _say(f"warning: ignoring {state_path}: no sha1 in it")
        return None
    length = fields.get("len")
    return ReceiverState(
        sha1=fields["sha1"].strip().lower(),
        length=length if isinstance(length, int) and not isinstance(length, bool) else None,
        image=fields.get("image") if isinstance(fields.get("image"), str) else None,
        format=fields.get("format") if isinstance(fields.get("format"), str) else None,
    )


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size or None  # a block device says 0: no total then
    except OSError:
        return None


@contextmanager
def _progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr when it is a terminal; yields its advance function (or None)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task, count)


def _print_result(result: RegisteredImage, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.as_dict()), flush=True)
        return
    what = "AMI" if result.cloud == "ec2" else "Glance image"
    if result.created:
        extra = f", {result.zero_blocks_skipped} zero blocks skipped" if result.cloud == "ec2" else ""
        _say(f"registered {what} {result.id} ({result.name}){extra} in {result.seconds:.1f} s")
    else:
        _say(f"already registered: {what} {result.id} ({result.name}) holds this image; nothing uploaded")
    print(result.id, flush=True)


def _usage(message: str, *, as_json: bool) -> int:
    return _failed(EXIT_USAGE, message, as_json=as_json)


def _failed(code: int, message: str, *, as_json: bool) -> int:
    _say(f"error: {message}")
    if as_json:
        print(json.dumps({"registered": False, "exit_code": code, "error": message}), flush=True)
    return code


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _StderrHandler(logging.Handler):
    """The package's log lines on stderr, redacted with the secrets known so far."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(logging.INFO)
        self._secrets = secrets

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _say(redact(record.getMessage(), self._secrets))
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def main() -> None:
    """``python -m vmcast.receiver.registration.cli``: the command on its own."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(register)
    app()


if __name__ == "__main__":
    main()
