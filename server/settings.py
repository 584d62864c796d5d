"""The server's settings: one `BaseSettings` class, read from `vmcast serve` options or ``VMCAST_*`` variables.

The API reaches them through the `get_settings` dependency, which tests override
(``app.dependency_overrides[get_settings] = lambda: Settings(...)``, or `create_app(settings)`).
Every field is parsed into its type here, at the boundary, with a message that says what is wrong.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from vmcast.protocol import HEADER_SIZE

from .defaults import MAX_PAYLOAD
from .rates import parse_rate

# IPv4 and UDP headers add 28 bytes to every datagram; a 1500-byte Ethernet MTU leaves 1472 bytes of UDP
# payload, of which our frame header takes 16: payloads above 1456 bytes need jumbo frames or fragmentation.
IP_UDP_HEADER_SIZE = 28
ETHERNET_MTU = 1500
LARGEST_UNFRAGMENTED_PAYLOAD = ETHERNET_MTU - IP_UDP_HEADER_SIZE - HEADER_SIZE
# HTTP range downloads (the unicast fallback) share this much by default: a fifth of a 1 Gbit/s link, so that
# receivers fetching what they missed never starve the multicast streams they missed it from.
DEFAULT_REPAIR_RATE = 200 * 10**6
STATE_DB_NAME = "state.sqlite3"

# 224.0.0.0/24 is the local network control block (all-hosts, all-routers, OSPF, ...): never a stream's group.
_RESERVED_GROUPS = ipaddress.IPv4Network("224.0.0.0/24")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vmcast"


class Settings(BaseSettings):
    """What `vmcast serve` serves and how it sends."""

    model_config = SettingsConfigDict(env_prefix="VMCAST_", frozen=True)

    images_dir: Path = Field(description="Directory of the images to serve; an image's name is its file name.")
    host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(8470, ge=0, le=65535, description="TCP port of the HTTP API (0 picks a free one).")
    interface: str = Field(
        "127.0.0.1",
        description="Where multicast leaves this machine: an IPv4 address of this machine or an interface name (eth0).",
    )
    group_range: ipaddress.IPv4Network = Field(
        ipaddress.IPv4Network("239.255.0.0/16"),
        description="IPv4 multicast range the streams' groups are taken from, one group per stream.",
    )
    mcast_port: int = Field(8471, ge=1, le=65535, description="UDP destination port of every stream.")
    rate: int = Field(
        10**9, ge=0, description="Send rate of each stream in bits/s, IP and UDP headers included; 0 = unpaced."
    )
    payload: int = Field(1400, ge=1, le=MAX_PAYLOAD, description="Image bytes per data datagram (frame size).")
    ttl: int = Field(1, ge=0, le=255, description="IP multicast TTL: 1 stays on the local network segment.")
    gso: bool = Field(
        True,
        description=(
            "Send data frames in UDP GSO batches (many datagrams per system call) where the kernel allows it; "
            "the datagrams on the wire are the same."
        ),
    )
    fec: bool = Field(
        True,
        description=(
            "Answer repair requests with RaptorQ parity (one parity frame repairs any one lost frame of a block, "
            "at every receiver) where the stream's frame size allows it; False: always resend the lost frames."
        ),
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir, description="Where converted images and manifests are kept."
    )
    qemu_img: str = Field("qemu-img", description="The qemu-img executable (a name looked up in PATH, or a path).")
    repair_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "UDP port, on --host, where receivers send repair requests (docs/PROTOCOL.md section 7); "
            "None: the same number as the HTTP port; 0 picks a free one."
        ),
    )
    repair_rate: int = Field(
        DEFAULT_REPAIR_RATE,
        ge=0,
        description="Bits/s shared by every HTTP range download (GET /v1/streams/{id}/data); 0 = unlimited.",
    )
    lease_ttl: float = Field(
        30.0, gt=0, le=86400, description="Seconds a lease lives without a renewal (POST /v1/leases/{id}/renew)."
    )
    state_db: Path | None = Field(
        None, description="SQLite database of streams and leases, kept across restarts; None: <cache_dir>/state.sqlite3."
    )

    @field_validator("images_dir")
    @classmethod
    def _images_dir_exists(cls, value: Path) -> Path:
        value = value.expanduser()
        if not value.exists():
            raise ValueError(f"images directory {str(value)!r} does not exist")
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory")
        return value.resolve()

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("state_db")
    @classmethod
    def _state_db_absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @property
    def state_db_path(self) -> Path:
        """Where the streams and leases are kept: `state_db`, or ``<cache_dir>/state.sqlite3``."""
        return self.state_db if self.state_db is not None else self.cache_dir / STATE_DB_NAME

    def resolved_repair_port(self, http_port: int) -> int:
        """The UDP port to bind for repair requests, given the TCP port the API actually listens on."""
        return http_port if self.repair_port is None else self.repair_port

    @field_validator("group_range", mode="before")
    @classmethod
    def _parse_group_range(cls, value: object) -> ipaddress.IPv4Network:
        if isinstance(value, ipaddress.IPv4Network):
            network = value
        else:
            text = str(value).strip()
            try:
                network = ipaddress.IPv4Network(text)
            except ipaddress.NetmaskValueError as error:
                raise ValueError(f"{text!r} has a bad prefix length: {error}") from None
            except ValueError as error:
                if "host bits set" in str(error):
                    suggestion = ipaddress.IPv4Network(text, strict=False)
                    raise ValueError(f"{text!r} has host bits set; did you mean {suggestion}?") from None
                raise ValueError(f"{text!r} is not an IPv4 network such as 239.255.0.0/16") from None
        if not network.is_multicast:
            raise ValueError(f"{network} is not inside the IPv4 multicast range 224.0.0.0/4 (try 239.255.0.0/16)")
        if network.overlaps(_RESERVED_GROUPS):
            raise ValueError(
                f"{network} overlaps 224.0.0.0/24, reserved for local network control; use e.g. 239.255.0.0/16"
            )
        return network

    @field_validator("rate", "repair_rate", mode="before")
    @classmethod
    def _parse_rate(cls, value: object) -> int:
        if isinstance(value, (str, int)):
            return parse_rate(value)
        raise ValueError(f"not a rate: {value!r}")


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment (``VMCAST_IMAGES_DIR``, ...); the API's dependency, overridden by tests."""
    return Settings()  # type: ignore[call-arg]  # images_dir comes from the environment


def payload_warning(payload: int) -> str | None:
    """A warning when datagrams of this payload do not fit a standard 1500-byte Ethernet MTU, else None."""
    if payload <= LARGEST_UNFRAGMENTED_PAYLOAD:
        return None
    datagram = payload + HEADER_SIZE + IP_UDP_HEADER_SIZE
    return (
        f"payload {payload} makes {datagram}-byte IP datagrams, more than a {ETHERNET_MTU}-byte Ethernet MTU carries: "
        f"the network needs jumbo frames, or IP will fragment every datagram (a lost fragment loses the whole "
        f"datagram). Payloads up to {LARGEST_UNFRAGMENTED_PAYLOAD} fit."
    )
