"""`RegisteredImage`: what a registration into Glance or EC2 returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredImage:
    """An image that is registered (by this call, or found already registered) and usable in its cloud."""

    cloud: Literal["glance", "ec2"]
    """Which cloud."""
    id: str
    """Glance image id, or EC2 AMI id."""
    name: str
    """The image's name in the cloud (for an existing image: its name there, which may differ from the one asked)."""
    sha1: str
    """SHA-1 of the content (the ``vmcast_sha1`` property or tag)."""
    created: bool
    """False if an identical image was already registered and returned as it is (nothing uploaded)."""
    disk_format: str | None = None
    """Glance ``disk_format`` (raw, qcow2, ...); None for EC2."""
    snapshot_id: str | None = None
    """EC2: the EBS snapshot behind the AMI's root device."""
    blocks_uploaded: int = 0
    """EC2: 512 KiB blocks written to the snapshot."""
    zero_blocks_skipped: int = 0
    """EC2: all-zero blocks not sent (EBS reads unwritten blocks as zeros)."""
    bytes_uploaded: int = 0
    """Bytes sent to the cloud (0 when `created` is False)."""
    seconds: float = 0.0
    """Wall time of the call."""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields (no credentials or endpoints: safe to print)."""
        return {
            "registered": True,
            "cloud": self.cloud,
            "id": self.id,
            "name": self.name,
            "sha1": self.sha1,
            "created": self.created,
            "disk_format": self.disk_format,
            "snapshot_id": self.snapshot_id,
            "blocks_uploaded": self.blocks_uploaded,
            "zero_blocks_skipped": self.zero_blocks_skipped,
            "bytes_uploaded": self.bytes_uploaded,
            "seconds": round(self.seconds, 3),
        }
