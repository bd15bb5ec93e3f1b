"""Summarise `bench/train_speed.py` results over several runs: per configuration, sdlora's and the reference's ms/step
and their ratio (median and range over the runs), peak memory, and how close one step of each comes (loss and LoRA
gradients from the same state).

    python bench/summary.py bench/results/speed-h200.json              # the table in docs/benchmarks.md
    python bench/summary.py --out speed.json DIR1/results.json DIR2/results.json ...   # merge runs into one file

A file is either one `bench/train_speed.py` results.json or a merged one (its runs under "runs").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def runs_of(path: Path) -> list[dict]:
    r = json.loads(path.read_text())
    return r["runs"] if "runs" in r else [r]


def merge(paths: list[Path]) -> dict:
    runs = [run for p in paths for run in runs_of(p)]
    first = runs[0] if runs else {}
    return {"about": "bench/train_speed.py runs merged by bench/summary.py", "device": first.get("device"),
            "versions": first.get("versions"), "runs": runs}


def spread(values: list[float], fmt: str) -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return fmt % med if lo == hi else f"{fmt % med} ({fmt % lo}-{fmt % hi})"


def table(runs: list[dict]) -> str:
    by_config: dict[str, list[dict]] = {}
    for run in runs:
        for c in run.get("configs", []):
            if "error" not in c:
                by_config.setdefault(c["config"], []).append(c)
    rows = ["| configuration | runs | sdlora ms/step | reference ms/step | sdlora / reference | peak GiB sdlora / "
            "reference | loss rel. diff | LoRA grad rel. L2 |", "|---|---|---|---|---|---|---|---|"]
    for name, cs in by_config.items():
        sd = [c["sdlora"]["ms_per_step"] for c in cs]
        ref = [c["reference"]["ms_per_step"] for c in cs]
        ratio = [r / s for r, s in zip(ref, sd)]
        peak = f"{max(c['sdlora']['peak_gb'] for c in cs):.2f} / {max(c['reference']['peak_gb'] for c in cs):.2f}"
        same = [c["same_function"] for c in cs if "same_function" in c]
        loss = f"{max(s['loss_rel_diff'] for s in same):.1e}" if same else ""
        grad = spread([100 * s["grad_rel_l2"] for s in same], "%.2f%%") if same else ""
        rows.append(f"| {name} | {len(cs)} | {spread(sd, '%.1f')} | {spread(ref, '%.1f')} | "
                    f"{spread(ratio, '%.2fx')} | {peak} | {loss} | {grad} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the runs of all FILES, merged, to this file")
    ap.add_argument("files", nargs="+", type=Path, help="results of bench/train_speed.py (one run or merged runs)")
    args = ap.parse_args()
    merged = merge(args.files)
    if args.out:
        Path(args.out).write_text(json.dumps(merged, indent=1, default=str) + "\n")
    print(table(merged["runs"]))


if __name__ == "__main__":
    main()
