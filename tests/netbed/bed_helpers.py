"""Helpers for the end-to-end tests on the network-namespace test bed (`benchmarks.testbed`).

One `Bed` is a `TestBed` (a sender host and N receiver hosts, each in its own network namespace, on one
rate-limited bridge) plus what the tests do on it: `vmcast serve` on the sender (`Server`), `vmcast receive`
on the receivers (`Receiver`), and the server's HTTP API called from inside the sender's namespace
(`NamespaceHttp`; the test process itself lives in the machine's namespace, which no bed is connected to).

Resource handling: `netbed()` owns everything. On the way out it stops, by PID, every process a helper
started (SIGINT, then SIGKILL if it will not go), ends the HTTP thread, tears the bed down, and then
*checks* that no namespace of the bed and no process remains: a leak fails the test that caused it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from benchmarks.testbed import Host, LinkSpec, TestBed
from tests.e2e.processes import last_json_object

VMCAST = [sys.executable, "-m", "vmcast.server.cli"]
RELAY_SCRIPT = Path(__file__).with_name("corrupting_relay.py")
PARITY_ASKER_SCRIPT = Path(__file__).with_name("parity_asker.py")

# Every bed is a fresh set of namespaces: fixed ports cannot clash with anything.
API_PORT = 8470
MCAST_PORT = 8471

# Links are rate-limited well below what two cores can push through veth, so the limit (not the CPU) paces
# the transfer; the server sends below the link rate so that tbf never drops (loss is the bed's nft rule).
LINK_MBIT = 150.0
SEND_RATE = "100mbit"
SEND_RATE_BPS = 100e6
# vmcast's default data payload, and IPv4 + UDP + frame header per datagram (docs/PROTOCOL.md section 2).
FRAME_PAYLOAD = 1400
FRAME_OVERHEAD = 20 + 8 + 16

# How long `vmcast serve` may take to answer /healthz (it hashes a new image once; the manifest is cached).
SERVER_START_TIMEOUT = 60.0
STOP_GRACE = 10.0

T = TypeVar("T")


def loop_seconds(image_bytes: int, rate_bps: float = SEND_RATE_BPS) -> float:
    """Seconds one loop of the carousel takes at `rate_bps` (wire bits, as `--rate` counts them)."""
    frames = -(-image_bytes // FRAME_PAYLOAD)
    return (image_bytes + frames * FRAME_OVERHEAD) * 8 / rate_bps


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something true; return that. AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- HTTP from inside a namespace -------------------------------------------------------------------------------

_CLONE_NEWNET = 0x40000000


def _enter_network_namespace(netns: str) -> None:
    """(In a worker thread.) Move this thread, and only it, into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {netns}: {os.strerror(error)}")
    finally:
        os.close(fd)


class NamespaceHttp:
    """HTTP requests made from inside one namespace, by one worker thread that entered it with setns(2).

    A network namespace is a per-thread property on Linux: the thread's sockets live in the bed, the rest of
    the test process does not move. Cheaper than a process per request, so tests can poll.

    Resource handling: `close` ends the thread (it holds a reference to the namespace until then).
    """

    def __init__(self, netns: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"http-{netns}", initializer=_enter_network_namespace, initargs=(netns,)
        )

    def request(self, method: str, url: str, *, timeout: float = 30.0, **kwargs: Any) -> httpx.Response:
        """One request; httpx's TransportError (server down, refused) propagates."""
        return self._pool.submit(httpx.request, method, url, timeout=timeout, **kwargs).result()

    def get_json(self, url: str) -> Any:
        response = self.request("GET", url)
        assert response.status_code == 200, f"GET {url}: {response.status_code} {response.text}"
        return response.json()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- processes ----------------------------------------------------------------------------------------------------


def _stop_by_pid(process: subprocess.Popen, *, grace: float = STOP_GRACE) -> None:
    """SIGINT (so a receiver releases its lease), then SIGKILL if it does not go within `grace` seconds."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


def _tail(path: Path, characters: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except FileNotFoundError:
        return "(no log)"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverOutcome:
    """How one run of `vmcast receive` ended."""

    name: str
    """Which receiver, and which run of it (``receiver1#2``)."""
    exit_code: int
    summary: dict[str, Any]
    """The last JSON object it printed on stdout (``--json``); empty if none."""
    seconds: float
    """Wall time from its start until the test saw it ended."""
    log_tail: str
    """The end of its stderr (progress and log lines), for failure messages."""

    def describe(self) -> str:
        return f"{self.name} exited {self.exit_code} after {self.seconds:.1f} s, summary {json.dumps(self.summary)}\n--- stderr tail ---\n{self.log_tail}"


class Receiver:
    """`vmcast receive ... --json` on one receiver host, which may be started, killed and started again.

    Every run has the same command line (so a restart is exactly what an operator would type again), and
    its own stdout/stderr files in the work directory.
    """

    def __init__(self, *, host: Host, argv: Sequence[str], output: Path, workdir: Path) -> None:
        self.host = host
        self.argv = list(argv)
        self.output = output
        self.workdir = workdir
        self.runs = 0
        self.process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._stdout: Path | None = None
        self._stderr: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.host.name}#{self.runs}"

    @property
    def state_file(self) -> Path:
        """Where the receiver keeps what it verified, to resume after a crash (``<output>.vmcast.json``)."""
        return self.output.with_name(self.output.name + ".vmcast.json")

    def verified_blocks_saved(self) -> int:
        """Blocks the state file says were verified and synced (0 while there is no readable state file)."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return 0
        count = state.get("verified_block_count") if isinstance(state, dict) else None
        return count if isinstance(count, int) else 0

    def start(self) -> Receiver:
        assert not self.running(), f"{self.name} is still running"
        self.runs += 1
        self._stdout = self.workdir / f"{self.host.name}.{self.runs}.out"
        self._stderr = self.workdir / f"{self.host.name}.{self.runs}.log"
        with self._stdout.open("w") as out, self._stderr.open("w") as err:
            self.process = self.host.popen(self.argv, stdout=out, stderr=err)
        self._started_at = time.monotonic()
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def seconds_running(self) -> float:
        return time.monotonic() - self._started_at

    def has_logged(self, text: str) -> bool:
        """Whether this run's stderr holds `text` (``"joined "``: the group is joined, data is arriving)."""
        return self._stderr is not None and text in _tail(self._stderr, 1 << 20)

    def send(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> ReceiverOutcome:
        """SIGKILL: no clean-up at all (the lease is left to expire); returns the (empty) outcome."""
        self.send(signal.SIGKILL)
        return self.wait(timeout=STOP_GRACE)

    def interrupt(self) -> ReceiverOutcome:
        """SIGINT, as Ctrl-C: the receiver cleans up, releases its lease and exits 130."""
        self.send(signal.SIGINT)
        return self.wait(timeout=STOP_GRACE)

    def wait(self, *, timeout: float) -> ReceiverOutcome:
        """Wait for this run to end; on timeout stop it and fail, with its log."""
        assert self.process is not None and self._stdout is not None and self._stderr is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_by_pid(self.process)
            raise AssertionError(
                f"{self.name} did not finish within {timeout:g} s\n--- stderr tail ---\n{_tail(self._stderr)}"
            ) from None
        return ReceiverOutcome(
            name=self.name,
            exit_code=self.process.returncode,
            summary=last_json_object(self._stdout.read_text(errors="replace")),
            seconds=time.monotonic() - self._started_at,
            log_tail=_tail(self._stderr),
        )

    def stop(self) -> None:
        if self.process is not None:
            _stop_by_pid(self.process)


class Server:
    """`vmcast serve` on the sender host, with its API on the sender's bed address (reachable by unicast)."""

    def __init__(self, *, bed: Bed, argv: Sequence[str], log: Path) -> None:
        self.bed = bed
        self.argv = list(argv)
        self.log = log
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Server:
        """Start it (again, with the very same command line) and wait until /healthz answers."""
        assert self.process is None or self.process.poll() is not None, "the server is still running"
        self.starts += 1
        with self.log.open("a") as log:
            log.write(f"\n===== start {self.starts} =====\n")
            log.flush()
            self.process = self.bed.sender.popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert self.process.poll() is None, f"vmcast serve exited {self.process.returncode}:\n{_tail(self.log)}"
            try:
                if self.bed.http.request("GET", f"{self.bed.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"vmcast serve did not come up:\n{_tail(self.log)}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all; what survives is what the state database holds."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_GRACE)

    def stop(self) -> None:
        if self.process is not None:
            _stop_by_pid(self.process)


class Bed:
    """A built `TestBed` and the vmcast processes on it; made by `netbed()`."""

    def __init__(self, *, testbed: TestBed, http: NamespaceHttp, workdir: Path) -> None:
        self.testbed = testbed
        self.http = http
        self.workdir = workdir
        self.url = f"http://{testbed.sender.address}:{API_PORT}"
        self._receivers: list[Receiver] = []
        self._servers: list[Server] = []
        self._others: list[subprocess.Popen] = []

    @property
    def sender(self) -> Host:
        return self.testbed.sender

    @property
    def receiver_hosts(self) -> list[Host]:
        return self.testbed.receivers

    # -- processes

    def serve(self, images: Path, *extra: str, interface: str | None = None, rate: str = SEND_RATE) -> Server:
        """Start `vmcast serve` on the sender: API on the sender's address, multicast out of `interface`
        (default: the sender's bed address), paced at `rate`, cache and state in the work directory."""
        argv = [
            *VMCAST, "serve", "--images", str(images), "--host", self.sender.address, "--port", str(API_PORT),
            "--interface", interface or self.sender.address, "--mcast-port", str(MCAST_PORT), "--rate", rate,
            "--cache-dir", str(self.workdir / "server-cache"), *extra,
        ]  # fmt: skip
        server = Server(bed=self, argv=argv, log=self.workdir / "server.log")
        self._servers.append(server)
        return server.start()

    def receiver(self, index: int, image: str, *options: str) -> Receiver:
        """`vmcast receive IMAGE --server URL [options]` on receiver `index` (not started yet)."""
        host = self.receiver_hosts[index]
        output = self.workdir / f"{host.name}.raw"
        argv = [
            *VMCAST, "receive", image, "--server", self.url, "--output", str(output),
            "--interface", host.address, "--json", *options,
        ]  # fmt: skip
        return self._add(Receiver(host=host, argv=argv, output=output, workdir=self.workdir))

    def group_receiver(self, index: int, *, group: str, port: int, cookie: str) -> Receiver:
        """`vmcast receive --group --port --cookie` (no server) on receiver `index` (not started yet)."""
        host = self.receiver_hosts[index]
        output = self.workdir / f"{host.name}.raw"
        argv = [
            *VMCAST, "receive", "--group", group, "--port", str(port), "--cookie", cookie, "--output", str(output),
            "--interface", host.address, "--json",
        ]  # fmt: skip
        return self._add(Receiver(host=host, argv=argv, output=output, workdir=self.workdir))

    def _add(self, receiver: Receiver) -> Receiver:
        self._receivers.append(receiver)
        return receiver

    def start_on_sender(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Any other process on the sender host (the corrupting relay), stopped by `netbed()` at the end."""
        process = self.sender.popen(argv, **kwargs)
        self._others.append(process)
        return process

    def stop_everything(self) -> None:
        """Stop every process a helper started, by PID: receivers first (they release leases), then the rest."""
        for receiver in self._receivers:
            receiver.stop()
        for process in self._others:
            _stop_by_pid(process)
        for server in self._servers:
            server.stop()

    def all_processes(self) -> list[subprocess.Popen]:
        return [
            *(r.process for r in self._receivers if r.process is not None),
            *(s.process for s in self._servers if s.process is not None),
            *self._others,
        ]

    # -- the API

    def streams(self) -> list[dict[str, Any]]:
        """`GET /v1/streams`: the running streams."""
        return self.http.get_json(f"{self.url}/v1/streams")

    def stream(self, stream_id: str) -> dict[str, Any]:
        """`GET /v1/streams/{id}`: one stream, running or recently stopped."""
        return self.http.get_json(f"{self.url}/v1/streams/{stream_id}")

    def start_stream(self, image: str, format: str = "raw") -> dict[str, Any]:
        """`POST /v1/streams`: a lease on the image's stream (group, port, cookie, ...)."""
        response = self.http.request("POST", f"{self.url}/v1/streams", json={"image": image, "format": format})
        assert response.status_code == 201, f"POST /v1/streams: {response.status_code} {response.text}"
        return response.json()

    def release(self, lease_id: str) -> dict[str, Any]:
        response = self.http.request("DELETE", f"{self.url}/v1/leases/{lease_id}")
        assert response.status_code == 200, f"DELETE lease: {response.status_code} {response.text}"
        return response.json()

    def wait_for_stream(self, *, sent_fraction: float, image_bytes: int, timeout: float) -> dict[str, Any]:
        """Wait until the (only) running stream has sent `sent_fraction` of a loop's data; return it."""

        def far_enough() -> dict[str, Any] | None:
            streams = self.streams()
            if streams and streams[0]["bytes_sent"] >= sent_fraction * image_bytes:
                return streams[0]
            return None

        return wait_until(
            far_enough, timeout=timeout, what=f"the stream to send {sent_fraction:.0%} of the image", interval=0.05
        )

    def wait_for_all_streams_stopped(self, stream_ids: Sequence[str], *, timeout: float) -> None:
        """No stream runs any more, and each of `stream_ids` shows state ``stopped`` with no references."""
        wait_until(lambda: self.streams() == [], timeout=timeout, what="every stream to stop (GET /v1/streams empty)")
        for stream_id in stream_ids:
            stream = self.stream(stream_id)
            assert stream["state"] == "stopped" and stream["references"] == 0, stream


@contextmanager
def netbed(workdir: Path, *, receiver_loss: Sequence[float], rate_mbit: float = LINK_MBIT) -> Iterator[Bed]:
    """A bed with one receiver per entry of `receiver_loss` (the UDP loss, in percent, on its link), every
    link limited to `rate_mbit`; on exit everything is stopped, torn down and checked gone."""
    links = [LinkSpec(rate_mbit=rate_mbit, loss_percent=loss) for loss in receiver_loss]
    with TestBed(receivers=len(links), link=LinkSpec(rate_mbit=rate_mbit), receiver_links=links) as testbed:
        namespaces = [testbed.hub_netns, *(host.netns for host in testbed.hosts)]
        http = NamespaceHttp(testbed.sender.netns)
        bed = Bed(testbed=testbed, http=http, workdir=workdir)
        try:
            yield bed
        finally:
            bed.stop_everything()
            http.close()
    leftover_namespaces = sorted(set(namespaces) & _existing_namespaces())
    assert not leftover_namespaces, f"namespaces left behind: {leftover_namespaces}"
    alive = [process.pid for process in bed.all_processes() if process.poll() is None]
    assert not alive, f"processes left running: {alive}"


def _existing_namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


# -- what every case ends with ------------------------------------------------------------------------------------


def assert_verified(outcome: ReceiverOutcome, output: Path, expected_sha1: str, *, context: str = "") -> None:
    """Exit 0, the summary says verified with the image's SHA-1, and the file itself hashes to it.

    `context` (a seed, a schedule) goes into the failure message."""
    prefix = f"{context}\n" if context else ""
    assert outcome.exit_code == 0, prefix + outcome.describe()
    assert outcome.summary.get("verified") is True, prefix + outcome.describe()
    assert outcome.summary.get("sha1") == expected_sha1, prefix + outcome.describe()
    actual = sha1_of(output)
    assert actual == expected_sha1, (
        f"{prefix}{outcome.name} reported verified but {output} hashes to {actual}, not {expected_sha1}"
    )


def run_seed() -> int:
    """The seed of a randomized test: ``VMCAST_NETBED_SEED`` if set (to replay a failure), else a fresh one."""
    return int(os.environ.get("VMCAST_NETBED_SEED") or random.SystemRandom().randrange(1 << 32))
