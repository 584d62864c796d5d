"""The performance harness: vmcast against udpcast, uftp and parallel HTTP on the namespace test bed.

    python -m benchmarks.harness [--size-mib 1024] [--receivers 4] [--rate-mbit 300] [--loss 0 1 5]
                                 [--mtu 1500] [--payload 1456] [--tools vmcast vmcast-wait udpcast uftp http]
                                 [--zero-fraction 0.0 0.8] [--sweep-receivers 1 2 4 8]
                                 [--out benchmarks/results/DATE] [--timeout SECONDS]

For every configuration (image kind x loss x receiver count) every tool sends the same image, each on a
fresh bed (:class:`~benchmarks.testbed.TestBed`: no leftover sockets, qdisc backlog or counters), in one run
of this command, and the harness prints ONE table:

* time until every receiver holds a verified copy: the headline. The peers verify nothing, so their copies
  count when the harness has read each back with the right SHA-1; a vmcast receiver checks the SHA-1 itself
  (hashed as blocks arrive) and fsyncs before it exits, so its copy counts at its exit, and the harness
  re-reads it after the clock as a check of that claim (:mod:`benchmarks.peers`,
  :mod:`benchmarks.vmcast_runner`). vmcast runs twice: ``vmcast``, whose receivers start the stream (the
  clock starts at their launch), and ``vmcast-wait``, whose receivers are started before the clock and wait
  for the stream (``--wait-for-stream``), as udp-receiver and uftpd are, the clock starting at an operator's
  start of the stream;
* that time divided by the *multicast physical limit*, image bits / link rate (the image once over the
  sender's link), and by the *unicast limit*, N times that (N copies share the sender's uplink: HTTP's floor);
* time until the last receiver *finished* (exited with its copy, or reported it complete) and its ratio to
  the multicast limit: for vmcast that includes the receiver's own SHA-1 verification and fsync (so it is the
  headline), for the peers neither (their headline adds the harness's read-back and SHA-1 of every copy);
* sender wire bytes / image size (Ethernet headers, retransmissions and control traffic included), and the
  bytes the tool's sender itself sent (the same less each packet's Ethernet, IP and UDP or TCP headers) / image
  size, and in the JSON / the image's non-zero part;
* CPU seconds: of the tool's processes (sender and receivers, ``wait4``), and of the whole machine
  (``/proc/stat`` busy time over the run, so kernel networking, tbf, bridge and writeback included, minus
  this process's own SHA-1 re-checks, and for vmcast minus the untimed server start and manifest pre-warm);
* receivers that did not end with a verified copy (wrong or partial).

No tool can reach the multicast limit: every data frame carries headers. The printed conditions say how
many wire bytes each tool's full data frame takes per image byte (Ethernet, IP, UDP or TCP and the tool's
own header; :class:`~benchmarks.peers.DataFrame`), and so the least time its data alone takes at the link rate.

It also writes one JSON line per run (``results.jsonl``, with the git commit), the table (``table.txt``), and
PNGs from :mod:`benchmarks.plot` (completion time vs N and vs loss, one line per tool) when matplotlib is
installed. Loss is real kernel loss of UDP arriving at each *receiver* (the data direction; the sender's
feedback path is lossless). Every run is bounded by ``--timeout``; beds, processes and received copies are
removed as it goes; only the results directory and the cached images (``/var/tmp/vmcast-bench-images``,
made once per size, zero fraction and seed) stay.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime
import hashlib
import json
import os
import random
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.peers import (
    PEER_RUNNERS,
    UDPCAST_RATE_FRACTION,
    UFTP_RATE_FRACTION,
    DataFrame,
    PeerResult,
    peer_data_frame,
)
from benchmarks.testbed import LinkSpec, TestBed, testbed_available
from benchmarks.vmcast_runner import (
    VMCAST_RATE_FRACTION,
    VmcastDetails,
    machine_busy_seconds,
    mtu_filling_payload,
    run_vmcast,
    vmcast_data_frame,
    vmcast_rate_bps,
)

__all__ = ["TOOLS", "BedUnavailable", "HarnessSettings", "cached_image", "main", "run_benchmark"]

# vmcast twice: started by its receivers (`vmcast receive` alone, the README's way), and with its receivers
# started first, waiting for an operator's start (`--wait-for-stream`), as udp-receiver and uftpd are run.
TOOLS = ("vmcast", "vmcast-wait", "udpcast", "uftp", "http")
VMCAST_TOOLS = ("vmcast", "vmcast-wait")
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_ROOT = REPOSITORY / "benchmarks" / "results"
IMAGE_CACHE_DIR = Path("/var/tmp/vmcast-bench-images")
BLOCK_BYTES = 1 << 20  # zero/random mixing granularity of the images
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.txt"
SCHEMA_VERSION = 1


class BedUnavailable(Exception):
    """This machine cannot build a test bed (not root, no `ip netns`...); the message says why."""


@dataclasses.dataclass(slots=True, kw_only=True)
class HarnessSettings:
    """One invocation of the harness; the command line maps onto it one to one."""

    size_mib: int = 1024
    receiver_counts: list[int] = dataclasses.field(default_factory=lambda: [4])
    rate_mbit: float | None = 300.0
    losses: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    mtu: int = 1500
    payload: int = 0
    """vmcast's image bytes per datagram; 0: the largest that fits the MTU (`mtu_filling_payload`)."""
    tools: list[str] = dataclasses.field(default_factory=lambda: list(TOOLS))
    zero_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    seed: int = 1
    out: Path | None = None
    timeout: float | None = None
    vmcast_rate: str | None = None
    vmcast_serve_args: list[str] = dataclasses.field(default_factory=list)
    """Appended to ``vmcast serve`` verbatim (e.g. ``--no-fec``)."""
    vmcast_receive_args: list[str] = dataclasses.field(default_factory=list)
    """Appended to every ``vmcast receive`` verbatim (e.g. ``--no-gro``)."""
    image_cache_dir: Path = IMAGE_CACHE_DIR
    work_dir: Path | None = None
    plot: bool = True
    quiet_wait: float = 120.0
    """Before each run, wait up to this long for other work on the machine to stop (0: do not wait)."""

    def __post_init__(self) -> None:
        if self.payload == 0:
            self.payload = mtu_filling_payload(self.mtu)

    def check(self) -> None:
        if self.size_mib < 1:
            raise ValueError("--size-mib must be at least 1")
        if not self.receiver_counts or any(n < 1 for n in self.receiver_counts):
            raise ValueError("receiver counts must be at least 1")
        unknown = sorted(set(self.tools) - set(TOOLS))
        if unknown or not self.tools:
            raise ValueError(f"unknown tools {unknown}; choose from {', '.join(TOOLS)}")
        for fraction in self.zero_fractions:
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"--zero-fraction must be within 0..1, not {fraction}")
        for loss in self.losses:
            if not 0.0 <= loss < 100.0:
                raise ValueError(f"--loss must be within 0..100, not {loss}")
        if self.payload + 44 > self.mtu:
            print(f"note: payload {self.payload} + 44 header bytes exceeds MTU {self.mtu}: vmcast datagrams will be "
                  "IP-fragmented", file=sys.stderr)  # fmt: skip


# --------------------------------------------------------------------------- images


def image_kind(zero_fraction: float) -> str:
    return "random" if zero_fraction == 0 else f"zero{round(zero_fraction * 100)}"


def cached_image(size_mib: int, zero_fraction: float, seed: int, *, cache_dir: Path = IMAGE_CACHE_DIR) -> tuple[Path, str]:
    """The benchmark image for (size, zero fraction, seed), made once and kept in ``cache_dir``; ``(path, sha1)``.

    Blocks of 1 MiB: ``round(zero_fraction x blocks)`` of them, chosen by the seed, are zeros (left as holes,
    as ``qemu-img convert`` leaves them), the rest pseudo-random bytes from the seed (incompressible). Same
    arguments, same bytes, on any machine. Written under a temporary name and renamed, so a cut-short run never
    leaves a half image behind; its SHA-1 is kept beside it.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"{image_kind(zero_fraction)}-{size_mib}MiB-seed{seed}.raw"
    path = cache_dir / name
    sha1_path = cache_dir / f"{name}.sha1"
    if path.exists() and sha1_path.exists() and path.stat().st_size == size_mib * BLOCK_BYTES:
        return path, sha1_path.read_text().strip()
    rng = random.Random(f"vmcast-bench/{size_mib}/{zero_fraction!r}/{seed}")
    zero_blocks = set(rng.sample(range(size_mib), round(zero_fraction * size_mib)))
    zero_block = bytes(BLOCK_BYTES)
    digest = hashlib.sha1()
    partial = path.with_name(f".{name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as stream:
            for index in range(size_mib):
                if index in zero_blocks:
                    stream.seek(BLOCK_BYTES, os.SEEK_CUR)
                    digest.update(zero_block)
                else:
                    block = rng.randbytes(BLOCK_BYTES)
                    stream.write(block)
                    digest.update(block)
            stream.truncate(size_mib * BLOCK_BYTES)
        sha1 = digest.hexdigest()
        sha1_path.write_text(sha1 + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path, sha1


# --------------------------------------------------------------------------- measuring


def own_cpu_seconds() -> float:
    """This process's CPU (all threads: the SHA-1 re-checks run on the runners' thread pools)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def vmcast_source_root() -> Path:
    """The checkout the measured vmcast is imported from (the tool processes inherit this process's import path)."""
    import vmcast.protocol

    return Path(vmcast.protocol.__file__).resolve().parent.parent


def git_commit() -> tuple[str, bool]:
    """``(short commit, whether tracked files differ from it)`` of the vmcast under test; ``("unknown", False)``
    outside a git checkout. Untracked files (new benchmark or work-in-progress modules) do not count."""
    root = vmcast_source_root()
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, bool(status)


QUIET_BUSY_CORES = 0.3
QUIET_SAMPLE_SECONDS = 1.0


def busy_cores(sample_seconds: float = QUIET_SAMPLE_SECONDS) -> float:
    """How many cores the machine kept busy over ``sample_seconds`` (0 = idle, ``nproc`` = saturated)."""
    before = machine_busy_seconds()
    time.sleep(sample_seconds)
    return (machine_busy_seconds() - before) / sample_seconds


def wait_for_quiet_machine(max_wait: float, echo: Callable[[str], None]) -> float:
    """Wait (up to ``max_wait`` s) until other work leaves the cores idle; returns the busy cores last seen.

    The machine may be shared (other sessions' tests); a run that starts on busy cores measures them too, so
    each record keeps this number and the table marks such runs.
    """
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    if busy > QUIET_BUSY_CORES and max_wait > 0:
        echo(f"  waiting up to {max_wait:.0f}s for the machine to be quiet ({busy:.2f} cores busy with other work)")
        while busy > QUIET_BUSY_CORES and time.monotonic() < deadline:
            busy = busy_cores()
    return busy


def data_frame(tool: str, settings: HarnessSettings) -> DataFrame:
    """The tool's full-size data frame as the harness runs it (vmcast at ``--payload``; peers as they are set up)."""
    if tool in VMCAST_TOOLS:
        return vmcast_data_frame(payload=settings.payload, mtu=settings.mtu)
    return peer_data_frame(tool, mtu=settings.mtu)


def default_timeout(size_bytes: int, rate_mbit: float | None, receivers: int) -> float:
    """Per run: room for 8 loops of the multicast ideal (loss) or 2x the unicast ideal, plus start-up."""
    if rate_mbit is None:
        return 600.0
    ideal = size_bytes * 8 / (rate_mbit * 1e6)
    return max(8 * ideal, 2 * receivers * ideal) + 60.0


def _run_tool(tool: str, bed: TestBed, image: Path, sha1: str, settings: HarnessSettings, loss: float, timeout: float,
              work_dir: Path, cache_dir: Path) -> tuple[PeerResult, dict[str, Any] | None, float]:  # fmt: skip
    """Run one tool; returns its result, vmcast's details (None for the peers) and the CPU to leave out of the
    machine total (vmcast's untimed server start-up and pre-warm)."""
    if tool in VMCAST_TOOLS:
        details = VmcastDetails()
        result = run_vmcast(bed, image, sha1, settings.rate_mbit, timeout, payload=settings.payload, loss=loss,
                            sender_rate=settings.vmcast_rate, cache_dir=cache_dir, work_dir=work_dir,
                            details=details, receivers_wait=tool == "vmcast-wait", extra_server_args=settings.vmcast_serve_args,
                            extra_receive_args=settings.vmcast_receive_args)  # fmt: skip
        return result, details.as_dict(), details.machine_cpu_before_clock or 0.0
    return PEER_RUNNERS[tool](bed, image, sha1, settings.rate_mbit, timeout, work_dir=work_dir), None, 0.0


def _one_run(tool: str, receivers: int, loss: float, zero_fraction: float, image: Path, sha1: str,
             settings: HarnessSettings, timeout: float, scratch: Path, commit: tuple[str, bool],
             busy_before: float) -> dict[str, Any]:  # fmt: skip
    size_bytes = settings.size_mib * BLOCK_BYTES
    link = LinkSpec(rate_mbit=settings.rate_mbit, mtu=settings.mtu)
    receiver_link = LinkSpec(rate_mbit=settings.rate_mbit, mtu=settings.mtu, loss_percent=loss)
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    wall_started = time.monotonic()
    with TestBed(receivers=receivers, link=link, receiver_links=[receiver_link] * receivers) as bed:
        rcvbuf_before = [host.rcvbuf_errors() for host in bed.hosts]
        tbf_before = [bed.tbf_counters(host) for host in bed.hosts]
        machine_before, own_before, runner_started = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
        try:
            result, details, untimed_cpu = _run_tool(tool, bed, image, sha1, settings, loss, timeout, scratch,
                                                     scratch / "vmcast-cache")  # fmt: skip
        except Exception as error:  # noqa: BLE001 - one broken run must not lose the others; it is recorded
            result = PeerResult(tool=tool, seconds_until_all_verified=None, per_receiver_sha1_ok=[False] * receivers,
                                sender_wire_bytes=0, cpu_seconds=0.0, notes=f"harness error: {error!r}")  # fmt: skip
            details, untimed_cpu = None, 0.0
        machine_busy = machine_busy_seconds() - machine_before
        runner_seconds = time.monotonic() - runner_started
        machine_cpu = machine_busy - (own_cpu_seconds() - own_before) - untimed_cpu
        rcvbuf = [host.rcvbuf_errors() - before for host, before in zip(bed.hosts, rcvbuf_before, strict=True)]
        tbf = [{key: value - before[key] for key, value in bed.tbf_counters(host).items()}
               for host, before in zip(bed.hosts, tbf_before, strict=True)]  # fmt: skip
    multicast_limit = size_bytes * 8 / (settings.rate_mbit * 1e6) if settings.rate_mbit else None
    seconds = result.seconds_until_all_verified
    finished = result.seconds_until_last_finished
    frame = data_frame(tool, settings)
    bad = sum(not ok for ok in result.per_receiver_sha1_ok)
    notes = result.notes
    if seconds is not None and finished is not None and multicast_limit is not None:
        checked = "by itself" if tool in VMCAST_TOOLS else "by the harness"
        notes = (f"last receiver finished at {finished:.2f}s ({finished / multicast_limit:.3f}x the multicast limit), "
                 f"every copy verified ({checked}) at {seconds:.2f}s ({seconds / multicast_limit:.3f}x); {notes}")  # fmt: skip
    return {
        "schema": SCHEMA_VERSION,
        "commit": commit[0],
        "dirty": commit[1],
        "started_at": started_at,
        "tool": tool,
        "receivers": receivers,
        "loss_percent": loss,
        "rate_mbit": settings.rate_mbit,
        "mtu": settings.mtu,
        "payload": settings.payload,
        "vmcast_serve_args": settings.vmcast_serve_args if tool in VMCAST_TOOLS else [],
        "vmcast_receive_args": settings.vmcast_receive_args if tool in VMCAST_TOOLS else [],
        "cores": os.cpu_count(),
        "image": {"kind": image_kind(zero_fraction), "zero_fraction": zero_fraction, "size_bytes": size_bytes,
                  "sha1": sha1, "seed": settings.seed},
        "timeout": timeout,
        "seconds_until_all_verified": None if seconds is None else round(seconds, 3),
        "all_verified": result.all_verified,
        "per_receiver_sha1_ok": result.per_receiver_sha1_ok,
        "bad_receivers": bad,
        "multicast_limit_seconds": None if multicast_limit is None else round(multicast_limit, 3),
        "unicast_limit_seconds": None if multicast_limit is None else round(multicast_limit * receivers, 3),
        "ratio_multicast_limit": None if seconds is None or multicast_limit is None else round(seconds / multicast_limit, 3),
        "ratio_unicast_limit": None if seconds is None or multicast_limit is None else round(seconds / (multicast_limit * receivers), 3),
        "seconds_until_last_finished": None if finished is None else round(finished, 3),
        "ratio_finished_multicast_limit": None if finished is None or multicast_limit is None else round(finished / multicast_limit, 3),
        # The tool's full data frame: wire bytes per image byte, and the multicast limit times that (its data alone).
        "data_frame": {"payload_bytes": frame.payload, "wire_bytes": frame.wire, "wire_per_payload": round(frame.ratio, 4)},
        "header_floor_seconds": None if multicast_limit is None else round(multicast_limit * frame.ratio, 3),
        "sender_wire_bytes": result.sender_wire_bytes,
        "wire_per_image": round(result.sender_wire_bytes / size_bytes, 3),
        "sender_packets": result.sender_packets,
        # Per receiver, the bytes its copy had allocated on disk: below the image's size, the copy is sparse.
        "copies_allocated_bytes": result.allocated_bytes,
        "sender_payload_bytes": result.sender_payload_bytes(),
        "payload_per_image": round(result.sender_payload_bytes() / size_bytes, 3),
        # Against what must be sent at all: the image less its all-zero blocks (which vmcast does not send).
        "payload_per_nonzero": round(result.sender_payload_bytes() / (size_bytes - round(zero_fraction * settings.size_mib) * BLOCK_BYTES), 4),
        "cpu_seconds_tool": round(result.cpu_seconds, 2),
        "cpu_seconds_machine": round(machine_cpu, 2),
        "rcvbuf_errors": {"sender": rcvbuf[0], "receivers": rcvbuf[1:]},
        # The links' rate limits over the run: packets dropped at a full tbf queue (real loss, whatever --loss
        # says) and packets that waited for tokens. Sender: its uplink; receivers: their downlinks.
        "tbf": {
            "sender_up_drops": tbf[0]["up_drops"],
            "receivers_down_drops": [t["down_drops"] for t in tbf[1:]],
            "sender_up_overlimits": tbf[0]["up_overlimits"],
            "receivers_down_overlimits": [t["down_overlimits"] for t in tbf[1:]],
            "receivers_up_drops": [t["up_drops"] for t in tbf[1:]],
        },
        "wall_seconds": round(time.monotonic() - wall_started, 2),
        "busy_cores_before": round(busy_before, 2),
        # Everything, this harness and other sessions' work included: near `cores` means the cores were saturated.
        "busy_cores_during": round(machine_busy / runner_seconds, 2) if runner_seconds > 0 else None,
        "notes": notes,
        "vmcast": details,
    }


# --------------------------------------------------------------------------- output

_COLUMNS = [
    ("tool", 11, "tool"), ("N", 3, "receivers"), ("loss%", 5, "loss_percent"), ("image", 7, None),
    ("verified s", 10, "seconds_until_all_verified"), ("/mcast lim", 10, "ratio_multicast_limit"),
    ("finished s", 10, "seconds_until_last_finished"), ("/lim", 5, "ratio_finished_multicast_limit"),
    ("/N*lim", 7, "ratio_unicast_limit"), ("wire/img", 8, "wire_per_image"), ("sent/img", 8, "payload_per_image"), ("tool cpu s", 10, "cpu_seconds_tool"),
    ("machine cpu s", 13, "cpu_seconds_machine"), ("bad", 5, None),
]  # fmt: skip


def _cell(record: dict[str, Any], key: str | None, header: str) -> str:
    if header == "image":
        return record["image"]["kind"]
    if header == "bad":
        return f"{record['bad_receivers']}/{record['receivers']}"
    value = record[key]
    if value is None:
        return "FAILED" if key == "seconds_until_all_verified" else "-"
    if key in ("seconds_until_all_verified", "seconds_until_last_finished") and record.get("busy_cores_before", 0.0) > QUIET_BUSY_CORES:
        return f"*{value:.2f}"  # other work was running when it started
    if isinstance(value, float):
        return f"{value:g}" if key == "loss_percent" else f"{value:.2f}"
    return str(value)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The one results table, aligned text."""
    header = " ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width, _) in enumerate(_COLUMNS))
    lines = [header, "-" * len(header)]
    for record in records:
        cells = [_cell(record, key, name) for name, _, key in _COLUMNS]
        lines.append(" ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, _COLUMNS))))
    return "\n".join(lines)


TABLE_FOOTNOTE = (
    "verified s: start to the last receiver holding a verified copy. Peers: their copies read back by the harness with\n"
    "  the right SHA-1 (they verify nothing themselves). vmcast: its receivers check the SHA-1 (hashed as blocks\n"
    "  arrive) and fsync before they exit, so their exit; the harness re-reads those copies after the clock and\n"
    "  counts one only if its re-read matches too. vmcast's clock starts at the receivers' launch (they start the\n"
    "  stream); vmcast-wait's receivers are started before it and wait (--wait-for-stream), like udp-receiver and\n"
    "  uftpd, and its clock starts with an operator's start of the stream. Both after the manifest was pre-warmed.\n"
    "  /mcast lim: that time / (image bits / link rate), the multicast limit (headers alone put each tool's floor\n"
    "  above it: see 'headers' above the table). finished s: start to the last receiver exiting with its copy (uftp:\n"
    "  uftpd reporting it); vmcast's has already checked its SHA-1 and fsynced, the peers' have not. /lim: that time /\n"
    "  the multicast limit. /N*lim: verified s / (N x the limit), the floor of N unicast copies sharing the sender's\n"
    "  uplink (HTTP's). wire/img: sender lan0 tx bytes / image bytes. sent/img: the same less each packet's\n"
    "  Ethernet, IPv4 and UDP (TCP) headers: the bytes the tool's sender sent (its own headers, data, repairs,\n"
    "  control) / image bytes.\n"
    "  tool cpu s: sender + receiver processes. machine cpu s: /proc/stat busy over the run minus the harness's own\n"
    "  SHA-1 re-checks (kernel networking and writeback included). bad: receivers without a verified copy.\n"
    "  *: other work kept the shared cores busy when the run started (see busy_cores_before in the JSON).\n"
    "  Loss is UDP only: HTTP (TCP) rows at loss > 0 ran loss-free."
)


def conditions_text(settings: HarnessSettings, commit: tuple[str, bool], timeouts: dict[int, float]) -> str:
    rate = f"{settings.rate_mbit:g} Mbit/s tbf on every link, both directions" if settings.rate_mbit else "unlimited links"
    rates = []
    if settings.rate_mbit:
        vmcast = settings.vmcast_rate or f"{vmcast_rate_bps(settings.rate_mbit, payload=settings.payload, mtu=settings.mtu) / 1e6:.1f}mbit"
        rates = [f"vmcast --rate {vmcast} (IP bytes; {VMCAST_RATE_FRACTION:g} of the link after Ethernet headers)"
                 + "".join(f"; vmcast {command} {' '.join(extra)}" for command, extra in (("serve", settings.vmcast_serve_args), ("receive", settings.vmcast_receive_args)) if extra),
                 f"udpcast {UDPCAST_RATE_FRACTION:g} x link", f"uftp {UFTP_RATE_FRACTION:g} x link", "http: TCP"]  # fmt: skip
    return "\n".join([
        (f"vmcast commit {commit[0]}{' (+ uncommitted changes)' if commit[1] else ''} from {vmcast_source_root()}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"),
        (f"image {settings.size_mib} MiB ({', '.join(image_kind(f) for f in settings.zero_fractions)}; seed {settings.seed}); "
        f"N = {', '.join(map(str, settings.receiver_counts))} receivers; {rate}; UDP loss "
        f"{', '.join(f'{loss:g}' for loss in settings.losses)} % at each receiver (sender's input lossless); "
        f"MTU {settings.mtu}; vmcast payload {settings.payload} B"),
        f"cores: {os.cpu_count()}, shared by every process of the bed (sender, all receivers, kernel networking, this harness)",
        ("pacing: " + "; ".join(rates)) if rates else "pacing: none",
        f"tools {', '.join(settings.tools)}, each on a fresh bed; timeout per run "
        + ", ".join(f"N={n}: {t:.0f}s" for n, t in timeouts.items()),
    ])  # fmt: skip


def header_overhead_text(settings: HarnessSettings) -> str:
    """One line: each tool's wire bytes per image byte in a full data frame, and what that makes of the limit."""
    parts = []
    ideal = settings.size_mib * BLOCK_BYTES * 8 / (settings.rate_mbit * 1e6) if settings.rate_mbit else None
    for tool in settings.tools:
        frame = data_frame(tool, settings)
        part = f"{tool} {frame.wire}/{frame.payload} = {frame.ratio:.3f}"
        if ideal is not None:
            part += f" -> {ideal * frame.ratio:.2f}s"
            if tool in VMCAST_TOOLS and settings.vmcast_rate is None and VMCAST_RATE_FRACTION != 1.0:
                part += f" ({ideal * frame.ratio / VMCAST_RATE_FRACTION:.2f}s at its {VMCAST_RATE_FRACTION:g} pacing)"
        parts.append(part)
    return ("headers: wire bytes per image byte of a full data frame (Ethernet frame as tbf meters it / image bytes in "
            "it) -> the data alone at the link rate: " + "; ".join(parts))  # fmt: skip


def _detail_line(record: dict[str, Any]) -> str:
    head = f"{record['tool']} N={record['receivers']} loss={record['loss_percent']:g}% {record['image']['kind']}:"
    rcvbuf = record["rcvbuf_errors"]
    parts = []
    if record["all_verified"] and record.get("seconds_until_last_finished") is not None:
        checked = "by the receivers themselves" if record["tool"] in VMCAST_TOOLS else "by the harness"
        parts.append(f"last receiver finished {record['seconds_until_last_finished']:.2f}s "
                     f"({record['ratio_finished_multicast_limit']}x limit), all verified {checked} "
                     f"{record['seconds_until_all_verified']:.2f}s ({record['ratio_multicast_limit']}x)")  # fmt: skip
    parts += [f"busy cores before {record.get('busy_cores_before')} during {record.get('busy_cores_during')}",
              f"RcvbufErrors sender {rcvbuf['sender']} receivers {rcvbuf['receivers']}"]  # fmt: skip
    allocated = record.get("copies_allocated_bytes") or []
    if allocated:
        parts.append(f"copies allocate {', '.join(f'{size / 2**20:.0f}' for size in allocated)} MiB of "
                     f"{record['image']['size_bytes'] / 2**20:.0f}")  # fmt: skip
    tbf = record.get("tbf")
    if tbf:
        parts.append(f"tbf drops sender uplink {tbf['sender_up_drops']} receiver downlinks {tbf['receivers_down_drops']} "
                     f"(overlimits {tbf['sender_up_overlimits']} / {tbf['receivers_down_overlimits']})")  # fmt: skip
    vmcast = record.get("vmcast")
    if vmcast:
        summaries = vmcast.get("receivers") or []
        parts.append("receivers' own s " + str([s.get("seconds") for s in summaries]))
        parts.append("kernel_drops " + str([s.get("kernel_drops") for s in summaries]))
        drops: dict[str, int] = {}
        for summary in summaries:
            for reason, count in (summary.get("drops") or {}).items():
                drops[reason] = drops.get(reason, 0) + count
        parts.append(f"drops {drops}")
        parts.append("duplicates " + str([s.get("duplicates") for s in summaries]))
        parts.append("pump cpu s " + str([s.get("pump_cpu_seconds") for s in summaries]))
        parts.append(f"cpu server {vmcast.get('server_cpu_seconds')} s receivers {vmcast.get('receivers_cpu_seconds')} s")
        parts.append(f"start-up overhead {vmcast.get('launch_overhead_seconds')} s")
        parts.append(f"harness re-read done {vmcast.get('reread_seconds')} s")
        if vmcast.get("receivers_waited"):
            parts.append(f"operator's start to all {record['receivers']} joined {vmcast.get('all_joined_seconds')} s")
        stream = vmcast.get("stream") or {}
        if stream:
            parts.append(f"loops {stream.get('loops_completed')} rests {stream.get('rests')} repairs asked {stream.get('repair_requests')} "
                         f"sent {stream.get('repair_frames_sent')} dropped {stream.get('repair_drops')} parity sent "
                         f"{stream.get('parity_frames_sent')}; sender's pacing lost {stream.get('pacing_missed_seconds')} s")  # fmt: skip
        steps = [receiver.get("carousel_steps_back") for receiver in vmcast.get("receivers") or []]
        if any(steps):
            parts.append(f"carousel steps back seen by the receivers {steps}")
    if not record["all_verified"]:
        parts.append(f"notes: {record['notes']}")
    return head + " " + "; ".join(parts)


# --------------------------------------------------------------------------- the run


def _timeouts(settings: HarnessSettings) -> dict[int, float]:
    size_bytes = settings.size_mib * BLOCK_BYTES
    return {
        n: settings.timeout if settings.timeout is not None else default_timeout(size_bytes, settings.rate_mbit, n)
        for n in settings.receiver_counts
    }


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM/SIGHUP unwind (scratch directory removed, beds torn down) even before the first bed exists.

    The bed installs the same on its first use; until then (making images, waiting for a quiet machine) the
    default action would leave the scratch directory behind. A handler someone else installed stays theirs.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_system_exit)


def _compile_vmcast() -> None:
    """Compile vmcast's modules to bytecode once, as installing the package does: from a checkout, where
    ``PYTHONDONTWRITEBYTECODE`` may be set, every receiver process would otherwise compile them again (~30 ms
    of CPU each, inside vmcast's timed start-up)."""
    root = vmcast_source_root()
    for package in ("protocol", "server", "receiver"):
        compileall.compile_dir(root / package, quiet=1)


def run_benchmark(settings: HarnessSettings, *, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every configuration and tool; write ``results.jsonl``, ``table.txt`` and PNGs into ``settings.out``.

    Returns the records (one per run, as written). Raises :class:`BedUnavailable` when no bed can be built
    here (the caller decides whether that is a skip).

    Resource handling: a scratch directory (receivers' copies, vmcast's manifest cache) lives for the call
    and is removed; every bed is torn down after its run, also on an exception or SIGTERM.
    """
    settings.check()
    available, reason = testbed_available()
    if not available:
        raise BedUnavailable(reason)
    _exit_cleanly_on_sigterm()
    out = settings.out or DEFAULT_RESULTS_ROOT / datetime.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    commit = git_commit()
    timeouts = _timeouts(settings)
    conditions = conditions_text(settings, commit, timeouts)
    echo(conditions)
    _compile_vmcast()
    if settings.rate_mbit:
        ideal = settings.size_mib * BLOCK_BYTES * 8 / (settings.rate_mbit * 1e6)
        echo(f"physical limits: multicast {ideal:.2f}s (image bits / link rate); unicast N x that "
             f"({', '.join(f'N={n}: {ideal * n:.1f}s' for n in settings.receiver_counts)})")  # fmt: skip
    echo(header_overhead_text(settings))
    images = {}
    for fraction in settings.zero_fractions:
        started = time.monotonic()
        images[fraction] = cached_image(settings.size_mib, fraction, settings.seed, cache_dir=settings.image_cache_dir)
        echo(f"image {image_kind(fraction)}: {images[fraction][0]} sha1 {images[fraction][1]} "
             f"({time.monotonic() - started:.1f}s to make or find)")  # fmt: skip
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vmcast-harness-", dir=settings.work_dir or "/var/tmp") as scratch_name:
        scratch = Path(scratch_name)
        for fraction in settings.zero_fractions:
            image, sha1 = images[fraction]
            for loss in settings.losses:
                for receivers in settings.receiver_counts:
                    for tool in settings.tools:
                        busy = wait_for_quiet_machine(settings.quiet_wait, echo)
                        record = _one_run(tool, receivers, loss, fraction, image, sha1, settings, timeouts[receivers],
                                          scratch, commit, busy)  # fmt: skip
                        records.append(record)
                        with results_path.open("a") as stream:
                            stream.write(json.dumps(record, sort_keys=True) + "\n")
                        seconds, finished = record["seconds_until_all_verified"], record["seconds_until_last_finished"]
                        echo(f"  {tool:8s} N={receivers} loss={loss:g}% {image_kind(fraction)}: "
                             f"{'FAILED' if seconds is None else f'{seconds:.2f}s all verified'}"
                             f"{'' if finished is None else f', {finished:.2f}s last receiver finished'} "
                             f"({record['wall_seconds']:.0f}s with set-up)")  # fmt: skip
    table = format_table(records)
    details = "\n".join(_detail_line(record) for record in records)
    text = f"{conditions}\n{header_overhead_text(settings)}\n\n{table}\n\n{TABLE_FOOTNOTE}\n\n{details}\n"
    (out / TABLE_FILE).write_text(text)
    echo("")
    echo(table)
    echo("")
    echo(TABLE_FOOTNOTE)
    echo("")
    echo(details)
    echo(f"\nresults: {results_path}")
    if settings.plot:
        from benchmarks import plot

        try:
            pngs = plot.plot_results(records, out)
        except plot.PlottingUnavailable as missing:
            echo(f"no plots: {missing}")
        else:
            for png in pngs:
                echo(f"plot: {png}")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--receivers", type=int, default=4, help="receivers, when --sweep-receivers is not given")
    parser.add_argument("--sweep-receivers", type=int, nargs="+", help="several receiver counts, e.g. 1 2 4 8")
    parser.add_argument("--rate-mbit", type=float, default=300.0, help="every link's rate (0: unlimited)")
    parser.add_argument("--loss", type=float, nargs="+", default=[0.0], help="UDP loss %% at each receiver, e.g. 0 1 5")
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--payload", type=int, default=0,
                        help="vmcast image bytes per datagram (default: the largest that fits the MTU, as udpcast's "
                             "blocks do: 1456 at 1500, 8952 at 9000)")
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--zero-fraction", type=float, nargs="+", default=[0.0],
                        help="share of all-zero 1 MiB blocks in the image, e.g. 0 0.8 (one image kind each)")
    parser.add_argument("--seed", type=int, default=1, help="image content seed")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results/DATE)")
    parser.add_argument("--timeout", type=float, help="per run (default max(8x, 2N x) the multicast ideal + 60s)")
    parser.add_argument("--vmcast-rate", help="vmcast serve --rate verbatim (default: matched to the link)")
    parser.add_argument("--vmcast-serve-args", type=shlex.split, default=[], metavar="ARGS",
                        help="more options for vmcast serve, one quoted string, e.g. '--no-fec'")
    parser.add_argument("--vmcast-receive-args", type=shlex.split, default=[], metavar="ARGS",
                        help="more options for every vmcast receive, one quoted string, e.g. '--no-gro'")
    parser.add_argument("--image-cache", type=Path, default=IMAGE_CACHE_DIR)
    parser.add_argument("--work-dir", type=Path, help="scratch for received copies (default /var/tmp)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before each run wait up to this many seconds for other work to leave the cores idle")
    args = parser.parse_args(argv)
    settings = HarnessSettings(
        size_mib=args.size_mib,
        receiver_counts=args.sweep_receivers or [args.receivers],
        rate_mbit=args.rate_mbit or None,
        losses=args.loss,
        mtu=args.mtu,
        payload=args.payload,
        tools=args.tools,
        zero_fractions=args.zero_fraction,
        seed=args.seed,
        out=args.out,
        timeout=args.timeout,
        vmcast_rate=args.vmcast_rate,
        vmcast_serve_args=args.vmcast_serve_args,
        vmcast_receive_args=args.vmcast_receive_args,
        image_cache_dir=args.image_cache,
        work_dir=args.work_dir,
        plot=not args.no_plot,
        quiet_wait=args.quiet_wait,
    )
    try:
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    try:
        records = run_benchmark(settings)
    except BedUnavailable as error:
        print(f"skipped: {error}")
        return 2
    return 0 if all(record["all_verified"] for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
