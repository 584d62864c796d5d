"""What an image's content really is, asked of ``qemu-img info``, and whether a cloud may be given it.

The stream announces a format; the content is only bytes. Registration believes neither alone: the format
`qemu-img` detects in the content must equal the declared one, because a "raw" image that is really qcow2
(with a backing file pointing at ``/etc/shadow``, say) is the classic way to make a compute host read files
it should not (OSSA-2015-014, OSSA-2024-001). Images that refer to other files (a backing file, an external
data file, a VMDK whose data lives in separate extents) or that qemu marks corrupt are refused too, as
Glance's own format inspector does. When ``qemu-img`` cannot tell, the answer is a refusal (fail closed).

``qemu-img`` parses untrusted headers, so it runs with the limits OpenStack gives it (``prlimit``: 1 GiB of
address space, 30 s of CPU) when ``prlimit`` is there, and a wall-clock timeout always; paths are passed
absolute so a name such as ``json:{...}`` is never read as a qemu protocol prefix.

Error handling: `FormatUndetermined`, `UnsupportedFormat`, `FormatMismatch`, `UnsafeImage` (all
`FormatRefused`, exit code 7). Nothing here touches a cloud.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..verified import VerifiedImage
from .errors import FormatMismatch, FormatUndetermined, UnsafeImage, UnsupportedFormat

QEMU_IMG = "qemu-img"

# A header read takes milliseconds; a minute means a hung file system or a hostile image.
INFO_TIMEOUT = 60.0

# The limits nova and glance put on `qemu-img info` (oslo_concurrency ProcessLimits, QEMU_IMG_LIMITS).
INFO_ADDRESS_SPACE = 1024 * 1024 * 1024
INFO_CPU_SECONDS = 30

# VMDK sub-formats whose data is inside the file itself; the others ("monolithicFlat", "twoGbMaxExtent...",
# "vmfs"...) are a text descriptor naming other files, which the cloud would then open.
SELF_CONTAINED_VMDK = frozenset({"monolithicSparse", "streamOptimized"})


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskFormat:
    """One disk image format, under the three names it goes by."""

    name: str
    """vmcast's name, as the stream declares it."""
    qemu: str
    """The name ``qemu-img info`` reports."""
    glance: str
    """Glance's ``disk_format``."""


FORMATS: dict[str, DiskFormat] = {
    f.name: f
    for f in (
        DiskFormat(name="raw", qemu="raw", glance="raw"),
        DiskFormat(name="qcow2", qemu="qcow2", glance="qcow2"),
        DiskFormat(name="vmdk", qemu="vmdk", glance="vmdk"),
        DiskFormat(name="vhd", qemu="vpc", glance="vhd"),
        DiskFormat(name="vhdx", qemu="vhdx", glance="vhdx"),
        DiskFormat(name="vdi", qemu="vdi", glance="vdi"),
    )
}
"""The formats vmcast registers, by vmcast name."""

# Other spellings a stream or a user may use for the same format.
_ALIASES = {"vpc": "vhd", "img": "raw"}

_BY_QEMU_NAME = {f.qemu: f for f in FORMATS.values()}


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectedFormat:
    """What ``qemu-img info`` found in a file."""

    format: DiskFormat
    virtual_size: int
    """Size of the disk the image describes, in bytes."""


def lookup(name: str) -> DiskFormat | None:
    """The format called `name` (vmcast or qemu spelling, any case), or None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return FORMATS.get(key) or _BY_QEMU_NAME.get(key)


def checked_format(image: VerifiedImage, *, cloud: str, qemu_img: str = QEMU_IMG) -> DetectedFormat:
    """The format of `image`'s content, once it is known to equal the declared one and to be self-contained.

    Error handling: `UnsupportedFormat` if the declared or detected format is not one of `FORMATS`;
    `FormatMismatch` if they differ; `UnsafeImage` for a backing file, an external data file, a VMDK
    descriptor or a qcow2 marked corrupt; `FormatUndetermined` if ``qemu-img`` fails.
    """
    path = str(image.path)
    declared = lookup(image.format)
    if declared is None:
        raise UnsupportedFormat(
            path=path, format=image.format, cloud=cloud,
            reason=f"vmcast registers only {', '.join(FORMATS)}",
        )  # fmt: skip
    if image.size == 0:
        raise UnsupportedFormat(path=path, format=declared.name, cloud=cloud, reason="the image is empty")
    info = _qemu_img_info(image.path, qemu_img=qemu_img)
    detected_name = str(info.get("format", ""))
    detected = _BY_QEMU_NAME.get(detected_name)
    if detected is None:
        if not detected_name:
            raise FormatUndetermined(path=path, reason="qemu-img info reported no format")
        raise UnsupportedFormat(
            path=path, format=detected_name, cloud=cloud,
            reason=f"the content is {detected_name}; vmcast registers only {', '.join(FORMATS)}",
        )  # fmt: skip
    if detected != declared:
        raise FormatMismatch(path=path, declared=declared.name, detected=detected.name)
    _refuse_unsafe(info, path=path, format=detected)
    try:
        virtual_size = int(info["virtual-size"])
    except (KeyError, TypeError, ValueError):
        raise FormatUndetermined(path=path, reason="qemu-img info reported no virtual size") from None
    return DetectedFormat(format=detected, virtual_size=virtual_size)


def _refuse_unsafe(info: dict, *, path: str, format: DiskFormat) -> None:
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImage(path=path, format=format.name, reason=f"it has a backing file ({info.get('backing-filename')})")
    specific = info.get("format-specific") or {}
    data = specific.get("data") or {}
    if data.get("data-file"):
        raise UnsafeImage(path=path, format=format.name, reason=f"its data is in another file ({data['data-file']})")
    if data.get("corrupt"):
        raise UnsafeImage(path=path, format=format.name, reason="qemu marks it corrupt")
    if format.name == "vmdk":
        create_type = data.get("create-type")
        if create_type not in SELF_CONTAINED_VMDK:
            raise UnsafeImage(
                path=path, format=format.name,
                reason=f"VMDK create-type {create_type!r} keeps its data in other files; "
                f"only {', '.join(sorted(SELF_CONTAINED_VMDK))} are accepted",
            )  # fmt: skip


def _qemu_img_info(path: Path, *, qemu_img: str) -> dict:
    shown = str(path)
    executable = shutil.which(qemu_img)
    if executable is None:
        raise FormatUndetermined(path=shown, reason=f"{qemu_img} not found (Debian: apt-get install qemu-utils)")
    command = [executable, "info", "-U", "--output=json", str(path.absolute())]
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        command = [prlimit, f"--as={INFO_ADDRESS_SPACE}", f"--cpu={INFO_CPU_SECONDS}", "--", *command]
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INFO_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise FormatUndetermined(path=shown, reason=f"qemu-img info took more than {INFO_TIMEOUT:g} s") from None
    except OSError as error:
        raise FormatUndetermined(path=shown, reason=f"cannot run qemu-img: {error}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"qemu-img info exited with status {done.returncode}"
        raise FormatUndetermined(path=shown, reason=reason)
    try:
        info = json.loads(done.stdout)
    except ValueError as error:
        raise FormatUndetermined(path=shown, reason=f"unreadable qemu-img info output: {error}") from None
    if not isinstance(info, dict):
        raise FormatUndetermined(path=shown, reason="unexpected qemu-img info output")
    return info
