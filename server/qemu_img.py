"""The two things vmcast asks of `qemu-img`: what format a file is in, and a copy of it in another format.

Paths are always passed absolute, so a file name such as ``nbd:host`` or ``json:{...}`` is never read as a
qemu protocol prefix, and with ``-U`` (force share) so an image a VM holds open can still be inspected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionFailed, ImageUnreadable, QemuImgMissing

# `qemu-img info` reads a header: if it takes longer than this, the file system is in trouble.
INFO_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageInfo:
    """What `qemu-img info` says about a file."""

    format: str
    """Format qemu-img detected (raw, qcow2, vmdk...)."""
    virtual_size: int
    """Size in bytes of the disk the image describes (the size of its raw form)."""
    backing_file: str | None
    """For a layered image, the file it is layered on (read by a conversion)."""


class QemuImg:
    """Runs qemu-img.

    Error handling: `QemuImgMissing` at construction if the executable cannot be found; `ImageUnreadable` when
    `info` fails; `ConversionFailed` when `convert` fails. Each carries qemu-img's own message.
    """

    def __init__(self, executable: str = "qemu-img") -> None:
        found = shutil.which(executable)
        if found is None:
            raise QemuImgMissing(executable=executable)
        self.executable = found

    def info(self, path: Path) -> ImageInfo:
        command = [self.executable, "info", "-U", "--output=json", str(path.absolute())]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=INFO_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise ImageUnreadable(path=path, reason=f"qemu-img info took more than {INFO_TIMEOUT:g} s") from None
        except OSError as error:
            raise ImageUnreadable(path=path, reason=f"cannot run qemu-img: {error}") from None
        if done.returncode != 0:
            raise ImageUnreadable(
                path=path, reason=_last_line(done.stderr) or f"qemu-img info exit status {done.returncode}"
            )
        try:
            fields = json.loads(done.stdout)
            return ImageInfo(
                format=str(fields["format"]),
                virtual_size=int(fields["virtual-size"]),
                backing_file=fields.get("backing-filename"),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ImageUnreadable(path=path, reason=f"unexpected qemu-img info output: {error}") from None

    def convert(self, *, source: Path, source_format: str, target: Path, target_format: str) -> None:
        """Write `source` to `target` in `target_format` (raw: sparse where the image is zero).

        The source format is given, not probed again, so a raw file that happens to start with another
        format's header is never reinterpreted.

        qcow2 is written with qemu-img's defaults (64 KiB clusters, compat 1.1, no preallocation): clusters that
        are zero are left unallocated, so it is about as small as the data. It is not compressed (``-c``):
        compressing costs the server minutes of CPU once and every VM that boots from it CPU on each read, and
        a receiver that wants it smaller can recompress. Writes stay in order (no ``-W``), so the same input
        and qemu-img version give the same bytes; vmcast does not rely on that (see `vmcast.server.conversion`).
        """
        command = [
            self.executable, "convert", "-U", "-f", source_format, "-O", target_format,
            str(source.absolute()), str(target.absolute()),
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as error:
            raise ConversionFailed(
                path=source, target_format=target_format, reason=f"cannot run qemu-img: {error}"
            ) from None
        if done.returncode != 0:
            raise ConversionFailed(
                path=source,
                target_format=target_format,
                reason=_last_line(done.stderr) or f"exit status {done.returncode}",
            )

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
