#!/usr/bin/env python3
"""A minimal, independent vmcast sender and receiver, written from docs/PROTOCOL.md alone.

Standard library only. It is meant to prove the protocol document is sufficient for interoperation:
it does not import anything from vmcast.

Command line::

    minimal_peer.py send    --group G --port P --cookie HEX16 --file PATH [--interface 127.0.0.1]
                            [--frame 1400] [--loops N | --seconds S] [--rate-mbit R]
    minimal_peer.py receive --group G --port P --cookie HEX16 --output PATH [--interface 127.0.0.1]
                            [--timeout 60]

The sender is a *minimal sender* (PROTOCOL.md section 3): its metadata is only ``{"len":..,"sha1":..}``, so
receivers must learn the frame size from data (section 4), and it sends every frame of every loop (it never
announces ``zero``). The receiver verifies by SHA-1 only; it validates the type and range of every field the
document defines (and detects conflicts on them), ignores unknown fields, and never checks XXH3 block sums (it has
no XXH3 implementation). It honours ``zero`` (section 5, "Zero blocks"): a block named there reads as zeros in the
output and counts as received, since its data frames never come; the whole-image SHA-1 still covers it. It honours
``zero_frames`` (section 5, "Zero frames") the same way, frame by frame: a frame named there that is not held reads
as zeros and counts as received.

Importable pieces (``from tests.interop.minimal_peer import ...``):

* ``encode_frame(cookie, offset, payload)``, ``encode_metadata(cookie, meta)``, ``metadata_payload(meta)``
* ``parse_datagram(datagram) -> (cookie, offset, payload) | None``
* ``parse_metadata(payload) -> dict`` (raises ``MalformedMetadata`` / ``UnsupportedVersion``)
* ``Receiver`` - the receiver state machine, fed datagrams with ``feed()``, writing into a binary file object
* ``run_sender(...)`` and ``run_receiver(...)`` - the socket loops used by the command line
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import signal
import socket
import struct
import sys
import time

__all__ = [
    "HEADER",
    "HEADER_LEN",
    "METADATA_OFFSET",
    "MAX_DATAGRAM",
    "MAX_FRAME",
    "EMPTY_SHA1",
    "MalformedMetadata",
    "UnsupportedVersion",
    "StreamFailed",
    "encode_frame",
    "encode_metadata",
    "metadata_payload",
    "parse_datagram",
    "parse_metadata",
    "parse_cookie",
    "Receiver",
    "run_sender",
    "run_receiver",
    "main",
]

HEADER = struct.Struct(">8sQ")  # cookie (8 bytes), offset (u64, big-endian)
HEADER_LEN = HEADER.size  # 16
METADATA_OFFSET = 0xFFFFFFFFFFFFFFFF
MAX_DATAGRAM = 65507  # IPv4 UDP payload limit
MAX_FRAME = MAX_DATAGRAM - HEADER_LEN  # 65491
MAX_LEN = 2**53
SUPPORTED_VERSION = 1
EMPTY_SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
_HEX = frozenset("0123456789abcdefABCDEF")

DROP_REASONS = (
    "too_short",
    "foreign_cookie",
    "malformed_metadata",
    "unsupported_version",
    "before_metadata",
    "empty_payload",
    "past_end",
    "misaligned",
)


class MalformedMetadata(ValueError):
    """The metadata payload is not a UTF-8 JSON object with well-typed, in-range fields."""


class UnsupportedVersion(ValueError):
    """The metadata frame's ``v`` is higher than this implementation speaks."""


class StreamFailed(Exception):
    """Metadata contradicted earlier accepted metadata of the same cookie (the image changed)."""

    def __init__(self, field: str, first, now):
        super().__init__(f"metadata conflict: field={field} first={first!r} now={now!r}")
        self.field = field
        self.first = first
        self.now = now


# --------------------------------------------------------------------------------------------- codec


def parse_cookie(text: str | bytes) -> bytes:
    """A cookie from 16 hex digits (or 8 raw bytes)."""
    if isinstance(text, bytes):
        if len(text) != 8:
            raise ValueError("a cookie is 8 bytes")
        return text
    raw = bytes.fromhex(text)
    if len(raw) != 8:
        raise ValueError("a cookie is 16 hex digits (8 bytes)")
    return raw


def encode_frame(cookie: bytes, offset: int, payload: bytes) -> bytes:
    """A datagram: the 16-byte header then the payload (a data frame unless offset == METADATA_OFFSET)."""
    if len(cookie) != 8:
        raise ValueError("cookie must be 8 bytes")
    if not 0 <= offset <= METADATA_OFFSET:
        raise ValueError("offset must fit in an unsigned 64-bit integer")
    datagram = HEADER.pack(cookie, offset) + bytes(payload)
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return datagram


def metadata_payload(meta: dict) -> bytes:
    """The JSON text vmcast's golden examples use: sorted keys, no spaces, UTF-8."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_metadata(cookie: bytes, meta: dict) -> bytes:
    return encode_frame(cookie, METADATA_OFFSET, metadata_payload(meta))


def parse_datagram(datagram: bytes):
    """``(cookie, offset, payload)``, or ``None`` when shorter than the header."""
    if len(datagram) < HEADER_LEN:
        return None
    cookie, offset = HEADER.unpack_from(datagram, 0)
    return cookie, offset, bytes(memoryview(datagram)[HEADER_LEN:])


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _is_int(value) -> bool:
    # JSON booleans decode to bool, a subclass of int in Python: they are not integers here.
    # A JSON number with a fraction or exponent (3005.0, 3.005e3) decodes to float and is rejected too.
    return isinstance(value, int) and not isinstance(value, bool)


def parse_metadata(payload: bytes) -> dict:
    """Decode and validate a metadata payload (section 3).

    Returns the decoded object (unknown fields kept, untouched). Raises ``MalformedMetadata`` for anything
    section 5 rule 3 calls malformed and ``UnsupportedVersion`` when ``v`` > 1.
    """
    try:
        text = bytes(payload).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedMetadata(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMetadata("not a JSON object")

    # Section 3: "A receiver checks `v` first, so a frame of a newer version is dropped as `unsupported_version`
    # whatever else it holds; then the other fields."
    if "v" in obj:
        version = obj["v"]
        if not (_is_int(version) and version >= 1):
            raise MalformedMetadata("v must be an integer >= 1")
        if version > SUPPORTED_VERSION:
            raise UnsupportedVersion(f"v={version}")

    sha1 = obj.get("sha1")
    if not (isinstance(sha1, str) and len(sha1) == 40 and set(sha1) <= _HEX):
        raise MalformedMetadata("sha1 must be 40 hex digits")
    length = obj.get("len")
    if not (_is_int(length) and 0 <= length < MAX_LEN):
        raise MalformedMetadata("len must be an integer in [0, 2**53)")
    if "frame" in obj:
        frame = obj["frame"]
        if not (_is_int(frame) and 1 <= frame <= MAX_FRAME):
            raise MalformedMetadata(f"frame must be an integer in [1, {MAX_FRAME}]")
    if "block" in obj:
        block = obj["block"]
        if not (_is_int(block) and block >= 1):
            raise MalformedMetadata("block must be a positive integer")
        if "frame" in obj and block % obj["frame"] != 0:
            raise MalformedMetadata("block must be a multiple of frame")
    if "xxh3" in obj:
        if "block" not in obj:
            raise MalformedMetadata("xxh3 without block")
        sums_obj = obj["xxh3"]
        if not isinstance(sums_obj, dict):
            raise MalformedMetadata("xxh3 must be an object")
        first = sums_obj.get("first")
        sums = sums_obj.get("sums")
        if not (_is_int(first) and first >= 0):
            raise MalformedMetadata("xxh3.first must be an integer >= 0")
        if not isinstance(sums, list):
            raise MalformedMetadata("xxh3.sums must be an array")
        for s in sums:
            if not (isinstance(s, str) and len(s) == 16 and set(s) <= _HEX):
                raise MalformedMetadata("each xxh3 sum is 16 hex digits")
        blocks = -(-length // obj["block"])
        if first + len(sums) > blocks:
            raise MalformedMetadata("xxh3 covers blocks past the end of the image")
    if "zero" in obj:
        # Section 3: [[block, count], ...] runs, each inside first .. first + len(sums) - 1 of this frame's xxh3.
        if "xxh3" not in obj:
            raise MalformedMetadata("zero without xxh3")
        runs = obj["zero"]
        if not isinstance(runs, list):
            raise MalformedMetadata("zero must be an array")
        low = obj["xxh3"]["first"]
        high = low + len(obj["xxh3"]["sums"])  # exclusive
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2 and _is_int(run[0]) and _is_int(run[1])):
                raise MalformedMetadata("each zero run is [block, count], two integers")
            start, count = run
            if count < 1:
                raise MalformedMetadata("a zero run's count must be >= 1")
            if start < low or start + count > high:
                raise MalformedMetadata("a zero run reaches outside this frame's xxh3 blocks")
    if "zero_frames" in obj:
        # Section 3: [[frame, count], ...] runs, ascending and apart, inside the frames of this frame's xxh3
        # blocks, none in a block this frame's `zero` names.
        if "xxh3" not in obj or "frame" not in obj:
            raise MalformedMetadata("zero_frames without xxh3")
        runs = obj["zero_frames"]
        if not isinstance(runs, list):
            raise MalformedMetadata("zero_frames must be an array")
        per_block = obj["block"] // obj["frame"]
        low = obj["xxh3"]["first"] * per_block
        high = min((obj["xxh3"]["first"] + len(obj["xxh3"]["sums"])) * per_block, -(-length // obj["frame"]))
        zero_blocks = {j for start, count in obj.get("zero", []) for j in range(start, start + count)}
        after_previous = low
        for run in runs:
            if not (isinstance(run, list) and len(run) == 2 and _is_int(run[0]) and _is_int(run[1])):
                raise MalformedMetadata("each zero_frames run is [frame, count], two integers")
            start, count = run
            if count < 1:
                raise MalformedMetadata("a zero_frames run's count must be >= 1")
            if start < after_previous or start + count > high:
                raise MalformedMetadata("zero_frames runs must be ascending, apart, inside this frame's xxh3 blocks")
            if any(k // per_block in zero_blocks for k in range(start, start + count)):
                raise MalformedMetadata("a zero_frames run lies in a block named in zero")
            after_previous = start + count
    for informational in ("name", "format"):
        if informational in obj and not isinstance(obj[informational], str):
            raise MalformedMetadata(f"{informational} must be a string")
    return obj


# --------------------------------------------------------------------------------------------- receiver


class Receiver:
    """Receiver state machine for one cookie (section 5), writing the image into ``out`` (a binary file).

    ``feed(datagram)`` returns ``True`` once the image is complete and verified by SHA-1. It raises
    ``StreamFailed`` on contradicting metadata. Drops are counted in ``self.drops`` by reason.
    """

    def __init__(self, cookie: bytes, out):
        self.cookie = parse_cookie(cookie)
        self.out = out
        self.drops = {reason: 0 for reason in DROP_REASONS}
        self.accepted_metadata = 0
        self.written = 0
        self.duplicates = 0
        self.sha1_mismatches = 0
        self.sha1: str | None = None  # lowercase
        self.length: int | None = None
        self.frame: int | None = None  # F, from metadata or learned from data
        self.frame_from_metadata = False
        self.block: int | None = None
        self.block_sums: dict[int, str] = {}
        self.zero_blocks: set[int] = set()  # blocks metadata named in `zero` (kept, like all metadata)
        self.zero_frames: set[int] = set()  # frames metadata named in `zero_frames` (kept too)
        self.zeroed_frames = 0  # of those, frames not held that were made zeros and counted received
        self.held: bytearray | None = None  # one byte per frame, 1 = held
        self.dirty: bytearray | None = None  # one byte per frame, 1 = payload bytes written there (not zeros)
        self.held_count = 0
        self.frames = 0
        self.complete = False
        self.verified_sha1: str | None = None

    # -- counters ------------------------------------------------------------------------------------

    def counters(self) -> dict:
        return {
            "drops": {k: v for k, v in self.drops.items() if v},
            "metadata": self.accepted_metadata,
            "written": self.written,
            "duplicates": self.duplicates,
            "sha1_mismatches": self.sha1_mismatches,
            "held": self.held_count,
            "frames": self.frames if self.frame else None,
            "frame_size": self.frame,
            "len": self.length,
            "zero_blocks": len(self.zero_blocks),
            "zero_frames": self.zeroed_frames,
        }

    # -- datagrams -----------------------------------------------------------------------------------

    def feed(self, datagram: bytes) -> bool:
        if self.complete:
            return True
        if len(datagram) < HEADER_LEN:
            self.drops["too_short"] += 1
            return False
        cookie, offset = HEADER.unpack_from(datagram, 0)
        if cookie != self.cookie:
            self.drops["foreign_cookie"] += 1
            return False
        payload = memoryview(datagram)[HEADER_LEN:]
        if offset == METADATA_OFFSET:
            return self._metadata(payload)
        return self._data(offset, payload)

    def _metadata(self, payload) -> bool:
        try:
            meta = parse_metadata(payload)
        except UnsupportedVersion:
            self.drops["unsupported_version"] += 1
            return False
        except MalformedMetadata:
            self.drops["malformed_metadata"] += 1
            return False

        sha1 = meta["sha1"].lower()
        if self.sha1 is None:
            self.sha1, self.length = sha1, meta["len"]
            self._prepare_target()
        else:
            if sha1 != self.sha1:
                raise StreamFailed("sha1", self.sha1, sha1)
            if meta["len"] != self.length:
                raise StreamFailed("len", self.length, meta["len"])
        if "frame" in meta:
            if self.frame is None:
                self._set_frame(meta["frame"])
                self.frame_from_metadata = True
            elif meta["frame"] != self.frame:
                # Either an earlier metadata frame said otherwise, or the data proved another F (section 4):
                # within a stream the frame size never changes.
                raise StreamFailed("frame", self.frame, meta["frame"])
        if "block" in meta:
            if self.block is None:
                self.block = meta["block"]
            elif meta["block"] != self.block:
                raise StreamFailed("block", self.block, meta["block"])
            if "xxh3" in meta:
                first = meta["xxh3"]["first"]
                for i, s in enumerate(meta["xxh3"]["sums"], start=first):
                    s = s.lower()
                    known = self.block_sums.setdefault(i, s)
                    if known != s:
                        raise StreamFailed(f"xxh3[{i}]", known, s)
        self.accepted_metadata += 1
        if self.length == 0:
            return self._verify()
        if "zero" in meta:
            # Section 5, "Zero blocks": their data frames never come; they read as zeros and count as received.
            # (zero is not among the fields whose change rule 3 calls a contradiction; a block once named stays.)
            for start, count in meta["zero"]:
                for j in range(start, start + count):
                    if j not in self.zero_blocks:
                        self.zero_blocks.add(j)
                        if self.frame is not None:
                            self._apply_zero_block(j)
        if "zero_frames" in meta:
            # Section 5, "Zero frames": their data never comes; they read as zeros and count as received.
            for start, count in meta["zero_frames"]:
                for k in range(start, start + count):
                    if k not in self.zero_frames:
                        self.zero_frames.add(k)
                        if self.frame is not None:
                            self._apply_zero_frame(k)
        return self._check_complete()

    def _prepare_target(self) -> None:
        """Make the output a fresh file of ``len`` bytes that reads as zeros (sparse where the OS allows)."""
        self.out.truncate(0)
        self.out.truncate(self.length)
        if self.length and self.out.seek(0, 2) < self.length:  # e.g. io.BytesIO does not grow on truncate
            self.out.seek(self.length - 1)
            self.out.write(b"\0")

    def _set_frame(self, frame: int) -> None:
        self.frame = frame
        self.frames = -(-self.length // frame)
        self.held = bytearray(self.frames)
        self.dirty = bytearray(self.frames)
        self.held_count = 0
        for j in sorted(self.zero_blocks):  # named before F was known (nothing was written yet)
            self._apply_zero_block(j)
        for k in sorted(self.zero_frames):
            self._apply_zero_frame(k)

    def _apply_zero_block(self, j: int) -> None:
        """Block ``j`` was named in ``zero``: make it read as zeros and count its frames as held, unless every
        frame of it is held already (then it is verified like any block: here, by the whole-image SHA-1)."""
        frame, block = self.frame, self.block
        start, end = j * block, min((j + 1) * block, self.length)
        first, last = start // frame, -(-end // frame)  # the frames that hold bytes of block j
        if self.held[first:last].count(0) == 0:
            return
        if self.dirty[first:last].find(1) != -1:
            self._zero_range(start, end)
            whole_from = -(-start // frame)  # frames lying wholly inside the block now read as zeros
            whole_to = last if end == self.length else end // frame
            if whole_to > whole_from:
                self.dirty[whole_from:whole_to] = bytes(whole_to - whole_from)
        if block % frame == 0:  # the block is exactly frames first .. last - 1
            self.held_count += self.held[first:last].count(0)
            self.held[first:last] = b"\x01" * (last - first)
            return
        for k in range(first, last):
            if self.held[k]:
                continue
            # Only when a sender broke "block is a multiple of frame" (F learned from data or from another metadata
            # frame): a frame straddling into a block not named zero is not held; its data still comes.
            lo, hi = k * frame, min((k + 1) * frame, self.length)
            if all(b in self.zero_blocks for b in range(lo // block, (hi - 1) // block + 1)):
                self.held[k] = 1
                self.held_count += 1

    def _apply_zero_frame(self, k: int) -> None:
        """Frame ``k`` was named in ``zero_frames``: unless held (then the SHA-1 judges its bytes), make it read as
        zeros and count it as held. Metadata names frames by the frame size it states, which is ours (rule 3)."""
        if k >= self.frames or self.held[k]:
            return
        if self.dirty[k]:
            self._zero_range(k * self.frame, min((k + 1) * self.frame, self.length))
            self.dirty[k] = 0
        self.held[k] = 1
        self.held_count += 1
        self.zeroed_frames += 1

    def _zero_range(self, start: int, end: int) -> None:
        chunk = bytes(min(end - start, 1 << 20))
        self.out.seek(start)
        while start < end:
            n = min(len(chunk), end - start)
            self.out.write(chunk[:n])
            start += n

    def _check_complete(self) -> bool:
        if self.frame is not None and self.frames and self.held_count == self.frames:
            return self._verify()
        return False

    def _data(self, offset: int, payload) -> bool:
        if self.length is None:
            self.drops["before_metadata"] += 1
            return False
        n = len(payload)
        if n == 0:
            self.drops["empty_payload"] += 1
            return False
        if offset + n > self.length:
            self.drops["past_end"] += 1
            return False
        end = offset + n
        if self.frame is None:
            # Section 4: learn F from the first frame that proves it; the proving frame itself is kept.
            if offset == 0 or (end < self.length and offset % n == 0):
                self._set_frame(n)
            else:
                self.drops["before_metadata"] += 1
                return False
        frame = self.frame
        if offset % frame or n > frame or (n < frame and end != self.length):
            self.drops["misaligned"] += 1
            return False
        k = offset // frame
        if self.held[k]:
            # Also a frame of a block named in `zero` (a sender may send it anyway): it counts as received already.
            self.duplicates += 1
            return self._check_complete()  # learning F from this frame may have completed the image by `zero`
        self.out.seek(offset)
        self.out.write(payload)
        self.held[k] = 1
        self.dirty[k] = 1
        self.held_count += 1
        self.written += 1
        return self._check_complete()

    def _verify(self) -> bool:
        self.out.flush()
        self.out.seek(0)
        digest = hashlib.sha1()
        remaining = self.length
        while remaining:
            chunk = self.out.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        got = digest.hexdigest()
        if remaining == 0 and got == self.sha1:
            self.complete = True
            self.verified_sha1 = got
            return True
        # Forget every frame and take them again on later loops (metadata and F are kept). The metadata kept
        # includes `zero`: those blocks are made zeros again and count as received, as their data never comes.
        self.sha1_mismatches += 1
        if self.held is not None:
            self.held = bytearray(self.frames)
            self.held_count = 0
            for j in sorted(self.zero_blocks):
                self._apply_zero_block(j)
            for k in sorted(self.zero_frames):
                self._apply_zero_frame(k)
        return False


# --------------------------------------------------------------------------------------------- sockets


def _multicast_receiver_socket(group: str, port: int, interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    except OSError:
        pass
    try:
        sock.bind((group, port))  # Linux: only this group's datagrams
    except OSError:
        sock.bind(("", port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return sock


def _multicast_sender_socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    except OSError:
        pass
    return sock


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def run_sender(
    group: str,
    port: int,
    cookie,
    path: str,
    interface: str = "127.0.0.1",
    frame: int = 1400,
    loops: int | None = None,
    seconds: float | None = None,
    rate_mbit: float | None = None,
    metadata_interval: float = 0.5,
    extra_metadata: dict | None = None,
) -> tuple[int, int]:
    """Send ``path`` as a carousel. Returns ``(loops begun, datagrams sent)``.

    Stops after ``loops`` loops, or after ``seconds`` seconds (possibly mid-loop), or never if neither is given
    (until SIGINT/SIGTERM when run as a script). ``rate_mbit`` paces the UDP payload bytes (header included).
    ``extra_metadata`` (for tests only) adds fields to the otherwise minimal metadata. This sender always sends
    every frame: it never skips blocks or frames, so it must not be used to announce ``zero`` or ``zero_frames``.
    """
    cookie = parse_cookie(cookie)
    if not 1 <= frame <= MAX_FRAME:
        raise ValueError(f"frame must be in [1, {MAX_FRAME}]")
    with open(path, "rb") as f:
        image = f.read()
    meta = {"sha1": hashlib.sha1(image).hexdigest(), "len": len(image)}
    if extra_metadata and ("zero" in extra_metadata or "zero_frames" in extra_metadata):
        raise ValueError("a minimal sender sends every frame, so it never announces zero blocks or frames")
    if extra_metadata:
        meta.update(extra_metadata)
    meta_datagram = encode_metadata(cookie, meta)
    view = memoryview(image)
    offsets = range(0, len(image), frame)

    sock = _multicast_sender_socket(interface)
    dest = (group, port)
    start = time.monotonic()
    deadline = start + seconds if seconds is not None else None
    sent_bytes = 0
    datagrams = 0
    loops_begun = 0

    def send(datagram: bytes) -> None:
        nonlocal sent_bytes, datagrams
        while True:
            try:
                sock.sendto(datagram, dest)
                break
            except (BlockingIOError, InterruptedError):
                time.sleep(0.0005)
            except OSError as exc:  # ENOBUFS: the kernel queue is full; back off and retry
                if exc.errno in (errno.ENOBUFS, errno.EAGAIN):
                    time.sleep(0.001)
                    continue
                raise
        datagrams += 1
        sent_bytes += len(datagram)
        if rate_mbit:
            due = start + sent_bytes * 8 / (rate_mbit * 1e6)
            delay = due - time.monotonic()
            if delay > 0.0005:
                time.sleep(delay)

    try:
        while loops is None or loops_begun < loops:
            if deadline is not None and time.monotonic() >= deadline:
                break
            loops_begun += 1
            send(meta_datagram)
            last_meta = time.monotonic()
            for offset in offsets:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now - last_meta >= metadata_interval:
                    send(meta_datagram)
                    last_meta = now
                send(encode_frame(cookie, offset, view[offset : offset + frame]))
            else:
                if not offsets and loops is None:
                    # Empty image, endless carousel: only metadata, keep it to a few per second.
                    time.sleep(metadata_interval)
                continue
            break
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        sock.close()
    return loops_begun, datagrams


def run_receiver(
    group: str,
    port: int,
    cookie,
    output: str,
    interface: str = "127.0.0.1",
    timeout: float = 60.0,
) -> tuple[int, Receiver]:
    """Receive into ``output``. Returns ``(exit code, receiver)``: 0 verified, 1 timeout, 2 stream failed."""
    sock = _multicast_receiver_socket(group, port, interface)
    buf = bytearray(65536)
    deadline = time.monotonic() + timeout
    with open(output, "w+b") as out:
        receiver = Receiver(parse_cookie(cookie), out)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return 1, receiver
                sock.settimeout(remaining)
                try:
                    n = sock.recv_into(buf)
                except socket.timeout:
                    return 1, receiver
                try:
                    if receiver.feed(bytes(buf[:n])):
                        return 0, receiver
                except StreamFailed as exc:
                    receiver.failure = exc
                    return 2, receiver
        except (_Stop, KeyboardInterrupt):
            return 1, receiver
        finally:
            sock.close()


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Minimal independent vmcast peer (from PROTOCOL.md only)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--group", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cookie", required=True, help="16 hex digits")
        p.add_argument("--interface", default="127.0.0.1")

    s = sub.add_parser("send")
    common(s)
    s.add_argument("--file", required=True)
    s.add_argument("--frame", type=int, default=1400)
    stop = s.add_mutually_exclusive_group()
    stop.add_argument("--loops", type=int)
    stop.add_argument("--seconds", type=float)
    s.add_argument("--rate-mbit", type=float)

    r = sub.add_parser("receive")
    common(r)
    r.add_argument("--output", required=True)
    r.add_argument("--timeout", type=float, default=60.0)

    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_stop)

    if args.command == "send":
        loops, datagrams = run_sender(
            args.group, args.port, args.cookie, args.file, interface=args.interface, frame=args.frame,
            loops=args.loops, seconds=args.seconds, rate_mbit=args.rate_mbit,
        )
        print(f"sent loops={loops} datagrams={datagrams}", flush=True)
        return 0

    code, receiver = run_receiver(
        args.group, args.port, args.cookie, args.output, interface=args.interface, timeout=args.timeout,
    )
    counters = json.dumps(receiver.counters(), sort_keys=True)
    if code == 0:
        print(f"verified sha1={receiver.verified_sha1}", flush=True)
        print(f"counters {counters}", flush=True)
    elif code == 2:
        print(f"failed {receiver.failure}", flush=True)
        print(f"counters {counters}", flush=True)
    else:
        print(f"timeout counters {counters}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
