"""Loopback goodput and CPU cost: one `vmcast serve`, one `vmcast receive`, real multicast on 127.0.0.1.

    python -m benchmarks.loopback [--size-mib 1024] [--payloads 1400 8192] [--rate 0] [--runs 1]

For each payload size it streams a random image unpaced (by default) to one receiver writing a file on disk,
and prints: goodput (image bits / receiver wall time from lease to verified), loops the sender needed, the
receiver's drop counters, kernel receive-buffer drops (/proc/net/snmp RcvbufErrors), and CPU seconds per GiB
of the sender process and of the receiver process (user + sys from /proc and wait4). Sender and receiver
share this machine's cores; the table says how many there are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.e2e.processes import VMCAST, free_tcp_port, free_udp_port, stop, write_random_image

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rcvbuf_errors() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def run_once(image_dir: Path, work: Path, *, payload: int, rate: str, size: int) -> dict:
    port = free_tcp_port()
    server = subprocess.Popen(
        [*VMCAST, "serve", "--images", str(image_dir), "--port", str(port), "--mcast-port", str(free_udp_port()),
         "--payload", str(payload), "--rate", rate, "--cache-dir", str(work / "cache")],
        stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        # Warm the manifest cache so the timed run measures the transfer, not the first hashing of the image.
        lease = httpx.post(f"{url}/v1/streams", json={"image": "bench.raw", "format": "raw"}, timeout=600).json()
        httpx.delete(f"{url}/v1/leases/{lease['lease_id']}")
        time.sleep(1.2)
        output = work / "received.raw"
        output.unlink(missing_ok=True)
        drops_before, server_cpu_before = rcvbuf_errors(), process_cpu_seconds(server.pid)
        started = time.monotonic()
        receiver = subprocess.Popen(
            [*VMCAST, "receive", "bench.raw", "--server", url, "--output", str(output), "--json"],
            stdout=subprocess.PIPE, stderr=(work / "receiver.log").open("w"), text=True,
        )
        _, status, usage = os.wait4(receiver.pid, 0)
        wall = time.monotonic() - started
        server_cpu = process_cpu_seconds(server.pid) - server_cpu_before
        out = receiver.stdout.read()
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        code = os.waitstatus_to_exitcode(status)
        return {
            "payload": payload,
            "rate": rate,
            "size_bytes": size,
            "exit": code,
            "verified": code == 0,
            "wall_seconds": round(wall, 3),
            "receiver_seconds": summary.get("seconds"),
            "goodput_gbit": round(size * 8 / summary["seconds"] / 1e9, 3) if summary.get("seconds") else None,
            "sender_cpu_s_per_gib": round(server_cpu / (size / 2**30), 3),
            "receiver_cpu_s_per_gib": round((usage.ru_utime + usage.ru_stime) / (size / 2**30), 3),
            "kernel_rcvbuf_drops": rcvbuf_errors() - drops_before,
            "receiver_drops": summary.get("drops"),
            "cores": os.cpu_count(),
        }
    finally:
        stop(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="image size in MiB (random bytes)")
    parser.add_argument("--payloads", type=int, nargs="+", default=[1400, 8192], help="data payload sizes")
    parser.add_argument("--rate", default="0", help="sender rate (0 = unpaced)")
    parser.add_argument("--runs", type=int, default=1, help="runs per payload")
    parser.add_argument("--json", type=Path, help="also append JSON lines here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmcast-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        write_random_image(images / "bench.raw", args.size_mib)
        print(f"loopback, 1 receiver, {args.size_mib} MiB random image, rate {args.rate}, {os.cpu_count()} cores shared by sender and receiver")
        print(f"{'payload':>8} {'verified':>8} {'goodput':>12} {'sender cpu':>14} {'receiver cpu':>14} {'kernel drops':>12}  receiver drops")
        for payload in args.payloads:
            for _ in range(args.runs):
                result = run_once(images, work, payload=payload, rate=args.rate, size=args.size_mib << 20)
                print(f"{payload:>8} {str(result['verified']):>8} {result['goodput_gbit'] or 0:>8.2f} Gb/s "
                      f"{result['sender_cpu_s_per_gib']:>8.2f} s/GiB {result['receiver_cpu_s_per_gib']:>8.2f} s/GiB "
                      f"{result['kernel_rcvbuf_drops']:>12}  {result['receiver_drops']}")
                if args.json:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
