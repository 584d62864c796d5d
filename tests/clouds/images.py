"""Image files of real bytes for the registration tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmcast.receiver.registration.ec2 import EBS_BLOCK_SIZE

MIB = 1024 * 1024


@dataclass(frozen=True)
class ImageFile:
    path: Path
    sha1: str
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


def write_image(path: Path, data: bytes) -> ImageFile:
    path.write_bytes(data)
    return ImageFile(path=path, sha1=hashlib.sha1(data).hexdigest(), size=len(data))


def random_raw(path: Path, size: int) -> ImageFile:
    """Random bytes: a unique SHA-1 each run, so nothing registered earlier (moto, Glance keep state) matches."""
    return write_image(path, os.urandom(size))


def mostly_zero_raw(path: Path, *, size: int, data_blocks: tuple[int, ...], tail: int = 0) -> ImageFile:
    """Zeros, with random bytes in the 512 KiB blocks `data_blocks` and in the last `tail` bytes."""
    data = bytearray(size)
    for index in data_blocks:
        data[index * EBS_BLOCK_SIZE : (index + 1) * EBS_BLOCK_SIZE] = os.urandom(EBS_BLOCK_SIZE)
    if tail:
        data[-tail:] = os.urandom(tail)
    return write_image(path, bytes(data))


def qcow2_of(raw: ImageFile, path: Path) -> ImageFile:
    """A qcow2 holding `raw` (so its bytes, too, are new each run)."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw.path), str(path)], check=True)
    return write_image(path, path.read_bytes())
