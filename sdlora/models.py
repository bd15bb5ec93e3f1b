"""Load a base model (the embedded tiny one, a diffusers folder, a single-file checkpoint or a hub id) and tell its family."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora.errors import UserError

# What differs between families sits here, in one table. The tiny model is SD1 for every loader's purposes.
FAMILIES = {
    "sd1": dict(resolution=512, base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", v2=False),
    "sd2": dict(resolution=512, base_model_version="sd_v2", architecture="stable-diffusion-v2-512/lora", v2=True),
    "sd2-v": dict(resolution=768, base_model_version="sd_v2_768_v", architecture="stable-diffusion-v2-768-v/lora", v2=True),
    "sdxl": dict(resolution=1024, base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora", v2=False),
}
TINY_RESOLUTION = 64


@dataclass
class Base:
    pipe: object  # a diffusers StableDiffusionPipeline (or the SDXL one)
    family: str  # a key of FAMILIES
    name: str  # what the user gave, for metadata
    resolution: int  # the family's native training resolution
    prediction_type: str  # "epsilon" or "v_prediction", from the scheduler config


def detect_family(pipe) -> str:
    """SDXL has a second text encoder; SD2 cross-attends to 1024-wide OpenCLIP states; v-prediction comes from the
    scheduler config, never the weights."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipe.unet.config.cross_attention_dim == 1024:
        return "sd2-v" if pipe.scheduler.config.get("prediction_type") == "v_prediction" else "sd2"
    return "sd1"


def load_base(spec: str, dtype: torch.dtype = torch.float32) -> Base:
    """Load `spec` ('tiny', a diffusers folder, a .safetensors/.ckpt file or a hub id) as a diffusers pipeline."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    kw = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if spec == "tiny":
        from sdlora.tiny import MODEL_DIR

        pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, **kw)
        return _base(pipe, spec, TINY_RESOLUTION)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{spec} is not a diffusers model folder (no model_index.json)",
                            "point --base at the folder that holds model_index.json, or at a .safetensors file")
        return _base(DiffusionPipeline.from_pretrained(str(path), **kw), spec)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".pth"):
        if not path.exists():
            raise UserError(f"base model file not found: {spec}", "check the path")
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kw)
        except Exception as e:  # diffusers raises many types here; the user needs one line
            raise UserError(f"could not load {path.name} as a Stable Diffusion checkpoint: {str(e).splitlines()[0]}",
                            "use an SD1.x checkpoint file or a diffusers folder") from None
        return _base(pipe, spec)
    if spec.count("/") == 1 and not path.exists():
        return _base(_from_hub(spec, kw), spec)
    raise UserError(f"base model not found: {spec}", "use 'tiny', a diffusers folder, a .safetensors file or a hub id")


def _from_hub(repo_id: str, kw: dict):
    from diffusers import DiffusionPipeline

    # Try the local cache first so an offline machine never waits on the network.
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kw)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{repo_id} is not in the local model cache and the hub is switched off (HF_HUB_OFFLINE=1)",
                        "point --base at a local .safetensors file or diffusers folder")
    try:
        return DiffusionPipeline.from_pretrained(repo_id, **kw)
    except Exception as e:
        raise UserError(f"could not download {repo_id}: {str(e).splitlines()[0][:200]}",
                        "check the id and the network, or point --base at a local .safetensors file or diffusers folder") from None


def _base(pipe, name: str, resolution: int | None = None) -> Base:
    family = detect_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    return Base(pipe=pipe, family=family, name=name, resolution=resolution or FAMILIES[family]["resolution"],
                prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))
