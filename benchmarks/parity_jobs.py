"""What a parity job costs the server and its workers: the blocks named in the image file, or copied to them.

    python -m benchmarks.parity_jobs [--size-mib 1024] [--symbols 12] [--runs 3] [--frame-size 1456]

Writes a random image of ``--size-mib`` to a temporary file, maps it as a sender does, and asks the server's
parity workers (`vmcast.server.parity.ParityWorkers`, the real processes) for ``--symbols`` repair symbols of
every block, the way a stream at a few percent loss does: one job per block, at most `JOBS_IN_FLIGHT` at a
time. Each run does it twice, alternating: ``file``, the job names the block in the image file
(``/proc/<pid>/fd/<n>``) and the worker reads it there; ``inline``, the job carries a copy of the block through
the worker's pipe. Prints per mode and run: wall seconds, CPU seconds of this process (the sender's side:
copies, pipe writes, answers) and of the worker processes (``/proc/<pid>/stat``), jobs done.

Two worker processes (the server's `PARITY_PROCESSES`) and this process share the machine's cores; say how
many the figures used. Measured on the 2-core test machine (the defaults, three runs): file 0.45-0.63 CPU-s
here and 4.22-5.26 in the workers, 2.66-3.38 s; inline 1.14-1.28 and 5.33-6.18, 3.82-4.72 s.
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import time

from vmcast.protocol import manifest_of
from vmcast.server.parity import JOBS_IN_FLIGHT, PARITY_PROCESSES, ParitySource, ParityWorkers

CHUNK = 1 << 20
WORKER_START_SECONDS = 1.0


def _process_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(image, *, mode: str, frame_size: int, symbols: int, key: bytes) -> dict[str, float | int | str]:
    """Parity for every block of `image` (an open file) in `mode` ("file" or "inline")."""
    size = os.fstat(image.fileno()).st_size
    with mmap.mmap(image.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        layout = manifest_of(view, frame_size=frame_size).layout
        workers = ParityWorkers()
        try:
            workers.warm_up()
            time.sleep(WORKER_START_SECONDS)  # their start-up (importing vmcast.protocol) is not a job's cost
            pids = workers.pids
            path = f"/proc/{os.getpid()}/fd/{image.fileno()}" if mode == "file" else None
            source = ParitySource(view=view, layout=layout, workers=workers, key=key, path=path)
            here, there, started = time.process_time(), sum(map(_process_cpu_seconds, pids)), time.monotonic()
            for block in range(layout.block_count):
                source.prefetch(block, symbols)
                while source.jobs_in_flight >= JOBS_IN_FLIGHT:  # as the sender does: a few in flight, the rest wait
                    source.poll()
                    source.wait(0.01)
            while source.jobs_in_flight:
                source.poll()
                source.wait(0.01)
            result = {
                "mode": mode, "mib": size >> 20, "blocks": layout.block_count, "jobs": source.jobs,
                "wall_seconds": round(time.monotonic() - started, 2),
                "sender_cpu_seconds": round(time.process_time() - here, 2),
                "workers_cpu_seconds": round(sum(map(_process_cpu_seconds, pids)) - there, 2),
            }  # fmt: skip
            source.close()
            del view, source
            return result
        finally:
            workers.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity_jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--symbols", type=int, default=12, help="repair symbols asked per block (default 12)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs per mode (default 3)")
    parser.add_argument("--frame-size", type=int, default=1456, help="symbol size, a multiple of 8 (default 1456)")
    args = parser.parse_args(argv)
    if args.size_mib < 1 or args.symbols < 1 or args.runs < 1 or args.frame_size % 8:
        parser.error("--size-mib, --symbols and --runs must be at least 1, --frame-size a multiple of 8")
    print(f"{os.cpu_count()} cores, {PARITY_PROCESSES} worker processes, {args.size_mib} MiB, {args.symbols} symbols per block")
    with tempfile.TemporaryFile(dir="/var/tmp") as image:
        for _ in range(args.size_mib):
            image.write(os.urandom(CHUNK))
        image.flush()
        for run in range(args.runs):
            for mode in ("file", "inline"):
                result = run_once(image, mode=mode, frame_size=args.frame_size, symbols=args.symbols, key=f"{mode}{run}".encode())
                print("  ".join(f"{name} {value}" for name, value in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
