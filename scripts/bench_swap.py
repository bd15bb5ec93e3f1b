"""Time a LoRA hot-swap in the Previewer against a full base load, on an SD1.5-sized model (random weights).

The weights do not matter for timing, only their sizes: the script writes an SD1.5-shaped diffusers folder (fp16, from
sdlora/configs/sd1) and two rank-16 attention LoRAs in the kohya layout, then times with `time.perf_counter`:
loading the base into a Previewer, loading a LoRA file, re-weighting, stacking a second file and switching between
them. Results go to stdout as JSON; docs/tools.md quotes them.

    python scripts/bench_swap.py [--work /tmp/bench_swap] [--repeat 5]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def make_model(folder: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = Path(__file__).resolve().parent.parent / "sdlora" / "configs" / "sd1"
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(configs / "tokenizer"),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(configs / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)


def make_lora(pipe, path: Path, seed: int, rank: int = 16) -> None:
    from safetensors.torch import save_file

    from sdlora.families.naming import kohya_name, text_encoder_prefix
    from sdlora.families.targets import TEXT_TARGETS, UNET_TARGETS

    g = torch.Generator().manual_seed(seed)
    state = {}
    for model, targets, prefix in ((pipe.unet, UNET_TARGETS["attn"], None),
                                   (pipe.text_encoder, TEXT_TARGETS["attn"], "lora_te_")):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
                key = kohya_name(text_encoder_prefix(name, prefix) if prefix else "lora_unet_", name)
                state[f"{key}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
                state[f"{key}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
                state[f"{key}.alpha"] = torch.tensor(rank / 2.0)
    save_file(state, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/bench_swap")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "sd15-random"
    if not (folder / "model_index.json").exists():
        make_model(folder)

    from sdlora.generate import Previewer
    from sdlora.models import load_base

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    loads = []
    for _ in range(2):  # the second load finds the files in the page cache, as a user's second run does
        loads.append(timed(lambda: Previewer(load_base(str(folder)), device="cpu")))
    prev = Previewer(load_base(str(folder)), device="cpu")
    a, b = work / "a.safetensors", work / "b.safetensors"
    for path, seed in ((a, 1), (b, 2)):
        if not path.exists():
            make_lora(prev.pipe, path, seed)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "base_load_s": loads,
              "lora_file_mb": round(a.stat().st_size / 2**20, 1)}
    result["first_load_a_s"] = timed(lambda: prev.set_loras([(str(a), 1.0)]))
    result["reweight_a_s"] = statistics.median(timed(lambda s=s: prev.set_loras([(str(a), s)]))
                                               for s in [0.2, 0.4, 0.6, 0.8, 1.0][: args.repeat])
    result["add_b_stacked_s"] = timed(lambda: prev.set_loras([(str(a), 0.8), (str(b), 0.5)]))
    result["reweight_both_s"] = statistics.median(timed(lambda s=s: prev.set_loras([(str(a), s), (str(b), 1 - s)]))
                                                  for s in [0.2, 0.4, 0.6, 0.8, 1.0][: args.repeat])
    result["switch_to_b_only_s"] = statistics.median(timed(lambda: prev.set_loras([(str(b), 1.0)]))
                                                     for _ in range(args.repeat))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
