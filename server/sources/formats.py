"""What a fetched file is (`qemu-img info`), and whether the server may convert and stream it.

A file fetched from a cloud or a URL is untrusted input for qemu-img. An image that names *another* file
makes ``qemu-img convert`` read that file and put it into the raw image (CVE-2022-47951, OSSA-2024-001): a
qcow2 or qed backing file, a qcow2 external data file, a vmdk descriptor whose extents are other files. Such
images are refused, and so is any format outside `ACCEPTED_FORMATS`. Where qemu-img's answer does not let
us tell, the image is refused too (fail closed).

`qemu-img info` runs through `vmcast.server.qemu_img.QemuImg.info` (format, virtual size, backing file); for
qcow2 and vmdk, whose format-specific fields that function does not return, a second ``qemu-img info`` with
the format forced reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageUnreadable
from ..qemu_img import INFO_TIMEOUT, QemuImg
from .errors import SourceFormatRefused

# The formats qemu-img converts from the file alone: the server's CONVERTIBLE_FORMATS.
ACCEPTED_FORMATS = frozenset({"raw", "qcow2", "qcow", "qed", "vmdk", "vdi", "vhdx", "vpc"})

# vmdk subformats kept in one file; the others ("monolithicFlat", "twoGbMaxExtent...", "vmfs") are a
# descriptor naming extent files elsewhere.
SELF_CONTAINED_VMDK = frozenset({"monolithicSparse", "streamOptimized"})

# Glance's disk_format -> the qemu-img format its data must have. Formats Glance knows but that do not
# name one qemu-img format (ami, aki, ari, ploop) are not checked.
GLANCE_DISK_FORMATS = {
    "raw": "raw",
    "iso": "raw",
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "vhd": "vpc",
    "vhdx": "vhdx",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class InspectedImage:
    """A fetched file the server may stream as it is and convert (to raw, to qcow2)."""

    format: str
    """Format qemu-img detected (raw, qcow2, vmdk, vpc, vhdx...)."""
    virtual_size: int
    """Size in bytes of the disk it describes (the file's own size for raw)."""


def inspect_fetched(path: Path, *, qemu: QemuImg, origin: str, declared_format: str | None) -> InspectedImage:
    """Detect `path`'s format and refuse what is unsafe or not what the source declared it to be.

    `declared_format`: the qemu-img format the source says the data is in (from Glance's disk_format), or
    None when it says nothing checkable.

    Error handling: `SourceFormatRefused` (qemu-img cannot read it, a format not accepted, a file that names
    other files, or a declared format the content contradicts).
    """
    try:
        info = qemu.info(path)
    except ImageUnreadable as error:
        raise SourceFormatRefused(
            origin=origin, format=None, reason=f"qemu-img cannot read it: {error.reason}"
        ) from None
    if info.format not in ACCEPTED_FORMATS:
        raise SourceFormatRefused(
            origin=origin,
            format=info.format,
            reason=f"its format is {info.format}; accepted: {', '.join(sorted(ACCEPTED_FORMATS))}",
        )
    if declared_format is not None and declared_format != info.format:
        raise SourceFormatRefused(
            origin=origin,
            format=info.format,
            reason=f"the source declares it {declared_format} but its content is {info.format} "
            "(a mislabelled image, or an attack: fix its disk_format)",
        )
    if info.backing_file:
        raise SourceFormatRefused(
            origin=origin, format=info.format, reason="it is layered on a backing file, which is not fetched"
        )
    if info.format in ("qcow2", "vmdk"):
        _refuse_external_files(path, qemu=qemu, origin=origin, format=info.format)
    virtual_size = os.stat(path).st_size if info.format == "raw" else info.virtual_size
    return InspectedImage(format=info.format, virtual_size=virtual_size)


def _refuse_external_files(path: Path, *, qemu: QemuImg, origin: str, format: str) -> None:
    specific = _format_specific(path, qemu=qemu, origin=origin, format=format)
    if format == "qcow2":
        if specific.get("data-file"):
            raise SourceFormatRefused(origin=origin, format=format, reason="its data is in an external data file")
        return
    create_type = specific.get("create-type")
    if create_type not in SELF_CONTAINED_VMDK:
        raise SourceFormatRefused(
            origin=origin,
            format=format,
            reason=f"it is a {create_type or 'unknown'} vmdk, whose data is in other files",
        )
    own = os.path.realpath(path)
    extents = specific.get("extents")
    if not isinstance(extents, list) or not extents:
        raise SourceFormatRefused(origin=origin, format=format, reason="qemu-img lists no extents for this vmdk")
    for extent in extents:
        filename = extent.get("filename") if isinstance(extent, dict) else None
        if not isinstance(filename, str) or os.path.realpath(filename) != own:
            raise SourceFormatRefused(origin=origin, format=format, reason="its extents name other files")


def _format_specific(path: Path, *, qemu: QemuImg, origin: str, format: str) -> dict:
    command = [qemu.executable, "info", "-U", "--output=json", "-f", format, str(path.absolute())]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INFO_TIMEOUT, check=False)
        if done.returncode != 0:
            raise ValueError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode)
        data = json.loads(done.stdout)["format-specific"]["data"]
        if not isinstance(data, dict):
            raise TypeError("format-specific data is not an object")
        return data
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as error:
        raise SourceFormatRefused(
            origin=origin, format=format, reason=f"cannot tell whether it names other files ({error})"
        ) from None
