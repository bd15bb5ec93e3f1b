"""The whole run as the app starts it: handed to a spare process that has already imported what training needs
(sdlora.spare.Spare), timed from the hand-over to the file, against the same run in a fresh process.

The same job as `bench/train_speed.py --whole-run 1000 --whole-batch 8 --whole-square` (SD1.5 architecture as an
fp16 diffusers folder, 30 square images at 512, UNet + text-encoder LoRA, batch 8, sdlora's defaults otherwise):

    python bench/spare.py --out DIR [--steps 1000] [--fresh-too] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import whole_run_inputs  # noqa: E402


def one(out: Path, name: str, steps: int, tiny: bool, spare) -> dict:
    from sdlora.atomic import write_atomic
    from sdlora.config import TrainConfig
    from sdlora.launch import start
    from sdlora.rundir import read_events

    base, data = whole_run_inputs(out, "sd1", tiny, square=True)
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    config = TrainConfig(dataset=str(data), base=str(base), steps=steps, trigger="zxq", batch_size=8,
                         **({"resolution": 64} if tiny else {}))
    write_atomic(run / "config.json", config.to_json())
    t = time.perf_counter()
    proc = start(run, spare=spare)
    while not (run / "lora.safetensors").exists() and proc.poll() is None:
        time.sleep(0.05)
    to_file = time.perf_counter() - t
    code = proc.wait()
    events = read_events(run)
    started = next((e for e in events if e["type"] == "start"), {})
    return {"run": name, "returncode": code, "to_file_s": to_file, "to_exit_s": time.perf_counter() - t,
            "setup_s": started.get("setup_s"), "log_tail": (run / "log.txt").read_text()[-600:] if code else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--fresh-too", action="store_true", help="also the same run in a fresh process")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tests' small model")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from sdlora.spare import Spare

    whole_run_inputs(out, "sd1", args.tiny, square=True)
    results = []
    t = time.perf_counter()
    spare = Spare()
    ready = spare.ready(timeout=300)
    results.append({"spare_ready": ready, "spare_import_s": time.perf_counter() - t})
    results.append(one(out, "run-spare", args.steps, args.tiny, spare))
    if args.fresh_too:
        results.append(one(out, "run-fresh", args.steps, args.tiny, None))
    for r in results:
        print(json.dumps(r), flush=True)
    (out / "spare.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
