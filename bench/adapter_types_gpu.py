"""Every adapter type trained by `sdlora train` on a GPU with the CUDA-graph step: whether the step was captured (no
"CUDA graphs off" warning), the file verified, and the speed, on the tiny model.

    python bench/adapter_types_gpu.py --out DIR     # on a GPU; writes DIR/adapter-types.json, prints a table
    python bench/adapter_types_gpu.py --out DIR --steps 3 --only lokr    # a CPU smoke run (no graphs there)

Each run: the tests' drawn dataset (8 pictures), 60 steps at batch 4, rank 16 / alpha 8 (conv rank 8 / alpha 4),
attention targets, text encoder frozen, no samples. Speed is the progress events' images/s after the first 20 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ["HF_HUB_OFFLINE"] = "1"

CASES = {"lora": {}, "locon": {"adapter": "locon"}, "loha": {"adapter": "loha"}, "lokr": {"adapter": "lokr"},
         "lokr-full": {"adapter": "lokr", "lokr_full_matrix": True}, "dora": {"adapter": "dora"},
         "dora-conv": {"adapter": "dora", "dora_conv": True}}


def main() -> None:
    from conftest import draw_dataset, small_config
    from sdlora.rundir import read_events
    from sdlora.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="these types only")
    args = ap.parse_args()
    out = Path(args.out)
    data = draw_dataset(out / "data" / "shapes")
    rows = []
    for name, values in CASES.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        run = out / "runs" / name
        train(small_config(data, steps=args.steps, batch_size=4, rank=16, alpha=8.0, sample_every=0, save_every=0,
                           train_text_encoder=False, **values), run, progress_bar=False)
        events = read_events(run)
        progress = [e for e in events if e["type"] == "progress" and e["step"] > 20]
        verify = next(e for e in events if e["type"] == "verify")
        warnings = [e["message"] for e in events if e["type"] == "warning"]
        rows.append({"type": name, "graphs_captured": not any("CUDA graphs off" in w for w in warnings),
                     "verify_ok": verify["ok"], "file_check_max_diff": verify["file_check"]["max_diff"],
                     "images_per_s": round(sum(e["images_per_s"] for e in progress) / max(len(progress), 1), 1),
                     "last_loss": progress[-1]["loss"] if progress else None, "warnings": warnings,
                     "run_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    (out / "adapter-types.json").write_text(json.dumps(rows, indent=2))
    print("| type | graphs captured | verify | images/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['graphs_captured']} | {r['verify_ok']} | {r['images_per_s']} |")


if __name__ == "__main__":
    main()
