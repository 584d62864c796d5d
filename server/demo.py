"""`vmcast demo`: a real distribution on this machine, with embedded defaults.

It generates a qcow2 image, serves it with `vmcast serve`, and runs three `vmcast receive` processes that ask
for it as raw (so the server converts it with qemu-img once) over loopback multicast; the third joins while
the first loop is already under way. Each receiver verifies its copy; the demo prints every receiver's
verified SHA-1 and throughput and checks them against `qemu-img convert` run independently.

Everything runs as separate processes talking through the real HTTP API and real multicast sockets, exactly
as on a deployment; only the network is this machine's loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

IMAGE_NAME = "demo.qcow2"
# Data the image holds: random, so neither qcow2 nor the network can cheat by compressing it, plus a
# stretch of zeros as real VM images have.
RANDOM_MIB = 96
ZERO_MIB = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiverOutcome:
    name: str
    exit_code: int
    sha1: str | None
    seconds: float | None
    size: int | None
    joined: str


def run_demo(*, workdir: Path | None, rate: str, receivers: int, keep: bool) -> int:
    # Wide enough for a whole SHA-1 per row even when the output is a pipe or a log (rich assumes 80 there).
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 110)
    if shutil.which("qemu-img") is None:
        console.print("[red]qemu-img is missing: apt-get install qemu-utils[/red]")
        return 1
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="vmcast-demo-")) if workdir is None else workdir
    images, outputs = root / "images", root / "received"
    images.mkdir(parents=True, exist_ok=True)
    outputs.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        console.print(f"[bold]vmcast demo[/bold] in {root}")
        expected_sha1, raw_size = _make_image(images / IMAGE_NAME, console)
        port = _free_tcp_port()
        server_url = f"http://127.0.0.1:{port}"
        server_log = (root / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "vmcast.server.cli", "serve", "--images", str(images), "--port", str(port),
             "--rate", rate, "--cache-dir", str(root / "cache")],
            stdout=server_log, stderr=subprocess.STDOUT,
        )
        processes.append(server)
        _wait_for_server(server_url, server)
        console.print(f"server: {server_url} (pid {server.pid}), paced at {rate}; API docs at {server_url}/docs")

        started = time.monotonic()
        running: list[tuple[str, subprocess.Popen, str]] = []
        for index in range(receivers):
            late = index == receivers - 1 and receivers > 1
            joined = "at the start"
            if late:
                # The last receiver joins mid-loop: once the stream is a third of the way through the image.
                joined = _wait_until_mid_loop(server_url, raw_size)
            name = f"receiver-{index + 1}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmcast.server.cli", "receive", IMAGE_NAME, "--format", "raw",
                 "--server", server_url, "--output", str(outputs / f"{name}.raw"), "--json"],
                stdout=subprocess.PIPE, stderr=(root / f"{name}.log").open("w"), text=True,
            )
            processes.append(proc)
            running.append((name, proc, joined))
            console.print(f"{name}: started {time.monotonic() - started:.1f} s after the first, {joined} (pid {proc.pid})")

        outcomes = []
        for name, proc, joined in running:
            out, _ = proc.communicate(timeout=600)
            outcomes.append(_outcome(name, proc.returncode, out, joined))
        return _report(console, outcomes, expected_sha1, raw_size, server_url, root)
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if own_dir and not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif keep or not own_dir:
            console.print(f"kept {root}")


def _wait_until_mid_loop(server_url: str, raw_size: int, timeout: float = 120.0) -> str:
    """Wait until the demo's stream has sent a third of a loop; say where in the loop it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        streams = httpx.get(f"{server_url}/v1/streams", timeout=5).json()
        if streams:
            stream = streams[0]
            into_loop = stream["bytes_sent"] - stream["loops_completed"] * raw_size
            if stream["loops_completed"] or into_loop >= raw_size // 3:
                return f"{100 * max(into_loop, 0) / raw_size:.0f}% into loop {stream['loops_completed'] + 1}"
        time.sleep(0.02)
    raise RuntimeError("the demo stream did not start")


def _make_image(path: Path, console: Console) -> tuple[str, int]:
    """Write a qcow2 image and return the SHA-1 and size of its raw form (computed independently)."""
    raw = path.with_suffix(".source.raw")
    with raw.open("wb") as handle:
        for _ in range(RANDOM_MIB):
            handle.write(os.urandom(1 << 20))
        handle.truncate(handle.tell() + (ZERO_MIB << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    digest = hashlib.sha1()
    with raw.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    size = raw.stat().st_size
    raw.unlink()  # only the qcow2 is served: the server must convert it
    console.print(f"image: {path.name}, qcow2 {path.stat().st_size / 2**20:.0f} MiB, raw {size / 2**20:.0f} MiB, raw sha1 {digest.hexdigest()}")
    return digest.hexdigest(), size


def _outcome(name: str, exit_code: int, stdout: str, joined: str) -> ReceiverOutcome:
    result: dict = {}
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
            break
        except ValueError:
            continue
    return ReceiverOutcome(
        name=name, exit_code=exit_code, sha1=result.get("sha1"), seconds=result.get("seconds"),
        size=result.get("bytes"), joined=joined,
    )


def _report(console: Console, outcomes: list[ReceiverOutcome], expected_sha1: str, raw_size: int, server_url: str, root: Path) -> int:
    table = Table(title=f"{IMAGE_NAME} as raw ({raw_size / 2**20:.0f} MiB) over loopback multicast")
    table.add_column("receiver")
    table.add_column("joined")
    table.add_column("verified sha1", overflow="fold", min_width=40)
    table.add_column("seconds", justify="right")
    table.add_column("throughput", justify="right")
    good = 0
    for o in outcomes:
        ok = o.exit_code == 0 and o.sha1 == expected_sha1
        good += ok
        rate = f"{o.size * 8 / o.seconds / 1e6:.0f} Mbit/s" if o.size and o.seconds else "-"
        shown = o.sha1 if ok else f"[red]FAILED (exit {o.exit_code}) {o.sha1 or ''}[/red]"
        table.add_row(o.name, o.joined, shown, f"{o.seconds:.2f}" if o.seconds else "-", rate)
    console.print(table)
    if good == len(outcomes):
        console.print(f"[green]all {good} receivers hold a verified, byte-identical copy[/green] (raw sha1 from qemu-img: {expected_sha1})")
        return 0
    console.print(f"[red]{len(outcomes) - good} of {len(outcomes)} receivers failed[/red]; logs in {root}")
    return 1


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_server(url: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vmcast serve exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"vmcast serve did not answer on {url} within {timeout:.0f} s")
