"""Memory benchmark: Side4Video against full fine-tuning, adapters, EVL and a linear probe on one backbone.

    python -m launch.bench_memory --methods all --backbones vit-b16 --frames 8 --batch 4 --dtype float32

Sweeps method x backbone x frames x batch x dtype; each configuration runs a warm-up step, one memory-tracked
step and ``--steps`` timed training steps in a fresh process (``trainer.benchmark.measure``). Writes
``results.json`` (one record per configuration), ``results.md`` (tables, ratios against Side4Video) and
``memory.png`` (memory per method by category, and memory against batch size) under ``--out``.

Method options (``side4video:checkpoint=0,handover=float32``) switch Side4Video's lean defaults; ``--lean``
adds each Side4Video method once more per switch flipped (``--methods side4video:handover=bfloat16 --lean``
measures every other switch beside the bf16 handover). A backbone may be depth-reduced: ``vit-e14:8``.
``--report a/results.json b/results.json --out merged`` renders the tables and plot of earlier sweeps.
A configuration that fails (out of memory, an error) becomes a record with ``error``; the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from itertools import product
from pathlib import Path

import torch

from models.baselines import METHODS
from trainer import benchmark
from trainer.benchmark import BenchConfig, measure

# Side4Video's lean switches, each flipped from its default one at a time (--lean): no side-block
# checkpointing; plain autograd in the side MLP; norm outputs kept; a bf16 frozen backbone and features beside
# a float32 side network; eager side attention; every second block tapped; the frozen blocks run 16 images at
# a time.
LEAN_SWITCHES = (
    "checkpoint=0",
    "mlp_chunk=0",
    "recompute_norms=0",
    "handover=bfloat16",
    "attention=eager",
    "tap_every=2",
    "frozen_chunk=16",
)
GIB = 2**30
# Memory categories of the tables and the plot; "other" holds the input clips and float32 master weights.
CATEGORIES = tuple(c for c in benchmark.CATEGORIES.values() if c != "buffers")
DESCRIBED = ("method", "backbone", "frames", "batch", "dtype", "device")
RESULT_PREFIX = "RESULT "


def _csv(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def _methods(text: str) -> list[str]:
    """Comma list of methods, each with optional options: a ``key=value`` item continues the previous
    method's options (``side4video:handover=bfloat16,checkpoint=0,frozen``)."""
    methods: list[str] = []
    for item in filter(None, text.split(",")):
        if methods and ":" not in item and "=" in item:
            methods[-1] += f",{item}"
        else:
            methods.append(item)
    return methods


def with_lean_switches(methods: list[str]) -> list[str]:
    """The methods, then each Side4Video method once more per lean switch it does not already set."""
    out = list(methods)
    for method in methods:
        name, _, spec = method.partition(":")
        if name != "side4video":
            continue
        set_already = {item.partition("=")[0] for item in spec.split(",") if item}
        for switch in LEAN_SWITCHES:
            if switch.partition("=")[0] not in set_already:
                flipped = f"{method},{switch}" if spec else f"{method}:{switch}"
                if flipped not in out:
                    out.append(flipped)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument(
        "--methods", type=_methods, default=["all"], help=f"comma list of {METHODS} (with options), or all"
    )
    parser.add_argument(
        "--lean", action="store_true", help="add each Side4Video method once more per lean switch flipped"
    )
    parser.add_argument("--backbones", type=_csv(str), default=["vit-b16"])
    parser.add_argument("--frames", type=_csv(int), default=[8])
    parser.add_argument("--batch", type=_csv(int), default=[4])
    parser.add_argument("--dtype", type=_csv(str), default=["float32"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--num-classes", type=int, default=174)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_memory"))
    parser.add_argument(
        "--report", type=Path, nargs="+", help="only render tables and plot from results.json files"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    return parser.parse_args(argv)


def configurations(args: argparse.Namespace) -> list[BenchConfig]:
    methods = list(METHODS) if args.methods == ["all"] else list(args.methods)
    if args.lean:
        methods = with_lean_switches(methods)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    grid = product(args.backbones, args.frames, args.dtype, args.batch, methods)
    return [
        BenchConfig(m, backbone, frames, batch, dtype, device, args.steps, args.num_classes)
        for backbone, frames, dtype, batch, m in grid
    ]


def run_isolated(cfg: BenchConfig, timeout: float) -> dict:
    """Measure one configuration in a fresh Python process; a failure becomes a record with ``error``."""
    # A fixed mmap threshold makes glibc return each large freed block to the system at once, so the
    # process's peak RSS follows the tensors alive instead of the allocator's caching.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-m", "launch.bench_memory", "--one", json.dumps(asdict(cfg))]
    try:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**asdict(cfg), "error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    reason = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit code {done.returncode}"
    return {**asdict(cfg), "error": reason}


def _group(record: dict) -> tuple:
    return record["backbone"], record["frames"], record["batch"], record["dtype"], record["device"]


def _series(record: dict) -> tuple:
    """The group without the batch size: the rows of one memory-against-batch plot."""
    backbone, frames, _, dtype, device = _group(record)
    return backbone, frames, dtype, device


def ratios(records: list[dict]) -> list[dict]:
    """Per (backbone, frames, batch, dtype, device) group, for each Side4Video variant: its peak over every
    other method's peak, and its step time over the frozen backbone's inference-only time."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(_group(r), {})[r["method"]] = r
    out = []
    for key, by_method in groups.items():
        for side_name, side in by_method.items():
            if not side_name.startswith("side4video"):
                continue
            row = {"group": key, "side": side_name}
            for method, r in by_method.items():
                if not method.startswith("side4video"):
                    row[f"peak / {method}"] = side["peak_bytes"] / r["peak_bytes"]
            for method, r in by_method.items():
                if method.startswith("frozen"):
                    row[f"step / {method}"] = side["step_seconds"] / r["step_seconds"]
            out.append(row)
    return out


def markdown(records: list[dict]) -> str:
    head = (
        "| method | backbone | frames | batch | dtype | device | peak GiB | params | grads | optimizer | "
        "activations | temporaries | other | RSS delta GiB | step s | trainable | GFLOPs/clip |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in records:
        cells = [r[key] for key in DESCRIBED]
        if "error" in r:
            lines.append("| " + " | ".join(map(str, [*cells, r["error"]])) + " |" + " |" * 10)
            continue
        gib = [r["peak_by_category"].get(k, 0) / GIB for k in CATEGORIES]
        cells += [
            f"{r['peak_bytes'] / GIB:.3f}",
            *(f"{g:.3f}" for g in gib),
            f"{r['rss_delta_bytes'] / GIB:.3f}",
        ]
        cells += [f"{r['step_seconds']:.2f}", f"{r['trainable_params'] / 1e6:.2f}M"]
        cells += [f"{r['forward_gflops'] / r['batch']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    text = head + "\n".join(lines) + "\n"
    for row in ratios(records):
        backbone, frames, batch, dtype, device = row.pop("group")
        text += f"\n{row.pop('side')} at {backbone}, {frames} frames, batch {batch}, {dtype}, {device}: "
        text += ", ".join(f"{k} = {v:.3f}" for k, v in row.items()) + "\n"
    return text


def plot(records: list[dict], path: Path) -> None:
    """Left: peak memory per method, stacked by category (largest batch of the first group); right: peak
    memory against batch size per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    if not ok:
        return
    first = ok[0]
    series = [r for r in ok if _series(r) == _series(first)]
    batch = max(r["batch"] for r in series)
    bars = [r for r in series if r["batch"] == batch]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bottom = [0.0] * len(bars)
    for category in CATEGORIES:
        heights = [r["peak_by_category"].get(category, 0) / GIB for r in bars]
        left.bar([r["method"] for r in bars], heights, bottom=bottom, label=category)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    left.set_ylabel("peak memory (GiB)")
    backbone, frames, dtype, device = _series(first)
    left.set_title(f"{backbone}, {frames} frames, batch {batch}, {dtype}, {device}")
    left.tick_params(axis="x", rotation=45)
    left.legend()
    for method in dict.fromkeys(r["method"] for r in series):
        points = sorted((r["batch"], r["peak_bytes"] / GIB) for r in series if r["method"] == method)
        right.plot(*zip(*points, strict=True), marker="o", label=method)
    right.set_xlabel("batch size (clips)")
    right.set_ylabel("peak memory (GiB)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(records: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(records)
    (out / "results.md").write_text(text)
    plot(records, out / "memory.png")
    print(text)
    print(f"wrote {out}/results.md and memory.png", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        record = measure(BenchConfig(**json.loads(args.one)))
        print(RESULT_PREFIX + json.dumps(asdict(record)), flush=True)
        return 0
    if args.report:
        records = [r for path in args.report for r in json.loads(path.read_text())]
        write_reports(records, args.out)
        return 0
    try:
        configs = configurations(args)
    except ValueError as error:
        print(f"bench_memory: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    records, start = [], time.perf_counter()
    for i, cfg in enumerate(configs, 1):
        label = f"{cfg.method} {cfg.backbone} T={cfg.frames} B={cfg.batch} {cfg.dtype} {cfg.device}"
        elapsed = time.perf_counter() - start
        print(f"[{i}/{len(configs)}] {label} (elapsed {elapsed:.0f} s)", file=sys.stderr, flush=True)
        record = run_isolated(cfg, args.timeout)
        records.append(record)
        summary = record.get("error") or (
            f"peak {record['peak_bytes'] / GIB:.3f} GiB, "
            f"RSS delta {record['rss_delta_bytes'] / GIB:.3f} GiB, {record['step_seconds']:.2f} s/step, "
            f"{record['trainable_params'] / 1e6:.2f}M trainable"
        )
        print(f"[{i}/{len(configs)}] {label}: {summary}", file=sys.stderr, flush=True)
        # Written after every configuration: an interrupted sweep keeps what it measured.
        (args.out / "results.json").write_text(json.dumps(records, indent=1))
    write_reports(records, args.out)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
