"""Runners for the peer tools vmcast is measured against, inside a :class:`~benchmarks.testbed.TestBed`.

Each runner sends one image from the bed's sender to all its receivers with
one tool and returns a :class:`PeerResult`:

* :func:`run_udpcast` — ``udp-sender`` / ``udp-receiver`` (multicast, NAK/ACK
  slices),
* :func:`run_uftp` — ``uftp`` / ``uftpd`` (multicast, closed group, NAK
  passes),
* :func:`run_http` — one threaded HTTP server, every receiver downloading
  with ``curl`` at once (the unicast baseline: the sender's uplink is shared).

What is measured, the same way for every tool:

``seconds_until_all_verified``
    From starting the transfer (the receiving side is already up and waiting,
    as it would be in a deployment) until the last receiver's file was read
    back and its SHA-1 matched. ``None`` when some receiver never verified.
``seconds_until_last_finished``
    From the same start until the last receiver *finished*: exited with its
    copy (udp-receiver, curl, vmcast receive) or reported it complete
    (uftpd's status file). For vmcast that includes the receiver's own SHA-1
    verification and fsync; for the peers neither. ``None`` likewise.
``per_receiver_sha1_ok``
    SHA-1 of each receiver's output against the expected one; exit statuses
    are not trusted (udpcast's says nothing about completeness).
``sender_wire_bytes``
    ``tx_bytes`` of the sender's ``lan0`` over the run, Ethernet headers
    included: data, retransmissions and control traffic.
``sender_packets``
    ``tx_packets`` of the same interface over the same time: what takes
    the Ethernet, IP and UDP (TCP) headers out of ``sender_wire_bytes``
    (:func:`packet_header_bytes`), leaving the bytes the tool itself sent.
``cpu_seconds``
    user + system CPU of every tool process (sender and receivers), taken
    from ``wait4`` when each is reaped. Our own SHA-1 checking is excluded.

Run ``python -m benchmarks.peers --size-mib 256 --receivers 4 --rate-mbit 300``
(as root) to compare all three on a fresh bed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.testbed import Host, LinkSpec, TestBed, testbed_available

__all__ = [
    "PEER_RUNNERS",
    "DataFrame",
    "PeerResult",
    "ToolSession",
    "make_random_image",
    "peer_data_frame",
    "run_http",
    "run_udpcast",
    "run_uftp",
    "sha1_of_file",
]

HTTP_PORT = 8080
UFTP_PORT = 1044
# Tools are asked for big socket buffers; the bed raises the kernel caps to match.
SOCKET_BUFFER_BYTES = 32 * 1024 * 1024
POLL_INTERVAL_SECONDS = 0.02
PROCESS_STOP_GRACE_SECONDS = 3.0
READINESS_TIMEOUT_SECONDS = 15.0
LOG_TAIL_CHARACTERS = 600
HASH_CHUNK_BYTES = 4 * 1024 * 1024
ORPHANED_RECEIVER_GRACE_SECONDS = 10.0


# Bytes every frame carries on the bed's links besides its IP packet, as tbf meters it: the Ethernet header
# (no preamble, FCS or gap on a veth).
ETHERNET_HEADER_BYTES = 14
IPV4_HEADER_BYTES = 20
UDP_HEADER_BYTES = 8
# TCP header with the timestamp option Linux sends by default: MSS = MTU - 20 - 32.
TCP_HEADER_BYTES = 32
# udp-sender's data datagrams: its default (and largest) --blocksize of image bytes after a 16-byte header
# (udpcast's struct dataBlock: opCode, reserved, sliceNo, blockNo, reserved2, bytes), 1472 bytes of UDP
# payload: a 1500-byte IP packet. Measured here: wire/img 1.041 at 0% loss (control traffic included).
UDPCAST_BLOCK_BYTES = 1456
UDPCAST_HEADER_BYTES = 16
# uftp's FILESEG datagrams, unencrypted: struct uftp_h (16 bytes) + struct fileseg_h (8) before the block
# (uftp.h, UFTP 4.x). Measured here: wire/img 1.047 at 0% loss with 1400-byte blocks.
UFTP_HEADER_BYTES = 16 + 8


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DataFrame:
    """What a tool's full-size data carries on the wire: image bytes per frame, and the frame's bytes."""

    payload: int
    """Image bytes in one full data datagram (or TCP segment)."""
    wire: int
    """Bytes on the link for it, every header included (Ethernet as tbf meters it; all IP fragments)."""

    @property
    def ratio(self) -> float:
        """Wire bytes per image byte: the least any transfer at the link rate takes over image bits / rate."""
        return self.wire / self.payload


def peer_data_frame(tool: str, *, mtu: int) -> DataFrame:
    """The full-size data frame of a peer tool as this module runs it (udpcast, uftp, http) on a link of ``mtu``."""
    if tool == "udpcast":
        return DataFrame(payload=UDPCAST_BLOCK_BYTES,
                         wire=UDPCAST_BLOCK_BYTES + UDPCAST_HEADER_BYTES + UDP_HEADER_BYTES + IPV4_HEADER_BYTES + ETHERNET_HEADER_BYTES)  # fmt: skip
    if tool == "uftp":
        block = uftp_block_bytes(mtu)
        return DataFrame(payload=block, wire=block + UFTP_HEADER_BYTES + UDP_HEADER_BYTES + IPV4_HEADER_BYTES + ETHERNET_HEADER_BYTES)
    if tool == "http":
        return DataFrame(payload=mtu - IPV4_HEADER_BYTES - TCP_HEADER_BYTES, wire=mtu + ETHERNET_HEADER_BYTES)
    raise ValueError(f"no data frame known for {tool!r}")


def packet_header_bytes(tool: str) -> int:
    """Bytes of every packet a tool's sender puts on the bed's link that the tool itself did not send:
    Ethernet, IPv4 and UDP headers (TCP with timestamps for http). Taking them out of the wire bytes leaves
    the datagrams' (segments') payloads: the tool's own headers, data, repairs and control messages."""
    transport = TCP_HEADER_BYTES if tool == "http" else UDP_HEADER_BYTES
    return ETHERNET_HEADER_BYTES + IPV4_HEADER_BYTES + transport


@dataclasses.dataclass(frozen=True, slots=True)
class PeerResult:
    """The outcome of sending one image to every receiver with one peer tool."""

    tool: str
    seconds_until_all_verified: float | None
    per_receiver_sha1_ok: list[bool]
    sender_wire_bytes: int
    cpu_seconds: float
    notes: str
    seconds_until_last_finished: float | None = None
    """Start to the last receiver's finishing with its copy (see the module docstring); None unless all verified."""
    sender_packets: int = 0
    """Packets the sender put on its link over the same time as `sender_wire_bytes`."""
    allocated_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per receiver, the bytes its copy had allocated on disk when it was checked (less than the image: holes)."""

    def sender_payload_bytes(self) -> int:
        """What the tool itself sent: the wire bytes less each packet's Ethernet, IPv4 and UDP (TCP) headers."""
        return self.sender_wire_bytes - self.sender_packets * packet_header_bytes(self.tool)

    @property
    def all_verified(self) -> bool:
        return self.seconds_until_all_verified is not None

    def summary_line(self, image_bytes: int | None = None) -> str:
        """One human-readable line, e.g. for the benchmark's console output."""
        seconds = f"{self.seconds_until_all_verified:7.2f}s" if self.all_verified else "  FAILED"
        finished = f"{self.seconds_until_last_finished:7.2f}s" if self.seconds_until_last_finished is not None else "      -"
        oks = "".join("+" if ok else "-" for ok in self.per_receiver_sha1_ok)
        wire = f"{self.sender_wire_bytes / 2**20:8.1f} MiB"
        if image_bytes:
            wire += f" ({self.sender_wire_bytes / image_bytes:.2f}x image)"
        return (
            f"{self.tool:8s} all_verified={seconds} last_finished={finished} sha1_ok=[{oks}] sender_wire={wire} "
            f"cpu={self.cpu_seconds:6.2f}s notes: {self.notes}"
        )


def sha1_of_file(path: Path) -> str:
    """Hex SHA-1 of a file ('' when it does not exist)."""
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as stream:
            # hashlib releases the GIL for large updates, so several receivers'
            # files hash in parallel on the thread pool.
            while chunk := stream.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except FileNotFoundError:
        return ""
    return digest.hexdigest()


def make_random_image(path: Path, size_bytes: int) -> str:
    """Write ``size_bytes`` of random data to ``path``; return its SHA-1.

    Random data is incompressible, so no tool can win by compressing.
    """
    digest = hashlib.sha1()
    remaining = size_bytes
    with open(path, "wb") as stream:
        while remaining > 0:
            chunk = os.urandom(min(HASH_CHUNK_BYTES, remaining))
            stream.write(chunk)
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _timed_sha1_of_file(path: Path) -> tuple[str, float, int]:
    """The copy's SHA-1, when it was done, and the bytes the copy has allocated on disk (holes are not)."""
    digest = sha1_of_file(path)
    try:
        allocated = path.stat().st_blocks * 512
    except OSError:
        allocated = 0
    return digest, time.monotonic(), allocated


class ToolSession:
    """Processes, logs, clock and SHA-1 checks of one tool's run (the peers' and vmcast's alike, so that their
    numbers are taken the same way).

    Error handling:
        Nothing here raises for a failing tool: failures end up as
        ``per_receiver_sha1_ok`` entries of ``False`` and text in ``notes``.
        Only a broken environment (a tool that cannot be executed) raises.

    Resource handling:
        A context manager. On exit every process it started that is still
        running gets SIGTERM, then SIGKILL after a grace period (by PID), and
        is reaped so its CPU time is counted; the work directory is removed
        unless ``keep_work_dir``; the hashing threads are joined.
    """

    def __init__(self, bed: TestBed, tool: str, expected_sha1: str, timeout: float, work_dir: Path | None,
                 keep_work_dir: bool) -> None:  # fmt: skip
        self.bed = bed
        self.tool = tool
        self.expected_sha1 = expected_sha1
        self.timeout = timeout
        self.notes: list[str] = []
        self.cpu_seconds = 0.0
        self._keep_work_dir = keep_work_dir
        # mkdtemp, not TemporaryDirectory: the latter's finalizer would delete
        # a directory the caller asked to keep.
        self.dir = Path(tempfile.mkdtemp(prefix=f"vmcast-{tool}-", dir=work_dir))
        self._processes: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._hashers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{tool}-sha1")
        # Each future yields (sha1 hex, monotonic time the hash was finished, bytes the copy allocated).
        self._hash_futures: dict[int, concurrent.futures.Future[tuple[str, float, int]]] = {}
        self._finished_at: dict[int, float] = {}
        self.started_at: float | None = None
        self._tx_at_start = (0, 0)  # (bytes, packets)
        self._rcvbuf_errors_at_start: list[int] = []
        if keep_work_dir:
            self.notes.append(f"work dir kept: {self.dir}")

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_all()
        finally:
            self._hashers.shutdown(wait=True, cancel_futures=True)
            if not self._keep_work_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ---- processes

    def start(self, host: Host, argv: Sequence[str], label: str) -> subprocess.Popen:
        """Start a tool in ``host``'s namespace, its output going to ``<label>.log``."""
        log_path = self.dir / f"{label}.log"
        with open(log_path, "wb") as log:
            process = host.popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._processes[label] = process
        self._logs[label] = log_path
        return process

    def reap(self) -> None:
        """Collect exit status and CPU time of every process that has exited (non-blocking)."""
        for process in self._processes.values():
            if process.returncode is None:
                self._reap_one(process, os.WNOHANG)

    def _reap_one(self, process: subprocess.Popen, options: int) -> bool:
        # wait4 instead of Popen.wait: it hands over the child's own rusage,
        # which RUSAGE_CHILDREN deltas would mix up with anything else this
        # process (a test runner, say) reaps meanwhile.
        try:
            pid, status, usage = os.wait4(process.pid, options)
        except ChildProcessError:
            # Reaped elsewhere (e.g. by Popen.poll); its CPU time is lost.
            if process.returncode is None:
                process.returncode = -1
            self.notes.append(f"pid {process.pid} reaped elsewhere; its CPU not counted")
            return True
        if pid == 0:
            return False
        process.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_seconds += usage.ru_utime + usage.ru_stime
        return True

    def exited(self, label: str) -> bool:
        return self._processes[label].returncode is not None

    def returncode(self, label: str) -> int | None:
        return self._processes[label].returncode

    def stop(self, label: str) -> None:
        self._stop([self._processes[label]])

    def stop_all(self) -> None:
        self._stop(list(self._processes.values()))

    def _stop(self, processes: list[subprocess.Popen]) -> None:
        self.reap()
        running = [p for p in processes if p.returncode is None]
        for signum, grace in ((signal.SIGTERM, PROCESS_STOP_GRACE_SECONDS), (signal.SIGKILL, PROCESS_STOP_GRACE_SECONDS)):
            for process in running:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while running and time.monotonic() < deadline:
                running = [p for p in running if not self._reap_one(p, os.WNOHANG)]
                if running:
                    time.sleep(POLL_INTERVAL_SECONDS)
            if not running:
                return

    def wait_for_exit(self, label: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reap()
            if self.exited(label):
                return True
            time.sleep(POLL_INTERVAL_SECONDS)
        return False

    def log_tail(self, label: str) -> str:
        try:
            text = self._logs[label].read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text[-LOG_TAIL_CHARACTERS:].split())

    # ---- clock, counters, verification

    def start_clock(self) -> None:
        self._rcvbuf_errors_at_start = [r.rcvbuf_errors() for r in self.bed.receivers]
        self._tx_at_start = self.bed.sender.tx_counters()
        self.started_at = time.monotonic()

    def seconds_left(self) -> float:
        assert self.started_at is not None
        return self.timeout - (time.monotonic() - self.started_at)

    def verify(self, receiver_index: int, path: Path) -> None:
        """Start checking one receiver's output (once); call when it is complete."""
        if receiver_index in self._hash_futures:
            return
        self._finished_at[receiver_index] = time.monotonic()
        self._hash_futures[receiver_index] = self._hashers.submit(_timed_sha1_of_file, path)

    def verification_started(self, receiver_index: int) -> bool:
        return receiver_index in self._hash_futures

    def all_hashes_done(self) -> bool:
        receivers = len(self.bed.receivers)
        return len(self._hash_futures) == receivers and all(f.done() for f in self._hash_futures.values())

    def run_until(self, receiver_finished: Callable[[int], Path | None], *, also_wait_for: Sequence[str] = ()) -> bool:
        """Poll until every receiver is finished and checked, or the timeout.

        ``receiver_finished(i)`` returns the output path of receiver ``i``
        once it has finished (successfully or not), else ``None``. Returns
        False on timeout.
        """
        while self.seconds_left() > 0:
            self.reap()
            for index in range(len(self.bed.receivers)):
                if not self.verification_started(index):
                    path = receiver_finished(index)
                    if path is not None:
                        self.verify(index, path)
            if self.all_hashes_done() and all(self.exited(label) for label in also_wait_for):
                return True
            time.sleep(POLL_INTERVAL_SECONDS)
        self.notes.append(f"timeout after {self.timeout:g}s")
        return False

    def result(self) -> PeerResult:
        """Build the result; call after the tool processes were stopped."""
        if self.started_at is None:  # the tool never got started
            self._tx_at_start = self.bed.sender.tx_counters()
            self._rcvbuf_errors_at_start = [r.rcvbuf_errors() for r in self.bed.receivers]
        tx_bytes, tx_packets = (now - before for now, before in zip(self.bed.sender.tx_counters(), self._tx_at_start, strict=True))
        oks = []
        hashed_at = []
        allocated = []
        for index in range(len(self.bed.receivers)):
            future = self._hash_futures.get(index)
            if future is not None and future.done() and future.exception() is None:
                digest, finished, copy_allocated = future.result()
                oks.append(digest == self.expected_sha1)
                hashed_at.append(finished)
                allocated.append(copy_allocated)
            else:
                oks.append(False)
                allocated.append(0)
        seconds = finished = None
        if all(oks) and self.started_at is not None:
            seconds = max(hashed_at) - self.started_at
            finished = max(self._finished_at.values()) - self.started_at
        if self._finished_at and self.started_at is not None:
            # Split the headline number: the transfer proper vs. reading back
            # and hashing the outputs (the same cost for every tool).
            transfer_seconds = max(self._finished_at.values()) - self.started_at
            self.notes.insert(0, f"{tx_bytes * 8 / transfer_seconds / 1e6:.0f} Mbit/s sender wire average until the "
                                 f"last receiver finished ({transfer_seconds:.2f}s)")  # fmt: skip
        rcvbuf_errors = [
            r.rcvbuf_errors() - before for r, before in zip(self.bed.receivers, self._rcvbuf_errors_at_start, strict=True)
        ]
        if any(rcvbuf_errors):
            self.notes.append(f"receiver RcvbufErrors {rcvbuf_errors}")
        return PeerResult(
            tool=self.tool,
            seconds_until_all_verified=seconds,
            per_receiver_sha1_ok=oks,
            sender_wire_bytes=tx_bytes,
            sender_packets=tx_packets,
            allocated_bytes=allocated,
            cpu_seconds=round(self.cpu_seconds, 3),
            notes="; ".join(self.notes) or "-",
            seconds_until_last_finished=finished,
        )


def _bitrate_for(rate_mbit: float | None, fraction: float) -> float | None:
    return None if rate_mbit is None else rate_mbit * fraction


# --------------------------------------------------------------------------- udpcast

# Pacing a few percent under the link leaves room for the Ethernet/IP/UDP
# headers the tbf meters, so udpcast's bursts do not overflow the tbf queue
# (which would look like loss). Measured here (128 MiB, 4 receivers, 300
# Mbit/s): fractions 0.95-1.03 all finish within noise of each other; the
# slice/ACK round trips, not the pacing, limit udpcast to ~270 Mbit/s.
UDPCAST_RATE_FRACTION = 0.95
UDPCAST_HELLO_INTERVAL_MS = 100


def run_udpcast(
    bed: TestBed,
    image_path: Path,
    expected_sha1: str,
    rate_mbit: float | None,
    timeout: float,
    *,
    work_dir: Path | None = None,
    keep_work_dir: bool = False,
    extra_sender_args: Sequence[str] = (),
    rate_fraction: float = UDPCAST_RATE_FRACTION,
) -> PeerResult:
    """Send ``image_path`` with udp-sender to a udp-receiver in every receiver namespace.

    The sender paces at ``rate_mbit`` x :data:`UDPCAST_RATE_FRACTION` (no
    pacing if None), starts once all receivers have connected, and uses
    ``--nopointopoint`` so a single receiver still gets multicast.

    Error handling:
        A tool failure or timeout shows as ``False`` in
        ``per_receiver_sha1_ok``, ``seconds_until_all_verified=None`` and
        exit codes/log tails in ``notes``.

    Resource handling:
        All processes are stopped and the work directory (receivers'
        outputs, logs) removed before returning, unless ``keep_work_dir``.
    """
    image_path = Path(image_path)
    receiver_count = len(bed.receivers)
    with ToolSession(bed, "udpcast", expected_sha1, timeout, work_dir, keep_work_dir) as session:
        outputs = [session.dir / f"receiver{i}.img" for i in range(receiver_count)]
        common = ["--interface", bed.sender.interface, "--nokbd", "--no-progress"]
        for index, (receiver, output) in enumerate(zip(bed.receivers, outputs, strict=True)):
            session.start(receiver, ["udp-receiver", *common, "--file", str(output),
                                     "--rcvbuf", str(SOCKET_BUFFER_BYTES),
                                     "--start-timeout", str(max(1, int(timeout)))],
                          f"receiver{index}")  # fmt: skip
        # Receivers only need their socket bound before the sender's HELLO;
        # a short pause keeps the rendezvous out of the measurement's noise.
        time.sleep(0.3)
        sender_args = ["udp-sender", *common, "--file", str(image_path), "--nopointopoint",
                       "--full-duplex",  # veth/bridge links are full duplex
                       "--min-receivers", str(receiver_count), "--max-wait", str(max(1, int(timeout))),
                       "--start-timeout", str(max(1, int(timeout))),
                       # Without a hello interval udp-sender re-checks --min-receivers only
                       # after 2 s without any control traffic, which would add ~2 s of idle
                       # time to every run; with it, it checks every interval.
                       "--rexmit-hello-interval", str(UDPCAST_HELLO_INTERVAL_MS)]  # fmt: skip
        bitrate = _bitrate_for(rate_mbit, rate_fraction)
        if bitrate is not None:
            # udpcast parses only integers (optionally with k/m), so give bits/s.
            sender_args += ["--max-bitrate", str(int(bitrate * 1e6))]
        sender_args += list(extra_sender_args)
        session.start_clock()
        session.start(bed.sender, sender_args, "sender")
        sender_exited_at: list[float] = []

        def receiver_finished(index: int) -> Path | None:
            if session.exited(f"receiver{index}"):
                return outputs[index]
            # A receiver whose sender is gone can only wait for its own
            # --start-timeout; cut that short once the stragglers had a
            # fair chance to finish the final handshake.
            if session.exited("sender"):
                if not sender_exited_at:
                    sender_exited_at.append(time.monotonic())
                elif time.monotonic() - sender_exited_at[0] > ORPHANED_RECEIVER_GRACE_SECONDS:
                    session.notes.append(f"receiver{index} still running {ORPHANED_RECEIVER_GRACE_SECONDS:g}s after the sender")
                    session.stop(f"receiver{index}")
                    return outputs[index]
            return None

        session.run_until(receiver_finished, also_wait_for=["sender"])
        session.wait_for_exit("sender", min(10.0, max(0.0, session.seconds_left())))
        session.stop_all()
        _note_exit_codes(session, ["sender", *(f"receiver{i}" for i in range(receiver_count))])
        return session.result()


def _note_exit_codes(session: ToolSession, labels: Sequence[str]) -> None:
    codes = {label: session.returncode(label) for label in labels}
    bad = {label: code for label, code in codes.items() if code not in (0, None)}
    if bad:
        session.notes.append("exit codes " + ", ".join(f"{label}={code}" for label, code in bad.items()))
        for label in bad:
            session.notes.append(f"{label} log: …{session.log_tail(label)}")


# --------------------------------------------------------------------------- uftp

# uftp's -R paces its data blocks, not Ethernet frames: -R 285000 with
# 1400-byte blocks sends a packet every 39.8 us, ~298 Mbit/s on the wire once
# uftp, UDP, IP and Ethernet headers are added. So 0.95 of the link rate puts
# uftp right at the link rate on the wire.
UFTP_RATE_FRACTION = 0.95
UFTP_HEADER_ROOM_BYTES = 100  # the man page: block size 100-200 bytes under the path MTU
UFTP_MAX_BLOCK_BYTES = 8800  # uftp 4.10 refuses -b 8801 and above ("Invalid blocksize"): MTU 9000 gets 8800


def uftp_block_bytes(mtu: int) -> int:
    """uftp's -b for a link of `mtu`: 100 bytes under it, at most what uftp takes."""
    return min(mtu - UFTP_HEADER_ROOM_BYTES, UFTP_MAX_BLOCK_BYTES)


def _uftp_client_id(receiver_index: int) -> str:
    return f"0x{receiver_index + 1:08x}"


def run_uftp(
    bed: TestBed,
    image_path: Path,
    expected_sha1: str,
    rate_mbit: float | None,
    timeout: float,
    *,
    work_dir: Path | None = None,
    keep_work_dir: bool = False,
    extra_sender_args: Sequence[str] = (),
    rate_fraction: float = UFTP_RATE_FRACTION,
) -> PeerResult:
    """Send ``image_path`` with uftp to a uftpd in every receiver namespace (closed group).

    Each uftpd runs in the foreground (``-d``) with its own client id
    (``-U``), destination directory (``-D``) and status file (``-F``); a
    receiver counts as finished when its status file reports the file's
    RESULT (or uftp has exited). The sender lists all ids (``-H``), so it
    waits for all of them, sends at ``rate_mbit`` x :data:`UFTP_RATE_FRACTION`
    in Kbps (``-R``; ``-1``, i.e. unpaced, if None) with blocks of MTU - 100
    bytes, unencrypted.

    Error handling and resource handling: as :func:`run_udpcast`.
    """
    image_path = Path(image_path)
    receiver_count = len(bed.receivers)
    with ToolSession(bed, "uftp", expected_sha1, timeout, work_dir, keep_work_dir) as session:
        destinations = [session.dir / f"receiver{i}" for i in range(receiver_count)]
        status_files = [session.dir / f"receiver{i}.status" for i in range(receiver_count)]
        for index, (receiver, destination, status) in enumerate(zip(bed.receivers, destinations, status_files, strict=True)):
            destination.mkdir()
            session.start(receiver, ["uftpd", "-d", "-q", "-I", receiver.interface, "-D", str(destination),
                                     "-U", _uftp_client_id(index), "-B", str(SOCKET_BUFFER_BYTES),
                                     "-F", str(status), "-p", str(UFTP_PORT)],
                          f"receiver{index}")  # fmt: skip
        # uftpd has no readiness signal; give the daemons a moment to bind
        # (the sender also re-announces for a while, so this is not critical).
        time.sleep(0.5)
        block_size = uftp_block_bytes(bed.link_of(bed.sender).mtu)
        bitrate = _bitrate_for(rate_mbit, rate_fraction)
        rate_kbps = "-1" if bitrate is None else str(max(1, int(bitrate * 1000)))
        sender_args = ["uftp", "-I", bed.sender.interface, "-H", ",".join(map(_uftp_client_id, range(receiver_count))),
                       "-R", rate_kbps, "-b", str(block_size), "-B", str(SOCKET_BUFFER_BYTES), "-Y", "none",
                       "-p", str(UFTP_PORT), *extra_sender_args, str(image_path)]  # fmt: skip
        session.start_clock()
        session.start(bed.sender, sender_args, "sender")
        file_name = image_path.name

        def receiver_finished(index: int) -> Path | None:
            if session.exited("sender") or _uftpd_reported_result(status_files[index], file_name):
                return destinations[index] / file_name
            if session.exited(f"receiver{index}"):
                return destinations[index] / file_name
            return None

        session.run_until(receiver_finished)
        session.wait_for_exit("sender", min(10.0, max(0.0, session.seconds_left())))
        sender_code = session.returncode("sender")
        session.stop_all()  # the uftpd daemons never exit on their own
        if sender_code not in (0, None):
            session.notes.append(f"uftp exit code {sender_code}; log: …{session.log_tail('sender')}")
        elif sender_code is None:
            session.notes.append("uftp still running at the end")
        return session.result()


def _uftpd_reported_result(status_file: Path, file_name: str) -> bool:
    try:
        lines = status_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return False
    # RESULT;timestamp;server_id;session_id;filename;size;status
    return any(line.startswith("RESULT;") and f";{file_name};" in line for line in lines)


# --------------------------------------------------------------------------- HTTP

_HTTP_SERVER_PROGRAM = r"""
import functools, http.server, sys
address, port, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

handler = functools.partial(QuietHandler, directory=directory)
with http.server.ThreadingHTTPServer((address, port), handler) as server:
    print("serving", flush=True)
    server.serve_forever()
"""


def run_http(
    bed: TestBed,
    image_path: Path,
    expected_sha1: str,
    rate_mbit: float | None,
    timeout: float,
    *,
    work_dir: Path | None = None,
    keep_work_dir: bool = False,
) -> PeerResult:
    """Every receiver downloads ``image_path`` at once with curl from one threaded HTTP server on the sender.

    The server is Python's ``ThreadingHTTPServer`` (one thread per download,
    64 KiB reads); it is started and listening before the clock starts.

    ``rate_mbit`` is unused (TCP finds the link rate itself); it is accepted
    so all runners share a signature. The image is served through a symlink
    in the work directory, so any path works.

    Error handling and resource handling: as :func:`run_udpcast`.
    """
    del rate_mbit  # TCP congestion control paces itself to the tbf-limited link
    image_path = Path(image_path).resolve()
    receiver_count = len(bed.receivers)
    if shutil.which("curl") is None:
        raise RuntimeError("curl is not installed (apt-get install curl)")
    with ToolSession(bed, "http", expected_sha1, timeout, work_dir, keep_work_dir) as session:
        served = session.dir / "served"
        served.mkdir()
        (served / "image").symlink_to(image_path)
        session.start(bed.sender, [sys.executable, "-c", _HTTP_SERVER_PROGRAM, bed.sender.address,
                                   str(HTTP_PORT), str(served)], "server")  # fmt: skip
        # The server prints "serving" only after bind+listen, so no download
        # can be refused; the clock starts after this.
        if not _wait_for_log_line(session, "server", "serving", READINESS_TIMEOUT_SECONDS):
            session.notes.append(f"HTTP server did not start: …{session.log_tail('server')}")
        url = f"http://{bed.sender.address}:{HTTP_PORT}/image"
        outputs = [session.dir / f"receiver{i}.img" for i in range(receiver_count)]
        session.start_clock()
        for index, (receiver, output) in enumerate(zip(bed.receivers, outputs, strict=True)):
            session.start(receiver, ["curl", "--silent", "--show-error", "--fail", "--max-time", str(max(1, int(timeout))),
                                     "--output", str(output), url], f"receiver{index}")  # fmt: skip
        session.run_until(lambda i: outputs[i] if session.exited(f"receiver{i}") else None)
        session.stop_all()
        _note_exit_codes(session, [f"receiver{i}" for i in range(receiver_count)])
        return session.result()


def _wait_for_log_line(session: ToolSession, label: str, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in session.log_tail(label):
            return True
        session.reap()
        if session.exited(label):
            return False
        time.sleep(POLL_INTERVAL_SECONDS)
    return False


PEER_RUNNERS: dict[str, Callable[..., PeerResult]] = {"udpcast": run_udpcast, "uftp": run_uftp, "http": run_http}


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description="Time the peer tools on a fresh test bed.")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--receivers", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=300.0, help="every link's rate (0: unlimited)")
    parser.add_argument("--loss-percent", type=float, default=0.0, help="UDP loss on every receiver's link")
    parser.add_argument("--timeout", type=float, default=None, help="per tool (default: 4x the ideal HTTP time + 60s)")
    parser.add_argument("--tools", default=",".join(PEER_RUNNERS), help="comma-separated subset of " + ",".join(PEER_RUNNERS))
    parser.add_argument("--work-dir", type=Path, default=None, help="where images and outputs go (default: system temp)")
    args = parser.parse_args(argv)

    available, reason = testbed_available()
    if not available:
        print(f"skipped: {reason}")
        return 2
    tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]
    unknown = set(tools) - set(PEER_RUNNERS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    rate_mbit = args.rate_mbit or None
    size_bytes = args.size_mib * 2**20
    if args.timeout is not None:
        timeout = args.timeout
    elif rate_mbit is None:
        timeout = 600.0
    else:
        timeout = 4 * size_bytes * 8 * args.receivers / (rate_mbit * 1e6) + 60

    with tempfile.TemporaryDirectory(prefix="vmcast-peers-", dir=args.work_dir) as scratch:
        image_path = Path(scratch) / "image.raw"
        expected_sha1 = make_random_image(image_path, size_bytes)
        link = LinkSpec(rate_mbit=rate_mbit, loss_percent=args.loss_percent)
        print(f"image {args.size_mib} MiB sha1 {expected_sha1}; {args.receivers} receivers; "
              f"links {rate_mbit or 'unlimited'} Mbit/s, {args.loss_percent:g}% UDP loss at each receiver; "
              f"timeout {timeout:.0f}s per tool", flush=True)  # fmt: skip
        if rate_mbit:
            ideal = size_bytes * 8 / (rate_mbit * 1e6)
            print(f"ideal: multicast {ideal:.2f}s (image once at line rate), "
                  f"unicast {ideal * args.receivers:.2f}s (sender uplink shared)", flush=True)  # fmt: skip
        failures = 0
        for tool in tools:
            # A fresh bed per tool: no leftover sockets, qdisc backlog or counters.
            with TestBed(receivers=args.receivers, link=link) as bed:
                result = PEER_RUNNERS[tool](bed, image_path, expected_sha1, rate_mbit, timeout,
                                            work_dir=Path(scratch))  # fmt: skip
            print(result.summary_line(size_bytes), flush=True)
            failures += not result.all_verified
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
