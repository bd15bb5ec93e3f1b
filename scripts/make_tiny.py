"""Write the embedded tiny base model (random init) as a diffusers folder at `sdlora.tiny.MODEL_DIR`.

The architecture is Stable Diffusion 1.x's, scaled down: an AutoencoderKL, a UNet2DConditionModel with
cross-attention, a CLIP text encoder and the real CLIP BPE tokenizer (made by scripts/make_tokenizer.py). Sizes
(ARCHITECTURES): "x8", the shipped one (64 px -> 8x8x4 latents), "x4" (64 px -> 16x16x4 latents: fine enough for
eyes with pupils, four times the UNet's work per image; sdlora/tiny/NOTES.md has what it measured) and "x4c8"
(16x16x8 latents: room for 1-px lines; the UNet's step costs about what x4's does), "x4c8w" (x4c8 with a wider
autoencoder and a narrower UNet) and "x4c8w-u192" (x4c8w's autoencoder under x4c8's UNet). Weights are stored in
fp16 to keep the package small; diffusers loads them as fp32.

    python scripts/make_tiny.py [--arch x8] [--seed 0] [--tokenizer DIR]
"""

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from make_tokenizer import compact  # scripts/, beside this one
from sdlora.tiny import MODEL_DIR

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128, 192),
    layers_per_block=1,
    attention_head_dim=4,  # SD1.x's config key; it is the number of heads
    cross_attention_dim=128,
    norm_num_groups=32,
)
VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # three downsamplings: x8
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
# (UNet, VAE) by name; the same UNet runs at 16x16 under an autoencoder that downsamples twice.
_X4_VAE = dict(VAE, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               block_out_channels=(64, 128, 128))
ARCHITECTURES = {
    "x8": (UNET, VAE),
    "x4": (dict(UNET, sample_size=16), _X4_VAE),
    # 8 latent channels: a 4x4 pixel patch (48 numbers) into 8, where x4 packs it into 4 and x8 an 8x8 patch into 4
    "x4c8": (dict(UNET, sample_size=16, in_channels=8, out_channels=8), dict(_X4_VAE, latent_channels=8)),
    # x4c8 with a wider autoencoder (256 channels at 16x16, nearly free on a CPU: it encodes each picture once) and a
    # narrower UNet (32/64/128: a LoRA step on 2 CPU cores costs about 70% of 64/128/192's)
    "x4c8w": (dict(UNET, sample_size=16, in_channels=8, out_channels=8, block_out_channels=(32, 64, 128)),
              dict(_X4_VAE, latent_channels=8, block_out_channels=(64, 128, 256))),
    # x4c8w's autoencoder under x4c8's UNet (64/128/192, three times the narrow one's parameters): the narrow UNet
    # drew crisp shapes but followed background words poorly after 7.7M samples (sdlora/tiny/NOTES.md)
    "x4c8w-u192": (dict(UNET, sample_size=16, in_channels=8, out_channels=8),
                   dict(_X4_VAE, latent_channels=8, block_out_channels=(64, 128, 256))),
}
TEXT = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
    projection_dim=128,
)
# SD1.5's own scheduler settings (its model_index ships PNDM with these values); the folder samples with Euler.
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
    clip_sample=False,  # as SD1.5's config says; DDIM's default (True) clips the predicted latents and ruins samples
)


def build(seed: int, tokenizer_dir: Path, arch: str = "x8") -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet, vae = ARCHITECTURES[arch]
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        unet=UNet2DConditionModel(**unet),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="x8", choices=list(ARCHITECTURES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=str(Path(MODEL_DIR) / "tokenizer"))
    args = ap.parse_args()
    tmp = Path(MODEL_DIR + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = build(args.seed, Path(args.tokenizer), args.arch)
    pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    compact(tmp / "tokenizer")
    # transformers loads a model in its config's dtype; keep fp16 storage but make plain from_pretrained run fp32.
    te_config = tmp / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    tmp.rename(MODEL_DIR)
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")}
    print(f"wrote {MODEL_DIR}: " + ", ".join(f"{n} {c / 1e6:.1f}M params" for n, c in counts.items()))


if __name__ == "__main__":
    main()
