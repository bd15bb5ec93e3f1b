"""Write the architecture configs and tokenizers that single-file checkpoints need, into `sdlora/configs/<family>/`.

A `.safetensors` checkpoint from a model-sharing site holds weights only. To build the diffusers pipeline around them,
`from_single_file` needs each component's config and the tokenizers, which diffusers otherwise downloads from the hub.
These folders ship with sdlora so that a single file loads with no network. Each one is a diffusers model folder
without weights (model_index.json, <component>/config.json, tokenizer files), holding the published values of:

- sd1:  stable-diffusion-v1-5/stable-diffusion-v1-5 (model_index.json, unet/, vae/, text_encoder/, scheduler/)
- sd2:  stabilityai/stable-diffusion-2-1 (the 768 v-prediction model; sdlora switches the scheduler to epsilon for
        SD2 checkpoints that are not v-prediction)
- sdxl: stabilityai/stable-diffusion-xl-base-1.0
- sd3.5-medium: stabilityai/stable-diffusion-3.5-medium; sd3.5-large: stabilityai/stable-diffusion-3.5-large (no
  tokenizers: T5's sentencepiece model is too large to ship, so their single files load with --base-config)
- flux.1-dev: black-forest-labs/FLUX.1-dev; flux.1-schnell: black-forest-labs/FLUX.1-schnell (no tokenizers, as
  SD3.5; BFL's single files hold the transformer alone, the rest comes from --base-config)

The tokenizers are the CLIP BPE that scripts/make_tokenizer.py builds (the embedded tiny model's), padded as each
published tokenizer is: SD1 and SDXL's `tokenizer` pad with `<|endoftext|>`, SD2's `tokenizer` and SDXL's
`tokenizer_2` (OpenCLIP) pad with `!`.

    python scripts/make_configs.py [--tokenizer sdlora/tiny/model/tokenizer]
"""

import argparse
import json
import shutil
from pathlib import Path

from make_tokenizer import compact  # scripts/, beside this one

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "sdlora" / "configs"
DIFFUSERS_VERSION = "0.42.1"

# --- SD 1.5: huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 -------------------------------------------
SD1_UNET = {  # unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD1_VAE = {  # vae/config.json
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = {  # text_encoder/config.json: OpenAI CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14)
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD1_SCHEDULER = {  # scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# --- SD 2.1 (768, v-prediction): huggingface.co/stabilityai/stable-diffusion-2-1 --------------------------------
SD2_UNET = {  # unet/config.json
    **SD1_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD2_VAE = {**SD1_VAE, "sample_size": 768}  # vae/config.json
OPENCLIP_H = {  # text_encoder/config.json: OpenCLIP ViT-H/14's text tower without its last layer (SD2 uses the
    "architectures": ["CLIPTextModel"],  # penultimate layer's output, so the diffusers model stops there)
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
SD2_SCHEDULER = {  # scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# --- SDXL base 1.0: huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 ---------------------------------------
SDXL_UNET = {  # unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE = {**SD1_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}  # vae/config.json
OPENCLIP_BIGG = {  # text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower with its projection
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}
SDXL_SCHEDULER = {  # scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SD_INDEX = {  # model_index.json of SD1.5 and SD2.1, without the safety checker sdlora never loads
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_INDEX = {  # model_index.json
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# --- SD3.5 Medium and Large: huggingface.co/stabilityai/stable-diffusion-3.5-medium, -large -------------------------
SD35_MEDIUM_TRANSFORMER = {  # transformer/config.json
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD35_LARGE_TRANSFORMER = {  # transformer/config.json
    **SD35_MEDIUM_TRANSFORMER,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "num_attention_heads": 38,
    "num_layers": 38,
    "pos_embed_max_size": 192,
}
SD3_VAE = {  # vae/config.json: 16 latent channels, shifted and scaled
    **SD1_VAE,
    "force_upcast": True,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}
SD3_CLIP_L = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}  # text_encoder/config.json
SD3_CLIP_G = OPENCLIP_BIGG  # text_encoder_2/config.json
T5_XXL = {  # text_encoder_3/config.json: google/t5-v1_1-xxl's encoder
    "architectures": ["T5EncoderModel"],
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
SD3_INDEX = {  # model_index.json (3.5 has no image encoder)
    "_class_name": "StableDiffusion3Pipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# no tokenizers: T5's sentencepiece model is too large to ship, and without it the CLIP ones (SDXL's, in sdxl/) load
# no SD3 single file, so these folders hold the architecture only
SD3 = dict(index=SD3_INDEX, scheduler=SD3_SCHEDULER, vae=SD3_VAE, text_encoder=SD3_CLIP_L, text_encoder_2=SD3_CLIP_G,
           text_encoder_3=T5_XXL)

FLUX_DEV_TRANSFORMER = {  # transformer/config.json
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
FLUX_SCHNELL_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False}
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}  # vae/config.json
FLUX_CLIP_L = {**CLIP_L, "architectures": ["CLIPTextModel"]}  # text_encoder/config.json
# scheduler/scheduler_config.json: dev shifts its sigmas by the image's token count while sampling, schnell not at all
FLUX_DEV_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                      "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True}
FLUX_SCHNELL_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                          "use_dynamic_shifting": False}
FLUX_INDEX = {  # model_index.json
    "_class_name": "FluxPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
FLUX = dict(index=FLUX_INDEX, vae=FLUX_VAE, text_encoder=FLUX_CLIP_L, text_encoder_2=T5_XXL)  # no tokenizers, as SD3

FOLDERS = {
    "sd1": dict(index=SD_INDEX, scheduler=SD1_SCHEDULER, unet=SD1_UNET, vae=SD1_VAE, text_encoder=CLIP_L,
                tokenizer="<|endoftext|>"),
    "sd2": dict(index=SD_INDEX, scheduler=SD2_SCHEDULER, unet=SD2_UNET, vae=SD2_VAE, text_encoder=OPENCLIP_H,
                tokenizer="!"),
    "sdxl": dict(index=SDXL_INDEX, scheduler=SDXL_SCHEDULER, unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=CLIP_L,
                 text_encoder_2=OPENCLIP_BIGG, tokenizer="<|endoftext|>", tokenizer_2="!"),
    "sd3.5-medium": dict(**SD3, transformer=SD35_MEDIUM_TRANSFORMER),
    "sd3.5-large": dict(**SD3, transformer=SD35_LARGE_TRANSFORMER),
    "flux.1-dev": dict(**FLUX, scheduler=FLUX_DEV_SCHEDULER, transformer=FLUX_DEV_TRANSFORMER),
    "flux.1-schnell": dict(**FLUX, scheduler=FLUX_SCHNELL_SCHEDULER, transformer=FLUX_SCHNELL_TRANSFORMER),
}


def _write_json(path: Path, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def write_folder(folder: Path, spec: dict, tokenizer_dir: Path) -> None:
    from transformers import CLIPTokenizer

    scheduler = dict(spec["scheduler"])
    _write_json(folder / "model_index.json", {**spec["index"], "_diffusers_version": DIFFUSERS_VERSION,
                                              "scheduler": ["diffusers", scheduler["_class_name"]]})
    _write_json(folder / "scheduler" / "scheduler_config.json", {**scheduler, "_diffusers_version": DIFFUSERS_VERSION})
    for name, cls in (("unet", "UNet2DConditionModel"), ("transformer", spec["index"].get("transformer", [0, 0])[1]),
                      ("vae", "AutoencoderKL")):
        if name in spec:
            _write_json(folder / name / "config.json", {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION,
                                                        **spec[name]})
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in spec:
            _write_json(folder / name / "config.json", {**spec[name], "dtype": "float32"})
    for name in ("tokenizer", "tokenizer_2"):
        if name in spec:
            tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), pad_token=spec[name], model_max_length=77)
            tok.save_pretrained(str(folder / name))
            compact(folder / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(ROOT / "sdlora" / "tiny" / "model" / "tokenizer"),
                    help="a CLIPTokenizer folder made by scripts/make_tokenizer.py")
    args = ap.parse_args()
    for family, spec in FOLDERS.items():
        folder = OUT / family
        shutil.rmtree(folder, ignore_errors=True)
        write_folder(folder, spec, Path(args.tokenizer))
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
