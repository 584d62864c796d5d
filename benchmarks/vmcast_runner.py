"""Run vmcast itself on a :class:`~benchmarks.testbed.TestBed`, measured exactly like the peer tools.

:func:`run_vmcast` starts ``vmcast serve`` in the bed's sender namespace and one ``vmcast receive`` in every
receiver namespace, and returns the same :class:`~benchmarks.peers.PeerResult` as the runners of
:mod:`benchmarks.peers` (it reuses their `ToolSession`: the same clock, SHA-1 re-check, wire counter and ``wait4``
CPU accounting), so the numbers sit in one table.

What is timed, and what is not:

* Before the clock starts the server is started and its **manifest is pre-warmed**: one
  ``POST /v1/streams`` + ``DELETE /v1/leases/…`` of the image (from a helper inside the sender namespace),
  waiting until that stream has stopped. That first start reads the whole image (SHA-256 content key,
  SHA-1 and per-block xxh3) and caches the result; a deployment's server does it once per image, so it is
  kept out of the timed number. The server's CPU up to the clock start is subtracted as well.
* The clock starts, in the default mode (``receivers_wait=False``), when the receivers are *launched*: each
  takes a lease, which starts the stream (their Python start-up, lease request and join are inside the
  number). With ``receivers_wait=True`` the receivers are launched *before* the clock with
  ``--wait-for-stream`` and the clock starts when they all wait, as udp-receiver and uftpd are started
  before theirs; at the clock a helper in the sender namespace, started before it too (an operator's
  deployment tool is running already), starts the stream as an operator would (``POST /v1/streams`` with
  ``min_receivers`` N) and releases its own lease once all N joined.
* The clock stops when the last receiver has exited with its copy verified: a vmcast receiver computes the
  image's SHA-1 as blocks arrive, checks it, and fsyncs before it exits 0 with ``verified`` in its summary,
  so its exit is the moment the copy is verified (the peers verify nothing: their copies count as verified
  when the harness has read them back with the right SHA-1). The harness reads every vmcast copy back too,
  after the clock: a receiver counts as verified only if its claim *and* that re-read hold. The time of the
  re-read is kept as ``VmcastDetails.reread_seconds``.
* Every receiver runs with ``--min-receivers N`` (in the waiting mode, the operator's start asks it): the
  stream holds (metadata only) until all N have joined and then starts at the image's first frame, as the
  peers are run (udp-sender ``--min-receivers N``, uftp with the closed group ``-H``).
* ``sender_wire_bytes``: ``tx_bytes`` of the sender's ``lan0`` over the timed part (data, metadata, repair
  frames, HTTP answers, Ethernet headers included).
* ``cpu_seconds``: user + system CPU of the server (from the clock start on) and all receivers.

``--rate`` is matched to the link: the tbf meters Ethernet frames while vmcast's pacer counts IP bytes, so
the rate is ``rate_mbit × (IP bytes / Ethernet bytes of one data frame) ×`` :data:`VMCAST_RATE_FRACTION`
(e.g. 300 Mbit/s link, 1400-byte payload: ``297.1mbit``); ``sender_rate`` overrides it verbatim.

Resource handling: every process is stopped (by PID) and the work directory removed before returning, unless
``keep_work_dir``. Error handling: a failing or slow receiver shows as ``False`` in ``per_receiver_sha1_ok``
with its exit code and log tail in ``notes``; only an environment that cannot run anything raises.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmcast.server.rates import parse_rate

from benchmarks.peers import (  # the peers' session: identical clock and accounting
    ETHERNET_HEADER_BYTES,
    IPV4_HEADER_BYTES,
    UDP_HEADER_BYTES,
    DataFrame,
    PeerResult,
    ToolSession,
)
from benchmarks.testbed import TestBed

__all__ = [
    "VMCAST_COMMAND",
    "VMCAST_RATE_FRACTION",
    "VmcastDetails",
    "last_json_object",
    "machine_busy_seconds",
    "mtu_filling_payload",
    "run_vmcast",
    "vmcast_data_frame",
    "vmcast_rate_bps",
]

VMCAST_COMMAND = [sys.executable, "-m", "vmcast.server.cli"]
API_PORT = 8470
MULTICAST_PORT = 8471
# The link rate itself, Ethernet headers accounted for: the pacer's bursts (2 ms of its rate, up to 12 ms when
# it makes up a late wake-up) wait in the tbf's 50 ms queue at worst, and metadata frames are too few
# (~700 per GiB) to lift the long-run rate over the link. Measured on the bed (1 GiB, 4 receivers, 300 Mbit/s,
# 0% loss, 2 or 3 runs each): 0.98 -> 35.74/35.24 s until all verified, 0.995 -> 34.79/36.28/35.66 s,
# 1.0 -> 34.89/34.36/34.48 s; no tbf drops, kernel drops or duplicates at any of them (at 1.0 ~1-2k packets
# waited in the sender's uplink queue, a handful in the downlinks'). The spread comes from the sender, which
# delivered 92-97% of its --rate on the shared cores before its bucket made up late wake-ups (now 100%).
VMCAST_RATE_FRACTION = 1.0
FRAME_HEADER_BYTES = 16  # vmcast.protocol.HEADER_SIZE (cookie + offset)
PREWARM_TIMEOUT_SECONDS = 600.0  # hashing a large image on a busy 2-core machine
STATS_TIMEOUT_SECONDS = 15.0
RECEIVER_DATAGRAM_TIMEOUT_SECONDS = 30.0  # vmcast receive --timeout: no datagram at all for this long
# Receivers started before the clock must be waiting within this (Python start-up of N receivers on 2 cores).
WAITING_TIMEOUT_SECONDS = 60.0
WAITING_LINE = "waiting up to"  # what `vmcast receive --wait-for-stream` logs once it waits
# The stream holds until every receiver has joined, as udp-sender does with --min-receivers and uftp with its
# closed group (-H): vmcast receive --min-receivers N --max-wait this.
HOLD_MAX_WAIT_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC_STAT_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (idle and iowait are not busy)

_STREAM_LINE = re.compile(r"stream (?P<id>[0-9a-f-]{36}): (?P<image>\S+) as (?P<format>\S+) to ")

# Run inside the sender namespace (the harness's own namespace cannot reach the bed). Standard library only,
# so it starts fast and needs nothing installed.
_API_PROGRAM = r"""
import json, sys, time, urllib.error, urllib.request
base, action = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + float(sys.argv[3])

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as response:
        return json.loads(response.read())

while True:
    try:
        call("GET", "/healthz")
        break
    except (OSError, urllib.error.URLError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
if action == "prewarm":
    image = sys.argv[4]
    started = time.monotonic()
    lease = call("POST", "/v1/streams", {"image": image, "format": "raw"})
    prepared = time.monotonic() - started
    call("DELETE", "/v1/leases/" + lease["lease_id"])
    while call("GET", "/v1/streams"):
        if time.monotonic() > deadline:
            raise SystemExit("the pre-warm stream did not stop")
        time.sleep(0.1)
    print(json.dumps({"prepare_seconds": round(prepared, 3), "stream_id": lease["stream_id"]}), flush=True)
elif action == "operate":
    # The operator: at SIGUSR1 (the clock), start the stream for N receivers; let go of it once they all hold it.
    import signal
    image, receivers, max_wait = sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print("ready", flush=True)
    signal.sigwait({signal.SIGUSR1})
    started = time.monotonic()
    lease = call("POST", "/v1/streams", {"image": image, "format": "raw", "min_receivers": receivers, "max_wait": max_wait})
    while call("GET", "/v1/streams/" + lease["stream_id"])["waiting_for"] > 0:
        if time.monotonic() > deadline:
            raise SystemExit("the receivers never all joined")
        time.sleep(0.02)
    joined = time.monotonic() - started
    call("DELETE", "/v1/leases/" + lease["lease_id"])
    print(json.dumps({"stream_id": lease["stream_id"], "all_joined_seconds": round(joined, 3)}), flush=True)
elif action == "stream":
    print(json.dumps(call("GET", "/v1/streams/" + sys.argv[4])), flush=True)
"""


@dataclasses.dataclass(slots=True)
class VmcastDetails:
    """What :func:`run_vmcast` saw beyond the :class:`PeerResult`: where vmcast's time and CPU went.

    Filled in place when passed as ``details=``; every field stays at its default when it could not be had.
    """

    rate_bps: int = 0
    """The ``--rate`` given to the server, bits/s counted as IP bytes (0: unpaced)."""
    prepare_seconds: float | None = None
    """How long the pre-warm's ``POST /v1/streams`` took (hashing the image, unless cached): not timed."""
    receivers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Each receiver's JSON summary (``seconds``, ``drops``, ``kernel_drops``, ``duplicates``…) or ``{}``."""
    exit_codes: list[int | None] = dataclasses.field(default_factory=list)
    rcvbuf_errors: list[int] = dataclasses.field(default_factory=list)
    """Kernel ``RcvbufErrors`` (UDP datagrams dropped at a full socket buffer) per receiver namespace, this run."""
    server_cpu_seconds: float | None = None
    """Server process CPU from the clock start to its exit."""
    receivers_cpu_seconds: float | None = None
    """All receiver processes' CPU together."""
    launch_overhead_seconds: float | None = None
    """The largest (receiver's exit after the clock start) minus (its own ``seconds``, join to synced): its
    Python start-up, lease request, and lease release and exit."""
    stream: dict[str, Any] | None = None
    """The timed stream as ``GET /v1/streams/{id}`` described it after the run (loops, repairs…)."""
    machine_cpu_before_clock: float | None = None
    """Whole-machine busy CPU seconds from the call to the clock start (server start-up and pre-warm)."""
    reread_seconds: float | None = None
    """Clock start to the harness's own re-read of every copy with the right SHA-1 (not the timed number: see
    the module docstring)."""
    receivers_waited: bool = False
    """The receivers were started before the clock and waited for the stream (``--wait-for-stream``)."""
    all_joined_seconds: float | None = None
    """In the waiting mode: the operator's start to the last of the N receivers joined."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def vmcast_data_frame(*, payload: int = 1400, mtu: int = 1500) -> DataFrame:
    """A full vmcast data datagram on the wire: ``payload`` image bytes; the frame header, UDP, IP and Ethernet
    headers (e.g. 1458 bytes for 1400: 1.041). A datagram larger than the MTU is split into IP fragments, each
    with its own IP and Ethernet header."""
    ip_bytes = payload + FRAME_HEADER_BYTES + UDP_HEADER_BYTES + IPV4_HEADER_BYTES
    fragment_payload = (mtu - IPV4_HEADER_BYTES) // 8 * 8
    fragments = max(1, math.ceil((ip_bytes - IPV4_HEADER_BYTES) / fragment_payload))
    ip_on_wire = ip_bytes + (fragments - 1) * IPV4_HEADER_BYTES
    return DataFrame(payload=payload, wire=ip_on_wire + fragments * ETHERNET_HEADER_BYTES)


def mtu_filling_payload(mtu: int) -> int:
    """The largest vmcast payload whose datagram fits one IP packet of `mtu`, a multiple of 8 as parity needs:
    1456 at MTU 1500 (udpcast's block there too), 8952 at 9000. The harness's default on its plain-Ethernet
    bed; ``vmcast serve`` keeps 1400, which also fits the 1450-byte MTU of VXLAN tenant networks."""
    return (mtu - IPV4_HEADER_BYTES - UDP_HEADER_BYTES - FRAME_HEADER_BYTES) // 8 * 8


def vmcast_rate_bps(rate_mbit: float, *, payload: int = 1400, mtu: int = 1500, fraction: float = VMCAST_RATE_FRACTION) -> int:
    """The ``vmcast serve --rate`` (bits/s of IP bytes) that puts data frames on a ``rate_mbit`` link at ``fraction`` of it.

    The tbf on the bed meters Ethernet frames (`vmcast_data_frame`); vmcast's pacer meters IP datagrams.
    """
    ip_bytes = payload + FRAME_HEADER_BYTES + UDP_HEADER_BYTES + IPV4_HEADER_BYTES
    return int(rate_mbit * 1e6 * fraction * ip_bytes / vmcast_data_frame(payload=payload, mtu=mtu).wire)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores together (``/proc/stat``)."""
    with open("/proc/stat") as stream:
        fields = stream.readline().split()[1:]
    return sum(int(fields[i]) for i in _PROC_STAT_BUSY_FIELDS if i < len(fields)) / CLOCK_TICKS


def _process_cpu_seconds(pid: int) -> float:
    """user + system CPU of a live process (all its threads) from /proc; 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def last_json_object(text: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object (the receiver's ``--json`` summary), else ``{}``."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run_vmcast(
    bed: TestBed,
    image_path: Path,
    expected_sha1: str,
    rate_mbit: float | None,
    timeout: float,
    *,
    payload: int = 1400,
    loss: float | None = None,
    sender_rate: str | None = None,
    rate_fraction: float = VMCAST_RATE_FRACTION,
    cache_dir: Path | None = None,
    work_dir: Path | None = None,
    keep_work_dir: bool = False,
    extra_server_args: Sequence[str] = (),
    extra_receive_args: Sequence[str] = (),
    details: VmcastDetails | None = None,
    receivers_wait: bool = False,
) -> PeerResult:
    """Send ``image_path`` with ``vmcast serve`` on the sender to ``vmcast receive`` on every receiver.

    ``rate_mbit``: the link rate; the server's ``--rate`` is :func:`vmcast_rate_bps` of it (``None``:
    unpaced), or ``sender_rate`` verbatim (e.g. ``"300mbit"``, ``"0"``) when given. ``loss``: when not
    None, set as every receiver's UDP loss percent (``TestBed.set_loss``) before the run; None leaves the
    bed as built. ``cache_dir``: the server's cache (manifests keyed by image content), e.g. shared by several
    runs of one image to spare re-hashing it; by default a fresh one in the work directory. ``details``:
    a :class:`VmcastDetails` to fill in (receiver JSON summaries, drops, CPU split, stream counters).
    ``extra_server_args`` / ``extra_receive_args``: appended to every ``vmcast serve`` / ``vmcast receive``
    command line (e.g. ``--no-fec``, ``--no-gro``: one build, compared with and without an option).
    ``receivers_wait``: start the receivers before the clock, waiting for the stream, and start it at the
    clock as an operator (see the module docstring).

    ``timeout`` bounds the timed part (clock start to all verified); start-up and pre-warm have their own bounds.
    See the module docstring for what is measured.
    """
    machine_busy_at_call = machine_busy_seconds()
    image_path = Path(image_path).resolve()
    details = details if details is not None else VmcastDetails()
    receiver_count = len(bed.receivers)
    mtu = bed.link_of(bed.sender).mtu
    if sender_rate is not None:
        rate_argument = sender_rate
    elif rate_mbit is None:
        rate_argument = "0"
    else:
        rate_argument = str(vmcast_rate_bps(rate_mbit, payload=payload, mtu=mtu, fraction=rate_fraction))
    details.rate_bps = parse_rate(rate_argument)  # ValueError for a rate vmcast would refuse too
    if loss is not None:
        for receiver in bed.receivers:
            bed.set_loss(receiver, loss)

    with ToolSession(bed, "vmcast", expected_sha1, timeout, work_dir, keep_work_dir) as session:
        images = session.dir / "images"
        images.mkdir()
        (images / image_path.name).symlink_to(image_path)
        sender = bed.sender
        base_url = f"http://{sender.address}:{API_PORT}"
        server_argv = [*VMCAST_COMMAND, "serve", "--images", str(images), "--host", sender.address,
                       "--port", str(API_PORT), "--interface", sender.address, "--mcast-port", str(MULTICAST_PORT),
                       "--rate", rate_argument, "--payload", str(payload),
                       "--cache-dir", str(cache_dir if cache_dir is not None else session.dir / "cache"),
                       # A fresh state database per run: a shared cache must never resume an older run's streams.
                       "--state-db", str(session.dir / "state.sqlite3"),
                       *extra_server_args]  # fmt: skip
        server = session.start(sender, server_argv, "server")

        # ---- pre-warm (not timed): the image's first stream start hashes it; that is cached from then on.
        prewarm = session.start(sender, [sys.executable, "-c", _API_PROGRAM, base_url, "prewarm",
                                         str(PREWARM_TIMEOUT_SECONDS), image_path.name], "prewarm")  # fmt: skip
        while not session.exited("prewarm"):
            session.reap()
            if session.exited("server"):
                session.stop("prewarm")
                break
            time.sleep(POLL_INTERVAL_SECONDS)
        prewarm_output = last_json_object(_read(session.dir / "prewarm.log"))
        if session.returncode("prewarm") != 0 or not prewarm_output:
            session.notes.append(f"server did not start or pre-warm failed (server exit {session.returncode('server')}, "
                                 f"pre-warm exit {prewarm.returncode}): server log …{session.log_tail('server')} "
                                 f"pre-warm log …{session.log_tail('prewarm')}")  # fmt: skip
            session.stop_all()
            details.exit_codes = [None] * receiver_count
            return session.result()
        details.prepare_seconds = prewarm_output.get("prepare_seconds")
        session.notes.append(f"manifest pre-warmed before the clock ({details.prepare_seconds}s to prepare)")

        # ---- the timed part (in the waiting mode the receivers start just before it)
        outputs = [session.dir / f"receiver{i}.img" for i in range(receiver_count)]
        rcvbuf_before = [r.rcvbuf_errors() for r in bed.receivers]
        receiver_argv = [[*VMCAST_COMMAND, "receive", image_path.name, "--server", base_url, "--output", str(output),
                          "--interface", receiver.address, "--timeout", str(RECEIVER_DATAGRAM_TIMEOUT_SECONDS), "--json",
                          "--min-receivers", str(receiver_count), "--max-wait", str(HOLD_MAX_WAIT_SECONDS), *extra_receive_args]
                         for receiver, output in zip(bed.receivers, outputs, strict=True)]  # fmt: skip
        details.receivers_waited = receivers_wait
        # Only what comes before the receivers start is left out of the machine's CPU: their start-up counts.
        details.machine_cpu_before_clock = round(machine_busy_seconds() - machine_busy_at_call, 3)
        if receivers_wait:
            for index, (receiver, argv) in enumerate(zip(bed.receivers, receiver_argv, strict=True)):
                session.start(receiver, [*argv, "--wait-for-stream", str(timeout)], f"receiver{index}")
            operator = session.start(sender, [sys.executable, "-c", _API_PROGRAM, base_url, "operate", str(timeout),
                                              image_path.name, str(receiver_count), str(HOLD_MAX_WAIT_SECONDS)], "operator")  # fmt: skip
            receivers_waiting = _all_logged(session, [f"receiver{i}" for i in range(receiver_count)], WAITING_LINE)
            if not receivers_waiting or not _all_logged(session, ["operator"], "ready"):
                session.notes.append("the receivers did not all wait for the stream, or the operator was not ready, "
                                     f"within {WAITING_TIMEOUT_SECONDS:g}s: …{session.log_tail('receiver0')} "
                                     f"…{session.log_tail('operator')}")  # fmt: skip
                session.stop_all()
                details.exit_codes = [session.returncode(f"receiver{i}") for i in range(receiver_count)]
                return session.result()
        session.start_clock()
        server_cpu_at_clock = _process_cpu_seconds(server.pid)
        cpu_before_clock = session.cpu_seconds + server_cpu_at_clock  # server start-up and pre-warm, helper
        if receivers_wait:
            operator.send_signal(signal.SIGUSR1)
        else:
            for index, (receiver, argv) in enumerate(zip(bed.receivers, receiver_argv, strict=True)):
                session.start(receiver, argv, f"receiver{index}")

        done_at: dict[int, float] = {}

        def receiver_finished(index: int) -> Path | None:
            # The harness re-reads vmcast's copies once every receiver has exited: the re-read checks their
            # claims and is not timed, so it must not take CPU from receivers still at work.
            if session.exited(f"receiver{index}"):
                done_at.setdefault(index, time.monotonic() - session.started_at)
            elif session.exited("server"):
                session.notes.append(f"server exited ({session.returncode('server')}) while receiver{index} ran")
                session.stop(f"receiver{index}")
                done_at.setdefault(index, time.monotonic() - session.started_at)
            return outputs[index] if len(done_at) == receiver_count else None

        if not session.run_until(receiver_finished):  # a receiver hung: still check those that finished
            for index in sorted(done_at):
                if not session.verification_started(index):
                    session.verify(index, outputs[index])
        # Receivers first (a no-op for those that exited), so that what was reaped so far, less the pre-warm
        # helper, is exactly the receivers' CPU; the server, still running, comes last.
        for index in range(receiver_count):
            session.stop(f"receiver{index}")
        prewarm_cpu = cpu_before_clock - server_cpu_at_clock
        receivers_cpu = session.cpu_seconds - prewarm_cpu
        details.rcvbuf_errors = [r.rcvbuf_errors() - before for r, before in zip(bed.receivers, rcvbuf_before, strict=True)]
        details.stream = _timed_stream(session, sender, base_url)
        session.stop_all()
        details.receivers_cpu_seconds = round(receivers_cpu, 3)
        details.server_cpu_seconds = round(session.cpu_seconds - prewarm_cpu - receivers_cpu - server_cpu_at_clock, 3)
        session.cpu_seconds -= cpu_before_clock  # what PeerResult reports: server after the clock + receivers

        details.exit_codes = [session.returncode(f"receiver{i}") for i in range(receiver_count)]
        details.receivers = [last_json_object(_read(session.dir / f"receiver{i}.log")) for i in range(receiver_count)]
        if receivers_wait:
            operator = last_json_object(_read(session.dir / "operator.log"))
            details.all_joined_seconds = operator.get("all_joined_seconds")
            if session.returncode("operator") != 0:
                session.notes.append(f"the operator's start failed (exit {session.returncode('operator')}): …{session.log_tail('operator')}")
        claims_ok = [
            summary.get("verified") is True and summary.get("sha1") == expected_sha1 and code == 0
            for summary, code in zip(details.receivers, details.exit_codes, strict=True)
        ]
        for index, (ok, code) in enumerate(zip(claims_ok, details.exit_codes, strict=True)):
            if not ok:
                session.notes.append(f"receiver{index} did not report a verified copy (exit {code}): "
                                     f"…{session.log_tail(f'receiver{index}')}")  # fmt: skip
        overheads = [done_at[i] - float(s["seconds"]) for i, s in enumerate(details.receivers) if i in done_at and s.get("seconds") is not None]
        if overheads:
            details.launch_overhead_seconds = round(max(overheads), 3)
        _note_vmcast_counters(session, details)
        server_code = session.returncode("server")
        if server_code not in (0, None, -15):  # -15: it ended on our SIGTERM, the normal way
            session.notes.append(f"server exit code {server_code}; log …{session.log_tail('server')}")
        result = session.result()

    # Both checks must hold: the receiver's own claim and our re-read of its output file. The copy was verified
    # when its receiver exited (it checks the SHA-1 before); the re-read is a check of that claim, not timed.
    oks = [file_ok and claim_ok for file_ok, claim_ok in zip(result.per_receiver_sha1_ok, claims_ok, strict=True)]
    finished = max(done_at.values()) if all(oks) and len(done_at) == receiver_count else None
    details.reread_seconds = None if finished is None or result.seconds_until_all_verified is None else round(result.seconds_until_all_verified, 3)
    return dataclasses.replace(result, per_receiver_sha1_ok=oks, seconds_until_all_verified=finished, seconds_until_last_finished=finished)


def _all_logged(session: ToolSession, labels: Sequence[str], line: str) -> bool:
    """Whether every process of `labels` has logged `line` within `WAITING_TIMEOUT_SECONDS`; False as soon as
    one of them has exited without."""
    deadline = time.monotonic() + WAITING_TIMEOUT_SECONDS
    pending = list(labels)
    while time.monotonic() < deadline:
        session.reap()
        for label in list(pending):
            if line in _read(session.dir / f"{label}.log"):
                pending.remove(label)
            elif session.exited(label):
                return False
        if not pending:
            return True
        time.sleep(POLL_INTERVAL_SECONDS / 10)
    return False


def _timed_stream(session: ToolSession, sender: Any, base_url: str) -> dict[str, Any] | None:
    """The timed stream's counters (``GET /v1/streams/{id}``), its id taken from the server's log; None if unknown.

    Run with ``Host.run``, not in the session: this helper's CPU is not the tool's.
    """
    matches = list(_STREAM_LINE.finditer(_read(session.dir / "server.log")))
    if len(matches) < 2:  # the first is the pre-warm's stream
        return None
    try:
        completed = sender.run([sys.executable, "-c", _API_PROGRAM, base_url, "stream", str(STATS_TIMEOUT_SECONDS),
                                matches[-1]["id"]], capture_output=True, text=True, timeout=STATS_TIMEOUT_SECONDS + 5)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    return last_json_object(completed.stdout) or None if completed.returncode == 0 else None


def _note_vmcast_counters(session: ToolSession, details: VmcastDetails) -> None:
    """One short note of the receivers' drops and the stream's loops and repairs (the rest is in ``details``)."""
    drops: dict[str, int] = {}
    kernel_drops = []
    for summary in details.receivers:
        for reason, count in (summary.get("drops") or {}).items():
            drops[reason] = drops.get(reason, 0) + int(count)
        kernel_drops.append(summary.get("kernel_drops"))
    if any(summary for summary in details.receivers):
        seconds = [summary.get("seconds") for summary in details.receivers]
        session.notes.append(f"receivers' own join-to-synced seconds {seconds}, kernel_drops {kernel_drops}, "
                             f"drops {drops or '{}'}")  # fmt: skip
    if details.launch_overhead_seconds is not None:
        session.notes.append(f"receiver start-up+lease+exit overhead up to {details.launch_overhead_seconds:.2f}s")
    if details.stream:
        stream = details.stream
        session.notes.append(
            "stream: " + ", ".join(f"{key} {stream.get(key)}" for key in
                                   ("loops_completed", "datagrams_sent", "repair_requests", "repair_frames_sent",
                                    "fec", "parity_frames_sent", "parity_jobs", "parity_cpu_seconds", "parity_deferred", "repair_drops",
                                    "send_errors") if key in stream)
        )
    session.notes.append(f"server cpu {details.server_cpu_seconds}s, receivers cpu {details.receivers_cpu_seconds}s")
