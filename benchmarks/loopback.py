"""Loopback goodput and CPU cost: one `vmcast serve`, one `vmcast receive`, real multicast on 127.0.0.1.

    python -m benchmarks.loopback [--size-mib 1024] [--payloads 1400 8192] [--rate 0] [--runs 1] [--no-gso] [--no-gro] [--rcvbuf SIZE] [--keep-cache] [--shared]

For each payload size it streams a random image unpaced (by default) to one receiver writing a file on disk,
and prints: goodput (image bits / the receiver's own time from joining to verified and synced), the receiver's
wall time from process start to exit, the receiver's drop counters, the datagrams its socket dropped for a full
buffer (below), CPU seconds per GiB of the sender process and of the receiver process (user + sys from
/proc and wait4), and of the receiver's SHA-1 verification: the CPU of its hashing thread, which hashes the
blocks in order as they are verified, and what was left to hash when the last block came (MiB, seconds).
``--no-gso`` and ``--no-gro`` are passed to ``vmcast serve`` and ``vmcast receive``, ``--rcvbuf`` and ``--keep-cache`` to ``vmcast receive``
(default: its own, a share of the memory); the receive buffer the kernel gave is recorded (``rcvbuf_bytes``). An
unpaced sender gets ahead of the receiver: what the buffer cannot hold is dropped and repaired later.

One core per side (the default on a machine with two or more): the sender (``vmcast serve`` and its parity
workers) runs on core 0 and the receiver on core 1 (``sched_setaffinity``), so each figure is what one core
does, and the two do not take turns on the same cores. ``--shared`` lets both use every core.

Kernel drops are the receiver's own socket's (its JSON ``kernel_drops``, read when it verified the image; not
the machine-wide RcvbufErrors, which counts every process's UDP), in datagrams. The kernel counts what it
would have queued whole: one datagram each, unless the receiver has UDP GRO on and the sender sends UDP GSO
batches (the defaults), when a dropped batch counts once. Then the column shows the batches times the
datagrams per batch the sender sends (its `batch_limit`): an upper bound, marked ``<=``. They include what
arrived while the receiver, having received the last block, was hashing and syncing and no longer reading:
with an unpaced sender its socket buffer overflows within milliseconds then, and nothing of that is needed.
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
from vmcast.protocol import HEADER_SIZE
from vmcast.server.pacing import TokenBucket
from vmcast.server.rates import parse_rate
from vmcast.server.sender import batch_limit
from vmcast.server.settings import IP_UDP_HEADER_SIZE

from tests.e2e.processes import (
    VMCAST,
    free_tcp_port,
    free_udp_port,
    stop,
    write_random_image,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def datagrams_per_batch(*, payload: int, rate: str) -> int:
    """The most data datagrams the sender puts in one UDP GSO batch at this payload and rate (its own rule)."""
    datagram_size = HEADER_SIZE + payload
    rate_bps = parse_rate(rate)
    bucket = TokenBucket(rate_bps=rate_bps, largest_cost=datagram_size + IP_UDP_HEADER_SIZE, now=0.0) if rate_bps else None
    return batch_limit(datagram_size=datagram_size, bucket=bucket)


def kernel_drops_in_datagrams(summary: dict, *, payload: int, rate: str, gso: bool) -> tuple[int | None, bool]:
    """``(datagrams, exact)`` the receiver's socket dropped, from its JSON summary (see the module docstring).

    Exact when every queued packet was one datagram: the sender sent no GSO batches (``--no-gso``), or the
    receiver had GRO off (the kernel then splits a batch and queues, or drops, each datagram), or the receiver
    never received a coalesced batch. Otherwise an upper bound: dropped batches x datagrams per batch.
    """
    packets = summary.get("kernel_drops")
    if packets is None:
        return None, False
    if not gso or not summary.get("gro") or not summary.get("coalesced"):
        return packets, True
    return packets * datagrams_per_batch(payload=payload, rate=rate), packets == 0


def keep_on_core(process: subprocess.Popen, core: int | None) -> subprocess.Popen:
    """Keep `process` on `core` (None: anywhere). Set as it starts, before the interpreter has made a thread
    or a child: those inherit it (the server's parity workers too)."""
    if core is not None:
        os.sched_setaffinity(process.pid, {core})
    return process


def run_once(image_dir: Path, work: Path, *, payload: int, rate: str, size: int, gso: bool = True, gro: bool = True,
             pin: bool = False, rcvbuf: str | None = None, keep_cache: bool = False) -> dict:
    port = free_tcp_port()
    server = keep_on_core(subprocess.Popen(
        [*VMCAST, "serve", "--images", str(image_dir), "--port", str(port), "--mcast-port", str(free_udp_port()),
         "--payload", str(payload), "--rate", rate, "--cache-dir", str(work / "cache"), *([] if gso else ["--no-gso"])],
        stdout=(work / "server.log").open("w"), stderr=subprocess.STDOUT,
    ), 0 if pin else None)
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
        server_cpu_before = process_cpu_seconds(server.pid)
        started = time.monotonic()
        receiver = keep_on_core(subprocess.Popen(
            [*VMCAST, "receive", "bench.raw", "--server", url, "--output", str(output), "--json",
             # The stream holds until the receiver has joined, so it gets the image in order from frame 0.
             "--min-receivers", "1", *([] if gro else ["--no-gro"]), *([] if rcvbuf is None else ["--rcvbuf", rcvbuf]),
             *(["--keep-cache"] if keep_cache else [])],
            stdout=subprocess.PIPE, stderr=(work / "receiver.log").open("w"), text=True,
        ), 1 if pin else None)
        _, status, usage = os.wait4(receiver.pid, 0)
        wall = time.monotonic() - started
        server_cpu = process_cpu_seconds(server.pid) - server_cpu_before
        out = receiver.stdout.read()
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        code = os.waitstatus_to_exitcode(status)
        drops, exact = kernel_drops_in_datagrams(summary, payload=payload, rate=rate, gso=gso)
        return {
            "payload": payload,
            "rate": rate,
            "size_bytes": size,
            "gso": gso,
            "gro": summary.get("gro", gro),
            "exit": code,
            "verified": code == 0,
            "wall_seconds": round(wall, 3),
            "receiver_seconds": summary.get("seconds"),
            "goodput_gbit": round(size * 8 / summary["seconds"] / 1e9, 3) if summary.get("seconds") else None,
            "sender_cpu_s_per_gib": round(server_cpu / (size / 2**30), 3),
            "receiver_cpu_s_per_gib": round((usage.ru_utime + usage.ru_stime) / (size / 2**30), 3),
            # The whole image's SHA-1 runs in the receiver's hashing thread while blocks arrive (part of the
            # receiver's CPU); what it had not reached when the last block was verified is hashed at the end.
            "sha1_cpu_s_per_gib": round(summary.get("sha1_cpu_seconds", 0.0) / (size / 2**30), 3),
            "unhashed_at_end_bytes": summary.get("unhashed_at_end"),
            "hash_tail_seconds": summary.get("hash_tail_seconds"),
            "sync_seconds": summary.get("sync_seconds"),
            "kernel_drops_packets": summary.get("kernel_drops"),
            "kernel_drops_datagrams": drops,
            "kernel_drops_exact": exact,
            "coalesced_receives": summary.get("coalesced"),
            "batched_receives": summary.get("batched"),
            "receiver_drops": summary.get("drops"),
            "rcvbuf_bytes": summary.get("rcvbuf"),
            "keep_cache": keep_cache,
            "cores": os.cpu_count(),
            "one_core_each": pin,
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
    parser.add_argument("--no-gso", action="store_true", help="vmcast serve --no-gso: one datagram per send")
    parser.add_argument("--no-gro", action="store_true", help="vmcast receive --no-gro: one datagram per receive")
    parser.add_argument("--keep-cache", action="store_true", help="vmcast receive --keep-cache (default: the receiver drops the image's pages once written back)")
    parser.add_argument("--rcvbuf", help="vmcast receive --rcvbuf (default: the receiver's own, a share of the memory)")
    parser.add_argument("--shared", action="store_true", help="sender and receiver share every core (default: core 0 and core 1)")
    args = parser.parse_args()
    pin = not args.shared and (os.cpu_count() or 1) >= 2
    cores = "sender on core 0, receiver on core 1" if pin else f"{os.cpu_count()} cores shared by sender and receiver"
    with tempfile.TemporaryDirectory(prefix="vmcast-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        write_random_image(images / "bench.raw", args.size_mib)
        os.sync()  # the image's writeback would otherwise overlap the first run, on the receiver's disk
        print(f"loopback, 1 receiver, {args.size_mib} MiB random image, rate {args.rate}, UDP GSO {'off' if args.no_gso else 'on'}, "
              f"UDP GRO {'off' if args.no_gro else 'on'}, receive buffer {args.rcvbuf or 'the receiver default'}, page cache {'kept' if args.keep_cache else 'dropped behind'}, {cores}")
        print(f"{'payload':>8} {'verified':>8} {'goodput':>12} {'receiver wall':>13} {'sender cpu':>14} {'receiver cpu':>14} "
              f"{'of it sha1':>14} {'sha1 at end':>19} {'sync':>7} {'kernel drops':>14}  receiver drops")  # fmt: skip
        for payload in args.payloads:
            for _ in range(args.runs):
                result = run_once(images, work, payload=payload, rate=args.rate, size=args.size_mib << 20, gso=not args.no_gso, gro=not args.no_gro, rcvbuf=args.rcvbuf, keep_cache=args.keep_cache,
                                  pin=pin)
                drops = result["kernel_drops_datagrams"]
                drops_text = "?" if drops is None else f"{'' if result['kernel_drops_exact'] else '<='}{drops}"
                at_end = f"{(result['unhashed_at_end_bytes'] or 0) / 2**20:.1f} MiB {result['hash_tail_seconds'] or 0:.3f} s"
                print(f"{payload:>8} {str(result['verified']):>8} {result['goodput_gbit'] or 0:>8.2f} Gb/s {result['wall_seconds']:>11.2f} s "
                      f"{result['sender_cpu_s_per_gib']:>8.2f} s/GiB {result['receiver_cpu_s_per_gib']:>8.2f} s/GiB "
                      f"{result['sha1_cpu_s_per_gib']:>8.2f} s/GiB {at_end:>19} {result['sync_seconds'] or 0:>5.3f} s "
                      f"{drops_text:>14}  {result['receiver_drops']}")  # fmt: skip
                if args.json:
                    with args.json.open("a") as handle:
                        handle.write(json.dumps(result) + "\n")
        print("of it sha1: CPU of the receiver's hashing thread, which computes the image's SHA-1 while blocks arrive; "
              "sha1 at end: what it had not hashed when the last block was verified, and the time to finish it; "
              "sync: the final fsync")
        print("kernel drops: datagrams the receiver's socket dropped for a full buffer (<=: GSO batches dropped whole, "
              "counted at the sender's batch size), hashing and syncing after the last block included")
    return 0


if __name__ == "__main__":
    sys.exit(main())
