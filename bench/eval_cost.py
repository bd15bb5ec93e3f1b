"""What measuring each save costs: the README quickstart with and without `--no-evaluate`, alternately, wall time
from the command's start to its exit, and the seconds the run's `eval` events report.

    python bench/eval_cost.py --repeats 3 --out bench/results/eval-cost-cpu.json
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(evaluate: bool, out: Path) -> dict:
    args = [sys.executable, "-m", "sdlora", "train", "example:character", "--base", "tiny", "--trigger", "zqchar",
            "--out", str(out), "--quiet"] + ([] if evaluate else ["--no-evaluate"])
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    wall = time.perf_counter() - t
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return {"wall_s": round(wall, 2), "eval_s": [round(e["seconds"], 3) for e in events if e["type"] == "eval"],
            "recommend": next((e["reason"] for e in events if e["type"] == "recommend"), None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in ("off", "on"):
                runs[mode].append(run(mode == "on", Path(tmp) / f"{mode}{i}"))
                print(mode, runs[mode][-1], flush=True)
    on, off = (statistics.median(r["wall_s"] for r in runs[m]) for m in ("on", "off"))
    result = {"question": "what measuring each save adds to the README quickstart", "cpu": platform.processor() or
              platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "date": time.strftime("%Y-%m-%d"), "runs": runs, "median_wall_on_s": on, "median_wall_off_s": off,
              "added_fraction": round(on / off - 1, 4)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
