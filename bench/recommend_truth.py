"""Is the recommended save and strength the right one? Checked against the tiny world's ground truth.

    python bench/recommend_truth.py [--prompts 12] [--runs /tmp/recommend-truth] [--out FILE] [--only style-default ...]

Four runs of `sdlora train` on the embedded tiny base, each example dataset at the quickstart's settings ("default")
and overtrained ("overtrained": 5x the steps at 3x both learning rates). Each run measures its saves and recommends
one save and strength (sdlora/evaluate.py); this script then draws, for every save and every strength the run
measured, held-out prompts with the trigger and the same prompts without it (25 steps, guidance 5, seed = prompt
index), and scores them with the checker (sdlora/tiny/checker.py), which knows what the pictures should show:

- `look`: the dataset's look in the images with the trigger: the style's hatch lines (`hatching_score`; the style
  score would also count any texture the base draws for an unknown word as ink) and the character's `character_score`
  (0 for the plain world);
- `present`: the share of those images that show the dataset's detail at all (`detail_present`: hatch lines, eyes);
- `change`: how much the look appears without the trigger (mean look score without it, minus the base's);
- `truth` = look - max(change, 0): what the LoRA should do, less what it should not;
- `pixel_change`: how much the images without the trigger differ from the base's, pixel by pixel (mean absolute
  difference, 0-255): a change the look scores may not see (a style LoRA can alter colours or shapes without drawing
  hatch lines).

Per run it reports the recommended (save, strength)'s truth against the best in the grid (wanted: within 10%),
whether the last save was avoided where truth prefers an earlier one, and the Spearman rank correlation between
the run's bleed and the checker's change over the saves (at strength 1; wanted: 0.8 or more), the change as it is
and relative to the look gained with the trigger (the run's bleed is relative to the change with the trigger), and
the pixel change. `--reuse` scores the runs already in --runs again instead of training them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from lora_effect import DATASETS, GUIDANCE, STEPS, detail, machine, prompts_for, score  # noqa: E402

from sdlora.tiny import checker  # noqa: E402

DEFAULT_STEPS, DEFAULT_UNET_LR, DEFAULT_TE_LR = 600, 5e-4, 1e-4  # sdlora train's defaults (sdlora/config.py)
RUNS = {f"{name}-{kind}": (name, kind) for name in DATASETS for kind in ("default", "overtrained")}


def train(run: Path, name: str, kind: str, steps_scale: float,
          reuse: bool = False) -> tuple[list[dict], dict, float | None]:
    """One `sdlora train` run; returns its eval events, its recommend event and its wall time (`reuse`: the run folder
    already there, scored again; its wall time is then None)."""
    if reuse:
        return (*_events(run), None)
    steps = max(8, int(DEFAULT_STEPS * steps_scale * (5 if kind == "overtrained" else 1)))
    lr = 3 if kind == "overtrained" else 1
    cmd = [sys.executable, "-m", "sdlora", "train", f"datasets/{name}", "--base", "tiny", "--trigger", DATASETS[name],
           "--out", str(run), "--steps", str(steps), "--unet-lr", f"{DEFAULT_UNET_LR * lr:g}",
           "--text-encoder-lr", f"{DEFAULT_TE_LR * lr:g}"]
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(str(run) + ".log", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=log)
    return (*_events(run), time.time() - t0)


def _events(run: Path) -> tuple[list[dict], dict]:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["type"] == "eval"], next(e for e in events if e["type"] == "recommend")


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = x.argsort()
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def look_score(name: str, image, prompt: str) -> float:
    """The look `truth` is made of: the style's detail (its hatch lines), the character's score (lora_effect's)."""
    return detail(name, image) if name == "style" else score(name, image, prompt)


def truth_grid(prev, name: str, evals: list[dict], prompts: list[str]) -> dict:
    """Checker scores for every (save, strength) the run measured: {save path: {strength: numbers}}."""
    trigger = DATASETS[name]
    plain = [p.replace(f"{trigger}, ", "") for p in prompts]
    seeds = list(range(len(prompts)))
    draw = lambda ps: prev.images(ps, seeds, steps=STEPS, guidance_scale=GUIDANCE)  # noqa: E731
    prev.set_loras([])
    base_plain_images = draw(plain)
    base_pixels = np.stack([np.asarray(im, dtype=np.float32) for im in base_plain_images])
    base_plain = float(np.mean([look_score(name, im, p) for im, p in zip(base_plain_images, plain)]))
    base_look = float(np.mean([look_score(name, im, p) for im, p in zip(draw(prompts), prompts)]))
    grid = {}
    for e in evals:
        grid[e["path"]] = {}
        for s in (row["strength"] for row in e["strengths"]):
            prev.set_loras([(e["path"], s)])
            with_images, plain_images = draw(prompts), draw(plain)
            look = float(np.mean([look_score(name, im, p) for im, p in zip(with_images, prompts)]))
            change = float(np.mean([look_score(name, im, p) for im, p in zip(plain_images, plain)])) - base_plain
            grid[e["path"]][f"{s:g}"] = {
                "look": round(look, 4), "change": round(change, 4), "truth": round(look - max(change, 0.0), 4),
                "present": round(float(np.mean([checker.detail_present(name, im) for im in with_images])), 4),
                "pixel_change": round(float(np.abs(np.stack([np.asarray(im, dtype=np.float32) for im in plain_images])
                                                   - base_pixels).mean()), 3)}
    return {"base_plain_look": round(base_plain, 4), "base_look": round(base_look, 4), "grid": grid}


def judge(evals: list[dict], recommend: dict, grid: dict, base_look: float) -> dict:
    """The recommendation against the grid's truth, and the run's bleed against the checker's change: as it is
    (`change`), and relative to the look gained with the trigger, as the run's bleed is relative to the change with
    it (`change_relative`)."""
    cells = [(path, s, v["truth"]) for path, row in grid.items() for s, v in row.items()]
    best_path, best_s, best = max(cells, key=lambda c: c[2])
    chosen = grid[recommend["path"]][f"{recommend['strength']:g}"]["truth"]
    saves = list(grid)  # in step order
    best_per_save = {p: max(v["truth"] for v in grid[p].values()) for p in saves}
    earlier_better = max(best_per_save[p] for p in saves[:-1]) > best_per_save[saves[-1]] if len(saves) > 1 else False
    at_one = [next(r for r in e["strengths"] if r["strength"] == 1.0) for e in evals]
    relative = lambda v: v["change"] / max(v["look"] - base_look, 1e-3)  # noqa: E731
    return {"recommended": {"path": recommend["path"], "strength": recommend["strength"], "truth": chosen,
                            "reason": recommend.get("reason")},
            "best": {"path": best_path, "strength": float(best_s), "truth": best},
            "within_10_percent": bool(best <= 0 or chosen >= 0.9 * best),
            "truth_prefers_an_earlier_save": bool(earlier_better),
            "avoided_the_last_save": recommend["path"] != saves[-1],
            "bleed_at_1": [round(r["bleed"], 4) for r in at_one],
            "checker_change_at_1": [grid[p]["1"]["change"] for p in saves],
            "spearman_bleed_vs_change": round(spearman([r["bleed"] for r in at_one],
                                                       [grid[p]["1"]["change"] for p in saves]), 3),
            "checker_change_relative_at_1": [round(relative(grid[p]["1"]), 4) for p in saves],
            "spearman_bleed_vs_change_relative": round(spearman([r["bleed"] for r in at_one],
                                                                [relative(grid[p]["1"]) for p in saves]), 3),
            "pixel_change_at_1": [grid[p]["1"]["pixel_change"] for p in saves],
            "spearman_bleed_vs_pixel_change": round(spearman([r["bleed"] for r in at_one],
                                                             [grid[p]["1"]["pixel_change"] for p in saves]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12, help="held-out prompts per (save, strength), each with and "
                                                            "without the trigger")
    ap.add_argument("--runs", default="/tmp/recommend-truth", help="where the training runs go (replaced)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recommend-truth-cpu.json"))
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these runs only (default: all four)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every run's steps (a quick smoke run)")
    ap.add_argument("--reuse", action="store_true", help="score the runs already in --runs again, without training")
    args = ap.parse_args()
    from sdlora.generate import Previewer

    results = {"machine": machine(), "command": " ".join(sys.argv), "generation": {
        "steps": STEPS, "guidance": GUIDANCE, "size": 64, "prompts": args.prompts}, "runs": {}}
    prev = Previewer("tiny", device="cpu")
    prev.pipe.set_progress_bar_config(disable=True)
    for label in args.only or list(RUNS):
        name, kind = RUNS[label]
        evals, recommend, train_s = train(Path(args.runs) / label, name, kind, args.steps_scale, args.reuse)
        t0 = time.time()
        grid = truth_grid(prev, name, evals, prompts_for(name, DATASETS[name], args.prompts))
        verdict = judge(evals, recommend, grid["grid"], grid["base_look"])
        results["runs"][label] = {"train_wall_s": train_s and round(train_s, 1),
                                  "truth_wall_s": round(time.time() - t0, 1),
                                  "steps": [e["step"] for e in evals], **verdict, **grid,
                                  "evals": [{k: e[k] for k in ("step", "path", "learned", "bleed", "strengths", "on")}
                                            for e in evals]}
        r, b = verdict["recommended"], verdict["best"]
        print(f"{label}: recommended {Path(r['path']).name} at {r['strength']:g} (truth {r['truth']:.3f}); best "
              f"{Path(b['path']).name} at {b['strength']:g} ({b['truth']:.3f}); within 10%: "
              f"{verdict['within_10_percent']}; Spearman bleed vs change {verdict['spearman_bleed_vs_change']}, vs "
              f"pixel change {verdict['spearman_bleed_vs_pixel_change']}",
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
