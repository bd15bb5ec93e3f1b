"""Full-size SD1.5 and SDXL through sdlora on a GPU: single file in, kohya-named LoRA out.

For each family: build the published architecture (random init; no weights can be downloaded) from the configs that
ship in sdlora/configs, write it as an original-layout single-file checkpoint (LDM for SD1.5, SGM for SDXL, fp16,
as model-sharing sites serve them), then with the hub switched off let sdlora load that file, train 20 steps at the
family's resolution (512 / 1024) with its memory-aware defaults, export and verify. Finally the exported module
names are compared, name for name, with kohya's for the same checkpoint at the default targets (attention, text
encoders on): SD1.5 128 UNet + 48 text-encoder modules; SDXL 560 UNet + 48 (te1) + 128 (te2).

    python bench/full_size_check.py --out DIR [--families sd1 sdxl] [--steps 20]
    python bench/full_size_check.py --out DIR --tiny     # CPU smoke test on the tests' small models

Results go to DIR/results.json (or --results FILE) and, as a markdown table, to stdout (docs/benchmarks.md holds a run's).
SD3.5 and FLUX.1 have their own: bench/full_size_flow.py (this check, a memory cap and the step against diffusers').
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the single files must load from what ships with sdlora alone
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from original_layout import kohya_reference, pipeline_to_original  # noqa: E402  (tests/original_layout.py)

RESOLUTION = {"sd1": 512, "sdxl": 1024}
KOHYA_COUNTS = {"sd1": {"unet": 128, "lora_te_": 48}, "sdxl": {"unet": 560, "lora_te1_": 48, "lora_te2_": 128}}


def build(arch: str, device: str):
    """The published architecture from sdlora's shipped config folder, random weights."""
    from diffusers import (AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdlora.models import shipped_config

    folder = shipped_config(arch)
    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"))
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    scheduler_config = DiffusionPipeline.load_config(folder)["scheduler"][1]
    import diffusers

    parts["scheduler"] = getattr(diffusers, scheduler_config).from_pretrained(folder, subfolder="scheduler")
    if arch == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def draw_dataset(folder: Path, resolution: int, n: int = 8, square: bool = False) -> Path:
    """n captioned images of shapes in a few aspect ratios around the training resolution (so buckets and SDXL's
    size/crop conditioning vary); with `square`, all resolution x resolution (one bucket: every batch full but an
    epoch's last)."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 220, 40)}
    for i in range(n):
        w, h = [(resolution, resolution), (resolution * 5 // 4, resolution), (resolution, resolution * 4 // 3)][
            0 if square else i % 3]
        color, bg = rng.sample(sorted(colors), 2)
        im = Image.new("RGB", (w, h), colors[bg])
        box = [w // 4, h // 4, 3 * w // 4, 3 * h // 4]
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(box, fill=colors[color])
        im.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a {color} {'circle' if i % 2 else 'square'} on a {bg} background")
    return folder


def reference_names(arch: str, checkpoint: Path, config_folder: str) -> set[str]:
    """kohya's module names for this checkpoint: read off its own keys (SGM UNet, text encoders); for SD1.5's UNet
    kohya uses diffusers paths, so those come from diffusers' own LDM converter."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        keys = list(f.keys())
        names = kohya_reference(keys)
        if arch == "sdxl":
            return names
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        unet_state = {k: f.get_tensor(k) for k in keys if k.startswith("model.diffusion_model.")}
    names = {n for n in names if not n.startswith("lora_unet_")}
    config = UNet2DConditionModel.load_config(config_folder, subfolder="unet")
    converted = convert_ldm_unet_checkpoint(unet_state, config)
    targets = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
               ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")
    names |= {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in converted
              if k.endswith(".weight") and k[:-len(".weight")].endswith(targets)}
    return names


def write_checkpoint(arch: str, out: Path, tiny: bool, result: dict) -> tuple[Path, str]:
    """Build the model and write it as an fp16 original-layout single file; (file, base_config for --tiny)."""
    from safetensors.torch import save_file

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if tiny:
        from test_families import build_pipeline

        pipe = build_pipeline(arch)
        base_config = str(out / f"{arch}-config")
        pipe.save_pretrained(base_config)
    else:
        pipe, base_config = build(arch, device), ""
    result["params_m"] = {name: round(sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6, 2)
                          for name in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, name, None)}
    checkpoint = out / f"{arch}-random.safetensors"
    save_file({k: v.cpu() for k, v in pipeline_to_original(pipe, torch.float16).items()}, str(checkpoint))
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    result["checkpoint_gb"] = round(checkpoint.stat().st_size / 1e9, 2)
    result["build_and_write_s"] = round(time.perf_counter() - t0, 1)
    return checkpoint, base_config


def memory_sweep(arch: str, out: Path, tiny: bool, rows=((4, True), (2, True), (1, True)), steps: int = 3) -> dict:
    """Peak GPU memory of short runs at explicit (batch_size, gradient_checkpointing), for the table in models.py."""
    from sdlora.config import TrainConfig
    from sdlora.rundir import read_events
    from sdlora.train import train

    result: dict = {"family": arch, "sweep": []}
    checkpoint, base_config = write_checkpoint(arch, out, tiny, result)
    resolution = 64 if tiny else RESOLUTION[arch]
    data = draw_dataset(out / f"{arch}-data", resolution)
    for batch_size, checkpointing in rows:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run = out / f"{arch}-sweep-{batch_size}-{int(checkpointing)}"
        config = TrainConfig(dataset=str(data), base=str(checkpoint), base_config=base_config, resolution=resolution,
                             steps=steps, sample_every=10_000, save_every=10_000, sample_steps=2, keep_checkpoints=1,
                             sample_prompts=["a red circle"], batch_size=batch_size,
                             gradient_checkpointing=checkpointing, auto_memory=False)
        train(config, run, progress_bar=False)
        progress = [e for e in read_events(run) if e["type"] == "progress"]
        result["sweep"].append({"batch_size": batch_size, "gradient_checkpointing": checkpointing,
                                "peak_memory_gb": progress[-1]["memory_gb"]})
    checkpoint.unlink()
    return result


def run_family(arch: str, out: Path, steps: int, tiny: bool) -> dict:
    from safetensors import safe_open

    from sdlora.config import TrainConfig
    from sdlora.rundir import read_events
    from sdlora.train import train

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"family": arch, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    checkpoint, base_config = write_checkpoint(arch, out, tiny, result)
    resolution = 64 if tiny else RESOLUTION[arch]
    data = draw_dataset(out / f"{arch}-data", resolution)
    run = out / f"{arch}-run"
    config = TrainConfig(dataset=str(data), base=str(checkpoint), base_config=base_config, resolution=resolution,
                         steps=steps, sample_every=10_000, save_every=10_000, sample_steps=4, keep_checkpoints=1,
                         sample_prompts=["a red circle on a blue background"], trigger="zxq", seed=0)
    t1, t1_wall = time.perf_counter(), time.time()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(config, run, progress_bar=False)
    result["train_total_s"] = round(time.perf_counter() - t1, 1)
    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    progress = [e for e in events if e["type"] == "progress"]
    first_sample_done = max(e["time"] for e in events if e["type"] == "sample" and e["step"] == 0)
    result.update(
        setup_s=round(start["time"] - t1_wall, 1),  # load the file, move to the GPU, cache latents and text
        precision=start["precision"], batch_size=start["batch_per_gpu"],
        memory_pick=[e["message"] for e in events if e["type"] == "warning" and "memory defaults" in e["message"]],
        steps=steps, train_steps_s=round(progress[-1]["time"] - first_sample_done, 1),
        images_per_s=round(steps * start["global_batch"] / max(progress[-1]["time"] - first_sample_done, 1e-9), 2),
        peak_memory_gb=progress[-1]["memory_gb"], final_loss=round(progress[-1]["loss"], 4),
        verify={k: v for k, v in next(e for e in events if e["type"] == "verify").items() if k not in ("type", "time")})
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    from sdlora.models import shipped_config

    reference = reference_names(arch, checkpoint, base_config or shipped_config(arch))
    result["keys"] = len(keys)
    result["modules"] = {"unet": sum(n.startswith("lora_unet_") for n in names),
                         **{p: sum(n.startswith(p) for n in names) for p in KOHYA_COUNTS[arch] if p != "unet"}}
    result["kohya_reference_modules"] = len(reference)
    result["equal_to_kohya"] = names == reference
    result["only_ours"] = sorted(names - reference)[:5]
    result["only_kohya"] = sorted(reference - names)[:5]
    result["counts_as_expected"] = tiny or result["modules"] == KOHYA_COUNTS[arch]
    result["metadata"] = {k: meta[k] for k in ("ss_base_model_version", "ss_v2", "modelspec.architecture",
                                                "modelspec.prediction_type", "ss_resolution")}
    result["examples"] = sorted(n for n in names if n.endswith("transformer_blocks_0_attn1_to_q"))[:3]
    checkpoint.unlink()  # several GB; the numbers are what we keep
    return result


def table(results: list[dict]) -> str:
    rows = ["| family | GPU | params (M) | checkpoint | picked | steps | images/s | peak GPU mem | "
            "LoRA modules (UNet / TE) | = kohya's | verify |", "|" + "---|" * 11]
    for r in results:
        te = " + ".join(str(v) for k, v in r["modules"].items() if k != "unet")
        rows.append(f"| {r['family']} @ {r['metadata']['ss_resolution']} | {r['device']} | "
                    f"{sum(r['params_m'].values()):.0f} | {r['checkpoint_gb']} GB fp16 | batch {r['batch_size']}, "
                    f"{r['precision']} | {r['steps']} in {r['train_steps_s']} s | {r['images_per_s']} | "
                    f"{r['peak_memory_gb']} GB | {r['modules']['unet']} / {te} | "
                    f"{'yes' if r['equal_to_kohya'] else 'NO'} ({r['kohya_reference_modules']}) | "
                    f"{r['verify']['keys_consumed']}/{r['verify']['keys_written']} keys, strength 0 diff "
                    f"{r['verify']['strength0_max_diff']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=sorted(RESOLUTION))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with the tests' small models at 64 px")
    ap.add_argument("--results", help="where to write results.json (default: in --out)")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: peak memory of 3-step runs at batch 4/2/1 with gradient checkpointing")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = Path(args.results or out / "results.json")
    results = []
    for arch in args.families:
        try:
            results.append(memory_sweep(arch, out, args.tiny) if args.sweep else run_family(arch, out, args.steps,
                                                                                             args.tiny))
        except Exception as e:  # keep what the other family gives
            results.append({"family": arch, "error": f"{type(e).__name__}: {e}"})
            print(f"{arch} failed: {type(e).__name__}: {e}", flush=True)
        results_file.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[-1], indent=2), flush=True)
    ok = [r for r in results if "error" not in r]
    if args.sweep:
        sys.exit(0 if len(ok) == len(results) else 1)
    if ok:
        print(table(ok))
    sys.exit(0 if len(ok) == len(results) and all(r["equal_to_kohya"] and r["counts_as_expected"]
                                                   and r["verify"]["ok"] for r in ok) else 1)


if __name__ == "__main__":
    main()
