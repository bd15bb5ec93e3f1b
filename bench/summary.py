"""Merge the result files of several `bench/train_speed.py` runs into one: the current numbers, in bench/results.json.

The six step configurations, the whole runs and the memory caps are measured in different device calls (a call has
at most 10 minutes); this puts the rows that describe the code as it is into one file, each row naming the file it
came from, and prints the step table as docs/benchmarks.md shows it:

    python bench/summary.py --out bench/results.json bench/results/speed-...-gpu0.json bench/results/...

It also takes `bench/spare.py`'s files (whole runs started as the app starts them).

A configuration measured in several files keeps the row of the file given first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_speed import table


def merge(paths: list[Path]) -> dict:
    out = {"about": "sdlora's training step against the diffusers-example step, whole runs and memory caps: the rows "
                    "that describe the current code, from the files in `sources` (bench/summary.py)",
           "sources": [], "configs": [], "whole_run": [], "memory": [], "whole_run_from_the_app": []}
    seen = set()
    for path in paths:
        r = json.loads(path.read_text())
        if isinstance(r, list):  # bench/spare.py: runs handed to a spare process, as the app starts them
            out["sources"].append({"file": str(path)})
            out["whole_run_from_the_app"] += [{**w, "source": str(path)} for w in r if "run" in w]
            continue
        out["sources"].append({"file": str(path), "device": r.get("device"), "versions": r.get("versions"),
                               "command": r.get("command"), "bf16_matmul_tflops": r.get("bf16_matmul_tflops")})
        for c in r.get("configs", []):
            if "error" not in c and c["config"] not in seen:
                seen.add(c["config"])
                out["configs"].append({**c, "source": str(path)})
        for key in ("whole_run", "memory"):
            out[key] += [{**w, "source": str(path)} for w in r.get(key, [])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("files", nargs="+", type=Path, help="results.json files of bench/train_speed.py")
    args = ap.parse_args()
    merged = merge(args.files)
    Path(args.out).write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(table(merged))


if __name__ == "__main__":
    main()
