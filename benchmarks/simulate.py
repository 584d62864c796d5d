"""The scale model: the real sender and receiver state machines, thousands of receivers, a simulated lossy link.

    python -m benchmarks.simulate                 # the default scenarios (~5 CPU minutes; --jobs 2 to use two cores)
    python -m benchmarks.simulate --quick         # CI smoke: up to 1,000 receivers, well under a minute
    python -m benchmarks.simulate --receivers 1000 --loss 1% ge:1%:20 --late --json out.jsonl
    python -m benchmarks.simulate --receivers 1000 --loss 1% --set REQUEST_INTERVAL=0.1 --set REORDER_MARGIN=8
    python -m benchmarks.simulate --tune --receivers 1000 --loss 1%
    python -m benchmarks.simulate --repair fec --receivers 10000 --loss 1% 5% ge:1%:20 --jobs 2

vmcast.protocol is sans-IO, so the real `Carousel` (sender, with its repair queue) and, per receiver, the real
`Assembly` and `RepairPlanner` run in one process with explicit time (benchmarks/simulation/model.py says
exactly what is modelled). Each scenario runs with per-frame NACK repair (`--repair nack`) and with per-block
RaptorQ parity (`--repair fec`: real symbols, real decoding), both by default. Each receiver's completion time is measured from its own join and given as a
multiple of one loop at the link rate, the physical limit for the image (a single receiver without loss
needs that plus one metadata datagram).

The model image is small (2,000 frames by default) so that 10,000 receivers fit in minutes. The link rate is
scaled so that one loop of it lasts `--loop-seconds` (10 s: a 1.1 GiB image at 1 Gbit/s), and protocol
timers keep their real values in seconds: what repair latency costs relative to a loop is then realistic.
What is not: a model frame stands for ~380 real ones, so REORDER_MARGIN (in frames) is ~380 times longer
in time than on a 1 Gbit/s link, and a receiver loses ~380 times fewer frames per request interval (so
MAX_RANGES_PER_REQUEST never binds here); run with `--frames 767000 --link-rate 1e9 --receivers 1` for those.

Real decoding costs ~4 ms per block and receiver (2 CPU minutes at 10,000 receivers); `--fec-decode count`
counts a decodable block as recovered instead (the smoke test checks both agree on a small run).

Besides the protocol runs it prints a counting model of per-frame NACK repair versus per-block parity (FEC)
for the same loss models (benchmarks/simulation/fec.py; needs numpy, which vmcast does not depend on).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.simulation import fec as fec_model
from benchmarks.simulation.model import (
    IP_UDP_BYTES,
    TUNABLES,
    VARIANTS,
    Image,
    LossModel,
    Result,
    Scenario,
    check_variant,
    overridden,
    simulate,
)

DEFAULT_RECEIVERS = (1, 100, 1000, 10_000)
QUICK_RECEIVERS = (1, 100, 1000)
DEFAULT_LOSSES = ("1%", "5%", "ge:1%:20")
QUICK_LOSSES = ("1%", "ge:1%:20")
REPAIR_MODES = ("nack", "fec")

# Tuning: each line is one run's overrides; the first is the protocol as it is.
TUNING_GRID: tuple[dict[str, float], ...] = (
    {},
    {"REQUEST_INTERVAL": 0.05},
    {"REQUEST_INTERVAL": 0.1},
    {"REQUEST_INTERVAL": 0.5},
    {"REORDER_MARGIN": 0},
    {"REORDER_MARGIN": 8},
    {"REORDER_MARGIN": 256},
    {"REREQUEST_AFTER": 0.3},
    {"REREQUEST_AFTER": 0.5},
    {"REREQUEST_AFTER": 3.0},
    {"MAX_REPAIRS_IN_A_ROW": 0},
    {"MAX_REPAIRS_IN_A_ROW": 2},
    {"MAX_REPAIRS_IN_A_ROW": 4},
    {"REQUEST_INTERVAL": 0.1, "REORDER_MARGIN": 8, "REREQUEST_AFTER": 0.5},
    {"PARITY_SPARE": 0},
    {"PARITY_SPARE": 4},
)


def default_scenarios(receivers: tuple[int, ...], losses: tuple[str, ...], *, late: bool, baseline: bool,
                      no_repair: tuple[int, ...], skip: tuple[tuple[int, str], ...] = (),
                      modes: tuple[str, ...] = REPAIR_MODES) -> list[Scenario]:
    scenarios = [Scenario(1)] if baseline else []
    for n in receivers:
        for loss in losses:
            if (n, loss) not in skip:
                scenarios.extend(Scenario(n, LossModel.parse(loss), fec=mode == "fec") for mode in modes)
    if late:
        for n in receivers:
            if n > 1:
                scenarios.extend(Scenario(n, LossModel.parse(losses[0]), join_spread=1.0, fec=mode == "fec") for mode in modes)
    for n in no_repair:
        scenarios.append(Scenario(n, LossModel.parse(losses[0]), repair=False))
    return scenarios


# -- running, in this process or in a few -------------------------------------------------------------------

_images: dict[tuple[int, int], Image] = {}


def _image(frames: int, frame_size: int) -> Image:
    key = (frames, frame_size)
    if key not in _images:
        _images[key] = Image.random(frames=frames, frame_size=frame_size)
    return _images[key]


def _run_one(job: tuple[Scenario, int, int, float, int, dict[str, float], bool, dict[str, object], str]) -> Result:
    scenario, frames, frame_size, link_rate, seed, overrides, feed_duplicates, variant, decode = job
    return simulate(scenario, _image(frames, frame_size), link_rate=link_rate, seed=seed, overrides=overrides,
                    feed_duplicates=feed_duplicates, variant=variant, decode=decode)


def run_all(jobs: list[tuple], *, processes: int, progress) -> list[Result]:
    if processes <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(_run_one(job))
            progress(results[-1])
        return results
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes) as pool:
        # The biggest first, so that the processes finish together; results come back in the jobs' order.
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][0].receivers * (4 if jobs[i][0].fec else 1))
        futures = {i: pool.submit(_run_one, jobs[i]) for i in order}
        for future in concurrent.futures.as_completed(futures.values()):
            progress(future.result())
        return [futures[i].result() for i in range(len(jobs))]


# -- printing ---------------------------------------------------------------------------------------------


def fmt_loops(value: float) -> str:
    return "never" if value == math.inf else f"{value:.2f}"


def conditions(image: Image, link_rate: float, seed: int, processes: int, constants: dict[str, float], decode: str = "real") -> list[str]:
    layout = image.manifest.layout
    loop = image.loop_bits / link_rate
    datagram = image.frame_size + 16 + IP_UDP_BYTES
    return [
        "vmcast scale model: real Carousel (sender) and, per receiver, real Assembly + RepairPlanner; simulated link, explicit time",
        (f"image: {image.frames:,} frames x {image.frame_size:,} bytes = {layout.length / 1e6:.1f} MB, {layout.block_count} checksum "
         f"blocks of {layout.frames_per_block} frames; {datagram:,} bytes per datagram on the wire (vmcast + IPv4 + UDP headers)"),
        (f"link: {link_rate / 1e6:.3g} Mbit/s, one loop = {loop:.2f} s = the physical limit (times below are multiples of it, "
         "each receiver from its own join)"),
        ("loss: per receiver and datagram (data, repair, metadata); 'indep' = Bernoulli, 'burst B' = Gilbert (bad state loses "
         "all, mean burst B datagrams); requests reach the sender in 1 ms and are lost at the mean rate"),
        f"seed {seed}; cores used: 1 per scenario ({processes} scenario{'s' if processes > 1 else ''} at a time)",
        ("repair: 'nack' = per-frame requests; 'fec' = per-block RaptorQ parity requests, real symbols, blocks decoded "
         f"{'for real' if decode == 'real' else 'NOT decoded, counted recovered (--fec-decode count)'}"),
        "protocol constants: " + ", ".join(f"{name}={value:g}" for name, value in constants.items()),
    ]


TABLE_HEADER = (f"{'scenario':<40} {'p50':>5} {'p99':>5} {'max':>5} {'incompl':>7} {'repair':>7} {'useless':>7} "
                f"{'req/rcv':>7} {'wire':>6} {'loops':>5} {'cpu s':>6}")


def table_row(result: Result, label: str | None = None) -> str:
    s = result.summary()
    return (f"{label or result.scenario.name:<40} {fmt_loops(s['p50']):>5} {fmt_loops(s['p99']):>5} {fmt_loops(s['max']):>5} "
            f"{s['incomplete']:>7} {s['repair_fraction']:>7.3f} {s['useless_repair_fraction']:>7.3f} "
            f"{s['requests_per_receiver']:>7.1f} {s['wire_per_image']:>6.2f} {s['carousel_loops']:>5.2f} {s['cpu_seconds']:>6.1f}")


TABLE_LEGEND = [
    "p50/p99/max: completion from join, in loops; incompl: receivers not COMPLETE when the run stopped (40 loops);",
    "repair: repair datagrams sent (requested frames and parity frames) / image frames; useless: repair datagrams no",
    "  receiver that got them kept, / image frames;",
    "req/rcv: repair requests sent per receiver; wire: all datagrams sent (carousel, repair, metadata) / image frames;",
    "loops: carousel frames sent / image frames (the carousel runs at half rate while repairs are pending);",
    "cpu s: CPU seconds the scenario took (one core; with fec, ~4 ms per block decoded per receiver).",
]


def fec_rows(receivers: tuple[int, ...], losses: tuple[str, ...], *, k: int, blocks: int, seed: int) -> list[fec_model.FecResult]:
    rows = []
    for loss in losses:
        model = LossModel.parse(loss)
        if model.rate == 0:
            continue
        for n in receivers:
            for interleave in (False, True):
                rows.append(fec_model.count(receivers=n, loss=model, k=k, blocks=blocks, interleave=interleave, seed=seed))
    return rows


def print_fec(rows: list[fec_model.FecResult], out) -> None:
    print("\nNACK vs FEC, counting model (benchmarks/simulation/fec.py): resent frames / image frames, one pass per receiver", file=out)
    if rows:
        print(f"FEC blocks of {rows[0].k} frames, {rows[0].blocks} blocks averaged; 'interleaved': block b = every "
              f"{rows[0].blocks}th frame, parity sent in rounds across blocks", file=out)
    print(f"{'receivers':>9} {'loss':<14} {'blocks':<11} {'NACK union':>10} {'NACK+reloss':>11} {'FEC max':>8} {'FEC+reloss':>10} "
          f"{'worst m':>7}", file=out)
    for r in rows:
        print(f"{r.receivers:>9} {r.loss.label:<14} {'interleaved' if r.interleave else 'contiguous':<11} {r.nack_union:>10.3f} "
              f"{r.nack:>11.3f} {r.fec_max:>8.3f} {r.fec:>10.3f} {r.max_lost_in_a_block:>7}", file=out)
    print("NACK union = frames some receiver lost (1 - (1 - p)^N for independent loss); FEC max = per block, the most frames one "
          "receiver lost; +reloss: until every receiver has what it needs; worst m = most frames one receiver lost in one block", file=out)


# -- main ---------------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict[str, float]:
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in TUNABLES or not value:
            raise SystemExit(f"--set wants NAME=VALUE with NAME one of {', '.join(TUNABLES)}; got {item!r}")
        overrides[name] = float(value)
    return overrides


def parse_variant(items: list[str]) -> dict[str, object]:
    variant: dict[str, object] = {}
    for item in items:
        name, _, value = item.partition("=")
        variant[name] = value if name == "queue" else (int(value) if name == "share" else float(value or "nan"))
    try:
        return check_variant(variant)
    except ValueError as error:
        raise SystemExit(f"--variant: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer scenarios, at most 1,000 receivers (CI smoke)")
    parser.add_argument("--receivers", type=int, nargs="+", help="receiver counts (default " + " ".join(map(str, DEFAULT_RECEIVERS)) + ")")
    parser.add_argument("--loss", nargs="+", help="loss models: none, 1%%, 0.05, ge:1%%:20 (default " + " ".join(DEFAULT_LOSSES).replace("%", "%%") + ")")
    parser.add_argument("--late", action="store_true", help="also late joiners (joining uniformly over the first loop, first loss model)")
    parser.add_argument("--no-repair", type=int, nargs="*", default=None, help="also these receiver counts with repair off")
    parser.add_argument("--repair", nargs="+", choices=REPAIR_MODES, default=list(REPAIR_MODES),
                        help="repair modes to run: nack (per-frame requests), fec (per-block parity); default both")
    parser.add_argument("--fec-decode", choices=("real", "count"), default="real",
                        help="fec: decode every recovered block for real (default), or count it recovered (faster)")
    parser.add_argument("--frames", type=int, default=2000, help="image frames (default 2000)")
    parser.add_argument("--frame-size", type=int, default=1400, help="data frame payload bytes (default 1400)")
    parser.add_argument("--loop-seconds", type=float, default=10.0, help="scale the link so one loop lasts this long (default 10)")
    parser.add_argument("--link-rate", type=float, help="link rate in bit/s (overrides --loop-seconds)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=f"override a protocol constant: {', '.join(TUNABLES)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                        help="a design experiment, not the protocol: " + "; ".join(f"{k}={v}" for k, v in VARIANTS.items()))
    parser.add_argument("--tune", action="store_true", help="run the tuning grid for each receiver count and loss model given")
    parser.add_argument("--fec-only", action="store_true", help="only the NACK vs FEC counting model")
    parser.add_argument("--no-fec", action="store_true", help="skip the NACK vs FEC counting model")
    parser.add_argument("--fec-block", type=int, default=749, help="FEC block, in frames (default 749: the 1 MiB checksum block)")
    parser.add_argument("--fec-blocks", type=int, default=16, help="FEC blocks to average over (default 16)")
    parser.add_argument("--jobs", type=int, default=1, help="scenarios run in parallel processes (default 1)")
    parser.add_argument("--feed-duplicates", action="store_true", help="feed held frames to the assemblies too (slower; same results)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write one JSON object per line (scenario results, FEC rows)")
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.set)
    variant = parse_variant(args.variant)
    receivers = tuple(args.receivers or (QUICK_RECEIVERS if args.quick else DEFAULT_RECEIVERS))
    losses = tuple(args.loss or (QUICK_LOSSES if args.quick else DEFAULT_LOSSES))
    started = time.perf_counter()
    out = sys.stdout
    records: list[dict] = []

    if not args.fec_only:
        image = _image(args.frames, args.frame_size)
        link_rate = args.link_rate or image.loop_bits / args.loop_seconds
        with overridden(overrides) as constants:
            pass
        for line in conditions(image, link_rate, args.seed, args.jobs, constants, args.fec_decode):
            print(line, file=out)
        if variant:
            print("DESIGN EXPERIMENT, not the protocol: " + ", ".join(f"{k}={v}" for k, v in variant.items()), file=out)
        if args.tune:
            grid = [dict(point, **overrides) for point in TUNING_GRID]
            scenarios = [Scenario(n, LossModel.parse(loss), fec=mode == "fec") for n in receivers for loss in losses for mode in args.repair]
            jobs = [(scenario, args.frames, args.frame_size, link_rate, args.seed, point, args.feed_duplicates, variant, args.fec_decode)
                    for scenario in scenarios for point in grid]
        else:
            explicit = args.receivers is not None or args.loss is not None
            no_repair = tuple(args.no_repair) if args.no_repair is not None else (() if (explicit or args.quick) else (100, 1000))
            # 10,000 receivers at 5% loss costs as much CPU as two other scenarios: ask for it explicitly.
            skip = () if explicit else ((10_000, "5%"),)
            scenarios = default_scenarios(receivers, losses, late=args.late or not explicit, baseline=not explicit,
                                          no_repair=no_repair, skip=skip, modes=tuple(args.repair))
            jobs = [(scenario, args.frames, args.frame_size, link_rate, args.seed, overrides, args.feed_duplicates, variant, args.fec_decode)
                    for scenario in scenarios]

        def progress(result: Result) -> None:
            print(f"  done: {result.scenario.name} in {result.cpu_seconds:.1f} CPU s", file=sys.stderr, flush=True)

        results = run_all(jobs, processes=args.jobs, progress=progress)
        print(file=out)
        if args.tune:
            for scenario in scenarios:
                print(f"tuning, {scenario.name}:", file=out)
                print(f"{'overrides':<40} {TABLE_HEADER[41:]}", file=out)
                for job, result in zip(jobs, results):
                    if result.scenario == scenario:
                        label = ", ".join(f"{k}={v:g}" for k, v in job[5].items()) or "(protocol as is)"
                        print(table_row(result, label), file=out)
                print(file=out)
        else:
            print(TABLE_HEADER, file=out)
            for result in results:
                print(table_row(result), file=out)
        for line in TABLE_LEGEND:
            print(line, file=out)
        records.extend(dict(r.summary(), model="protocol") for r in results)

    if not args.no_fec and not args.tune:
        if fec_model.available():
            rows = fec_rows(tuple(n for n in receivers if n > 1) or receivers, losses, k=args.fec_block, blocks=args.fec_blocks, seed=args.seed)
            print_fec(rows, out)
            records.extend(row.summary() for row in rows)
        else:
            print("\nNACK vs FEC counting model: skipped (needs numpy)", file=out)

    print(f"\nwall time: {time.perf_counter() - started:.0f} s", file=out)
    if args.json:
        with args.json.open("w") as stream:
            for record in records:
                stream.write(json.dumps(_finite(record)) + "\n")
    return 0


def _finite(value: object) -> object:
    """JSON has no infinity: a receiver that never completed is null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    sys.exit(main())
