"""PNG charts of the harness's results: completion time vs receiver count and vs loss, one line per tool.

    python -m benchmarks.plot RESULTS.jsonl [--out DIR]

Reads the JSON lines :mod:`benchmarks.harness` writes (or takes its records directly, :func:`plot_results`).
For every image kind and loss it draws time-until-all-verified against N, and for every image kind and N
against loss, with the multicast physical limit (image bits / link rate) and, against N, the unicast limit
(N x that) as dashed lines. Runs where some receiver never verified are drawn as an ``x`` above the
other points. matplotlib is optional (``pip install matplotlib``) and imported only here, when drawing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["INSTALL_HINT", "PlottingUnavailable", "load_records", "plot_results"]

INSTALL_HINT = "pip install matplotlib  (planned: pip install -e '.[bench]')"
TOOL_ORDER = ("vmcast", "vmcast-wait", "udpcast", "uftp", "http")
TOOL_STYLE = {"vmcast": "o-", "vmcast-wait": "o--", "udpcast": "s-", "uftp": "^-", "http": "D-"}


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlottingUnavailable(f"matplotlib is not installed; {INSTALL_HINT}") from None
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    return pyplot


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tools(records: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["tool"] for r in records}
    return [t for t in TOOL_ORDER if t in present] + sorted(present - set(TOOL_ORDER))


def _series(records: Sequence[dict[str, Any]], tool: str, x_key: str) -> tuple[list[float], list[float], list[float]]:
    """x and mean seconds of the verified runs (sorted by x), and the x of runs where some receiver never verified."""
    verified: dict[float, list[float]] = {}
    failed: set[float] = set()
    for record in records:
        if record["tool"] != tool:
            continue
        x = float(record[x_key])
        if record["seconds_until_all_verified"] is None:
            failed.add(x)
        else:
            verified.setdefault(x, []).append(float(record["seconds_until_all_verified"]))
    xs = sorted(verified)
    return xs, [sum(verified[x]) / len(verified[x]) for x in xs], sorted(failed)


def _chart(pyplot: Any, records: Sequence[dict[str, Any]], x_key: str, x_label: str, title: str, path: Path) -> Path:
    figure, axes = pyplot.subplots(figsize=(7, 4.5), dpi=110)
    # Failed runs have no time: they are drawn as an x just above everything else, not at their timeout, so
    # they do not squash the scale.
    finished = [r["seconds_until_all_verified"] for r in records if r["seconds_until_all_verified"] is not None]
    finished += [r["unicast_limit_seconds" if x_key == "receivers" else "multicast_limit_seconds"] or 0 for r in records]
    failure_height = 1.1 * max(finished, default=1.0)
    for tool in _tools(records):
        xs, ys, failed_xs = _series(records, tool, x_key)
        line = None
        if xs:
            (line,) = axes.plot(xs, ys, TOOL_STYLE.get(tool, "o-"), label=tool)
        if failed_xs:
            axes.plot(failed_xs, [failure_height] * len(failed_xs), "x", markersize=10,
                      color=line.get_color() if line else None, label=f"{tool}: not all receivers verified")  # fmt: skip
    limits = {float(r[x_key]): r for r in records if r.get("multicast_limit_seconds")}
    if limits:
        xs = sorted(limits)
        # A "_" marker too, so that a limit still shows where there is a single x.
        axes.plot(xs, [limits[x]["multicast_limit_seconds"] for x in xs], "k--", linewidth=1, marker="_",
                  markersize=30, label="multicast limit (image bits / link rate)")  # fmt: skip
        if x_key == "receivers":
            axes.plot(xs, [limits[x]["unicast_limit_seconds"] for x in xs], ":", color="grey", linewidth=1,
                      marker="_", markersize=30, label="unicast limit (N x that)")  # fmt: skip
    axes.set_xlabel(x_label)
    axes.set_ylabel("seconds until every receiver verified")
    axes.set_ylim(bottom=0)
    if x_key == "receivers":
        axes.set_xticks(sorted({int(r["receivers"]) for r in records}))
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def _describe(record: dict[str, Any]) -> str:
    size_mib = record["image"]["size_bytes"] / 2**20
    rate = f"{record['rate_mbit']:g} Mbit/s" if record.get("rate_mbit") else "unlimited"
    commit = record["commit"] + ("+changes" if record.get("dirty") else "")
    return f"{size_mib:g} MiB {record['image']['kind']} image, {rate}, MTU {record['mtu']}, vmcast {commit}"


def plot_results(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Draw the charts into ``out``; returns the PNG paths. Raises :class:`PlottingUnavailable` without matplotlib."""
    pyplot = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    kinds = sorted({r["image"]["kind"] for r in records})
    for kind in kinds:
        of_kind = [r for r in records if r["image"]["kind"] == kind]
        for loss in sorted({r["loss_percent"] for r in of_kind}):
            group = [r for r in of_kind if r["loss_percent"] == loss]
            title = f"completion time vs receivers, {loss:g}% loss\n{_describe(group[0])}"
            paths.append(_chart(pyplot, group, "receivers", "receivers (N)", title, out / f"time-vs-n-{kind}-loss{loss:g}.png"))
        for receivers in sorted({r["receivers"] for r in of_kind}):
            group = [r for r in of_kind if r["receivers"] == receivers]
            title = f"completion time vs UDP loss, N={receivers}\n{_describe(group[0])}"
            paths.append(_chart(pyplot, group, "loss_percent", "UDP loss at each receiver (%)", title,
                                out / f"time-vs-loss-{kind}-n{receivers}.png"))  # fmt: skip
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results.jsonl written by benchmarks.harness")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: beside the results)")
    args = parser.parse_args(argv)
    try:
        paths = plot_results(load_records(args.results), args.out or args.results.parent)
    except PlottingUnavailable as missing:
        print(missing, file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
