"""The command line: `sdlora train | eval | check | tags | caption | generate | runs | app | merge | resize | info`;
user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import logging
import sys
from pathlib import Path

# Library chatter (load bars, safety-checker notices) hides what the user must read; set before they import.
for _name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_name, "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from sdlora import examples
from sdlora.caption import CHARACTER_THRESHOLD, GENERAL_THRESHOLD, MODES
from sdlora.config import (PRESET_HELP, PRESETS, SAMPLE_GUIDANCE, SAMPLE_SCHEDULER, SAMPLE_STEPS, TrainConfig,
                           build_config)
from sdlora.errors import UserError

# Flags whose names differ from the field (the brief's exact forms) or that take a list.
_RENAMED = {"sample_prompts": "--sample-prompt"}
_SKIPPED = {"dataset", "preset"}  # the dataset is positional; --preset is the option above the settings


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from its type, default and help; unset flags stay out of the result."""
    group = parser.add_argument_group("training settings (defaults in brackets)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIPPED:
            continue
        flag = _RENAMED.get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{f.metadata['help']} [{default}]".replace("%", "%%")  # argparse formats help with %
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            group.add_argument(flag, action="append", **kw)
        else:
            group.add_argument(flag, type=type(default), choices=f.metadata.get("choices"), **kw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdlora", description="Train Stable Diffusion LoRAs from a folder of images.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("dataset", nargs="?",
                   help="folder or .zip of images with .txt captions, or an example: example:character, example:style")
    t.add_argument("--out", help="run folder to create (lora.safetensors, samples/, events.jsonl...)")
    t.add_argument("--run-dir", help="train the run whose config.json is already in this folder")
    t.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET",
                   help="start from a preset's values: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items())
                   .replace("%", "%%"))  # argparse formats help with %
    t.add_argument("--config", help="a config.json to start from")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--gpus", type=int, default=1,
                   help="train one run data-parallel over this many GPUs (through accelerate launch)")
    _add_config_flags(t)

    e = sub.add_parser("eval", help="measure every save of a run (what it learned, how much it changes prompts "
                                    "without the trigger) and say which save and strength to use")
    e.add_argument("run", help="a run folder (sdlora train --out)")
    e.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")

    c = sub.add_parser("check", help="check a dataset for what makes a LoRA disappoint: duplicates, small, enlarged, "
                                     "cropped or blurry pictures, captions, how often each picture is seen")
    c.add_argument("dataset", help="folder or .zip of images with .txt captions, or an example such as example:style")
    c.add_argument("--trigger", default="", help="the trigger word the run will use")
    c.add_argument("--resolution", type=int, default=0, help="training resolution (0 = the base model's own)")
    c.add_argument("--base", default="tiny",
                   help="base model: tiny, sd1, sd2, sdxl, a diffusers folder or a .safetensors checkpoint")
    c.add_argument("--steps", type=int, default=0, help="with --batch-size: how often the run shows each picture")
    c.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="pictures per step")
    c.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")

    tg = sub.add_parser("tags", help="list a dataset's caption tags, or remove, replace or add tags in every caption "
                                     "(shows the change; --write writes it)")
    tg.add_argument("dataset", help="folder of images with .txt captions")
    tg.add_argument("--remove", default="", help="comma-separated tags to remove")
    tg.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                    help="replace tag OLD with NEW (NEW empty: remove it); give it again for more")
    tg.add_argument("--add", default="", help="comma-separated tags to add where missing")
    tg.add_argument("--at", choices=["start", "end"], default="end",
                    help="where added tags go (start: after the trigger word)")
    tg.add_argument("--trigger", default="", help="the trigger word, kept first when tags are added at the start")
    tg.add_argument("--write", action="store_true", help="write the changed captions (without it, only show them)")

    d = sub.add_parser("caption", help="draft a .txt caption for each picture with a captioner (pictures that have "
                                       "one are left alone unless --overwrite)")
    d.add_argument("dataset", help="folder of images (captions are written beside them), or an example with --dry-run")
    d.add_argument("--captioner", required=True,
                   help="tiny-world (the tiny model's own world, no download), florence2, blip, wd14, a hub id in the "
                        "local Hugging Face cache, or a folder holding a model")
    d.add_argument("--mode", choices=MODES, help="sentence captions or comma-separated tags (default: what the "
                                                 "captioner writes)")
    d.add_argument("--overwrite", action="store_true", help="also redraft pictures that have a caption")
    d.add_argument("--trigger", default="", help="put this word first in every caption")
    d.add_argument("--prefix", default="", help="text after the trigger, before the draft")
    d.add_argument("--suffix", default="", help="text at the end")
    d.add_argument("--drop-tags", default="", metavar="A,B", help="comma-separated tags to leave out")
    d.add_argument("--general-threshold", type=float, default=GENERAL_THRESHOLD,
                   help="taggers: the least score a general tag needs")
    d.add_argument("--character-threshold", type=float, default=CHARACTER_THRESHOLD,
                   help="taggers: the least score a character tag needs")
    d.add_argument("--batch-size", type=int, default=0, help="pictures at a time (0 = 16 on a GPU, 4 on the CPU)")
    d.add_argument("--dry-run", action="store_true", help="print the drafts, write no file")
    d.add_argument("--job-dir", help="also report progress and drafts to DIR/events.jsonl (the app follows it)")

    g = sub.add_parser("generate", help="make an image with a base model and LoRAs at chosen strengths",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("prompt", help="what to draw; put the LoRA's trigger word in it")
    g.add_argument("--base", default="tiny",
                   help="base model: 'tiny' (embedded), a diffusers folder, a .safetensors checkpoint or a hub id")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA file, optionally with its own strength; repeat to stack")
    g.add_argument("--strength", type=float, default=1.0,
                   help="strength for --lora files given without one (0 = the base model exactly)")
    g.add_argument("--negative", default="", help="negative prompt: what to keep out of the image")
    g.add_argument("--seed", type=int, default=0, help="random seed; the same seed redraws the same image")
    g.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampling steps")
    g.add_argument("--guidance", type=float, default=SAMPLE_GUIDANCE, help="guidance scale: how closely to follow the prompt")
    g.add_argument("--scheduler", default=SAMPLE_SCHEDULER,
                   help="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler, UniPCMultistepScheduler")
    g.add_argument("--size", type=int, default=0, help="width and height in pixels (0 = the model's own)")
    g.add_argument("--guidance-rescale", type=float, default=-1.0,
                   help="guidance rescale (-1 = 0.7 on a zero-terminal-SNR base, else 0)")
    g.add_argument("--clip-skip", type=int, default=0,
                   help="text-encoder layer from the end (1 = last, 2 = penultimate); 0 = what the LoRAs were trained "
                        "with, else the base's own")
    g.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"), default="auto",
                   help="what the base predicts; auto = what its files say")
    g.add_argument("--zero-terminal-snr", choices=("auto", "on", "off"), default="auto",
                   help="the base's noise schedule ends at zero SNR; auto = what its files say")
    g.add_argument("--grid", metavar="S1,S2,...", help="make a grid across these strengths for the first --lora")
    g.add_argument("--seeds", type=int, default=1, help="rows of the --grid, seeds seed..seed+N-1")
    g.add_argument("--out", required=True, help="PNG file to write")

    r = sub.add_parser("runs", help="list runs in a folder with their state")
    r.add_argument("root", nargs="?", default="runs", help="the folder holding the run folders (default: runs)")

    m = sub.add_parser("merge", help="bake LoRAs into a base model: a single-file checkpoint or a diffusers folder")
    m.add_argument("base", help="'tiny', a diffusers folder, a .safetensors checkpoint or a hub id")
    m.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]", help="LoRA files, each with its own strength (default 1)")
    m.add_argument("--out", required=True, help="NAME.safetensors (single file), or a folder with --format diffusers")
    m.add_argument("--format", choices=("single", "diffusers"), default="single",
                   help="single: one .safetensors in the original layout (ComfyUI, AUTOMATIC1111); diffusers: a folder")
    m.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="weights are summed in fp32, then stored in this precision")

    z = sub.add_parser("resize", help="lower a LoRA's rank by SVD (fixed rank, or per module by energy)")
    z.add_argument("file", help="the LoRA .safetensors file to resize")
    z.add_argument("--rank", type=int, help="new rank (with --energy: the most any module keeps)")
    z.add_argument("--energy", type=float,
                   help="per module, keep the smallest rank holding this fraction of the energy, e.g. 0.9")
    z.add_argument("--out", required=True, help="the resized .safetensors file to write")
    z.add_argument("--all", action="store_true", help="print every module, not only the 10 worst")

    i = sub.add_parser("info", help="what a LoRA file holds: family, ranks, alphas, targets, trigger, settings")
    i.add_argument("file", help="a LoRA .safetensors file (kohya or diffusers layout)")
    i.add_argument("--base", help="also check that every key maps onto this base model")
    i.add_argument("--json", action="store_true", help="print everything as JSON")

    sub.add_parser("app", help="open the browser app (`sdlora app --help` for its options)")
    return p


def _quiet_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its import warns about optional CPU kernels
    if argv[:1] == ["app"]:  # everything after `app` belongs to the app's own options
        return _app(argv[1:])
    if argv == ["spare"]:  # a training process started ahead for the app (sdlora.spare.Spare)
        from sdlora.spare import serve_spare

        return serve_spare(main)
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "check": _check, "tags": _tags, "caption": _caption,
                "generate": _generate, "runs": _runs,
                "merge": _merge, "resize": _resize, "info": _info}[args.command](args)
    except UserError as e:
        print(f"sdlora: error: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _train(args) -> int:
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:  # relaunch this very command under accelerate
        from sdlora.launch import launch_args

        argv = [a for i, a in enumerate(sys.argv[1:]) if a != "--gpus" and not a.startswith("--gpus=")
                and sys.argv[i] != "--gpus"]
        os.execvp(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *launch_args(args.gpus),
                                   "-m", "sdlora", *argv])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and k not in _SKIPPED}
    if args.run_dir:
        config = build_config(args.preset, args.config or str(Path(args.run_dir) / "config.json"), **overrides)
        run_dir = args.run_dir
    else:
        if not args.dataset or not args.out:
            raise UserError("give a dataset and --out", "sdlora train DATASET --base tiny --out runs/NAME")
        saved = Path(args.out) / "config.json"
        # --resume continues the run as it was configured; flags given now still win
        config_file = args.config or (str(saved) if args.resume and saved.exists() else None)
        config = build_config(args.preset, config_file, dataset=args.dataset, **overrides)
        run_dir = args.out
        if not args.resume and _started(Path(run_dir)):
            raise UserError(f"{run_dir} already holds a run", "add --resume to continue it, or pick another --out")
        if not args.resume:  # a command that failed before training began left only its config and error: start over
            (Path(run_dir) / "events.jsonl").unlink(missing_ok=True)
    examples.locate(config.dataset)  # a mistyped path is said at once, not after seconds of loading
    from sdlora.train import train

    _quiet_loading()
    train(config, run_dir, resume=args.resume, progress_bar=not args.quiet)
    return 0


def _check(args) -> int:
    from sdlora import dataset as ds
    from sdlora.check import check_dataset, summary

    if args.steps < 0 or args.batch_size < 1 or args.grad_accum < 1:
        raise UserError("--steps must be 0 or more, --batch-size and --grad-accum at least 1", "fix the numbers")
    data = ds.ingest(examples.locate(args.dataset))
    findings = check_dataset(data, trigger=args.trigger, resolution=args.resolution, base=args.base, steps=args.steps,
                             batch_size=args.batch_size, grad_accum=args.grad_accum)
    for name, reason in data.rejected:
        print(f"skipped  {name}: {reason}")
    for warning in data.warnings:
        print(f"note     {warning}")
    for finding in findings:
        print(f"{finding.severity:8s} {finding.message}" + (f"\n         -> {finding.hint}" if finding.hint else ""))
    print(summary(findings, len(data.records)))
    return 0


def _eval(args) -> int:
    from sdlora.evaluate import evaluate_run

    _quiet_loading()
    _, best = evaluate_run(args.run, device=args.device)
    print(f"use: {best.reason}")
    return 0


def _tags(args) -> int:
    from sdlora import tags
    from sdlora.workspace import folder_captions, write_caption

    folder = examples.locate(args.dataset)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", "unpack the .zip first: tags are edited in .txt files")
    items = [(file, caption) for file, _, caption in folder_captions(folder)]
    replace = []
    for pair in args.replace:
        old, sep, new = pair.partition("=")
        if not sep:
            raise UserError(f"--replace {pair!r} has no '='",
                            "write it as OLD=NEW, e.g. --replace 'blue_hair=blue hair'")
        replace.append((old, new))
    edit = tags.TagEdit(remove=tags.parse(args.remove), replace=tuple(replace), add=tags.parse(args.add), at=args.at,
                        trigger=args.trigger)
    if edit.is_empty():
        counts = tags.frequencies([caption for _, caption in items])
        print(f"{len(counts)} tags in {len(items)} captions (pictures holding each):")
        for tag, n in counts:
            print(f"{n:6d}  {tag}")
        return 0
    if args.write and examples.resolve(args.dataset) != args.dataset:
        raise UserError("the bundled examples are not edited in place", "copy the example's folder and edit the copy")
    changes = tags.preview(items, edit)
    for change in changes:
        print(f"{change.file}\n  before: {change.before}\n  after:  {change.after}")
        if args.write:
            write_caption(folder, change.file, change.after)
    verb = "changed" if args.write else "would change (add --write to write them)"
    print(f"{len(changes)} of {len(items)} captions {verb}")
    return 0


def _caption(args) -> int:
    from sdlora import tags
    from sdlora.caption import job

    if args.batch_size < 0 or not (0 <= args.general_threshold <= 1 and 0 <= args.character_threshold <= 1):
        raise UserError("--batch-size must be 0 or more, thresholds between 0 and 1", "fix the numbers")
    _quiet_loading()
    drafts = job.run(args.dataset, args.captioner, job_dir=args.job_dir, general_threshold=args.general_threshold,
                     character_threshold=args.character_threshold, batch_size=args.batch_size, mode=args.mode,
                     overwrite=args.overwrite, write=not args.dry_run, trigger=args.trigger, prefix=args.prefix,
                     suffix=args.suffix, drop_tags=tags.parse(args.drop_tags), say=print)
    done = "drafted (nothing written)" if args.dry_run else "written"
    print(f"{len(drafts)} caption{'s' * (len(drafts) != 1)} {done}" +
          ("" if args.overwrite else "; pictures with a caption left alone (--overwrite redrafts them)"))
    return 0


def _started(run_dir: Path) -> bool:
    """Whether a run in `run_dir` ever began training (a `start` event, or anything it saved)."""
    from sdlora.rundir import read_events

    return any(e["type"] == "start" for e in read_events(run_dir)) or (run_dir / "checkpoints").is_dir() \
        or any(run_dir.glob("lora*.safetensors"))


def _generate(args) -> int:
    from sdlora.generate import Previewer

    _quiet_loading()
    loras = [_lora_spec(spec, args.strength) for spec in args.lora]
    prev = Previewer(args.base, prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr)
    kw = dict(negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
              width=args.size or None, height=args.size or None, guidance_rescale=args.guidance_rescale,
              clip_skip=args.clip_skip)
    if args.grid:
        if not loras:
            raise UserError("--grid needs a --lora", "add --lora FILE")
        strengths = [float(s) for s in args.grid.split(",")]
        image = prev.strength_grid(loras[0][0], args.prompt, strengths, range(args.seed, args.seed + args.seeds), **kw)
    else:
        prev.set_loras(loras)
        image = prev.image(args.prompt, seed=args.seed, **kw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(args.out)
    return 0


def _lora_spec(spec: str, default: float) -> tuple[str, float]:
    """`FILE:0.8` -> (FILE, 0.8); `FILE` -> (FILE, default)."""
    path, _, strength = spec.rpartition(":")
    try:
        return (path, float(strength)) if path else (spec, default)
    except ValueError:
        return spec, default


def _runs(args) -> int:
    from sdlora.rundir import list_runs, read_events, status

    for run in list_runs(args.root):
        progress = [e for e in read_events(run) if e["type"] == "progress"]
        where = f"step {progress[-1]['step']}/{progress[-1]['total']}" if progress else ""
        print(f"{run.name:30s} {status(run):8s} {where}")
    return 0


def _merge(args) -> int:
    from sdlora.merge import merge

    _quiet_loading()
    report = merge(args.base, [_lora_spec(spec, 1.0) for spec in args.loras], args.out, fmt=args.format,
                   precision=args.precision)
    for lora in report["loras"]:
        print(f"merged {lora['file']} at {lora['strength']:g} ({lora['modules']} modules)")
    print(f"{report['layers_changed']} layers changed; wrote {report['out']} ({report['format']}, {report['precision']})")
    return 0


def _resize(args) -> int:
    from sdlora.resize import format_rows, resize

    rows = resize(args.file, args.out, rank=args.rank, energy=args.energy)
    print(format_rows(rows, limit=0 if args.all else 10))
    print(f"wrote {args.out}")
    return 0


def _info(args) -> int:
    import json

    from sdlora.info import describe, format_info

    if args.base:
        _quiet_loading()
    info = describe(args.file, base=args.base)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _app(rest: list[str]) -> int:
    from sdlora.app import main as app_main

    return app_main(rest)


if __name__ == "__main__":
    sys.exit(main())
