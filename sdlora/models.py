"""Load a base model (the embedded tiny one, a diffusers folder, a single-file checkpoint or a hub id) and tell its family."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlora import families
from sdlora.errors import UserError, first_line
from sdlora.families import Family
from sdlora.families.naming import ORIGINAL_UNET

CONFIGS_DIR = Path(__file__).parent / "configs"  # per-architecture configs + tokenizers (scripts/make_configs.py)

TINY_RESOLUTION = 64
PREDICTION_TYPES = ("epsilon", "v_prediction")
# A zero-terminal-SNR base (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): its
# noise schedule is rescaled so the last timestep is pure noise (sec. 3.1), sampling starts from that last timestep
# (trailing spacing, sec. 3.3), and guidance is rescaled against overexposure (sec. 3.4; 0.7 is the paper's value).
ZTSNR_SCHEDULER = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
ZTSNR_GUIDANCE_RESCALE = 0.7


@dataclass
class Base:
    pipe: object  # a diffusers pipeline: the family's `pipeline` class
    family: str  # a key of sdlora.families.FAMILIES
    name: str  # what the user gave, for metadata
    resolution: int  # the base's native training resolution (a folder's own, else its family's)
    prediction_type: str  # "epsilon" or "v_prediction", from the scheduler config (or the override)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the base's noise schedule ends at zero SNR (its scheduler config says so, or the override did)."""
        return zero_terminal_snr(self.pipe.scheduler.config)

    @property
    def fam(self) -> Family:
        """The Family named by `family`."""
        return families.get(self.family)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """kohya key prefix -> text encoder, in pipeline order (SDXL: CLIP-L, then OpenCLIP-G)."""
        return dict(zip(self.fam.text_encoders, self.fam.text_encoder_models(self.pipe)))


def load_base(spec: str, dtype: torch.dtype = torch.float32, *, base_config: str = "",
              prediction_type: str = "auto", zero_terminal_snr: str = "auto", vae_dtype: torch.dtype | None = None,
              as_stored: bool = False) -> Base:
    """Load `spec` ('tiny', a diffusers folder, a .safetensors/.ckpt file or a hub id) as a diffusers pipeline.

    `dtype`: the UNet's and text encoders'; `vae_dtype` (default: `dtype`): the VAE's. Training loads its frozen
    base in the compute dtype and the VAE in fp32 straight from the files, with no fp32 copy of the UNet on the way.
    `as_stored`: a diffusers folder's UNet and text encoders keep the dtype their files hold (see stored_dtypes), so
    loading copies nothing on the CPU; the caller casts them, on the GPU where it trains there.

    A single file takes its architecture (configs, tokenizers) from `base_config` (a diffusers folder or a cached hub
    id) or, by default, from the configs that ship with sdlora for the family its weights show: no network needed.
    `prediction_type` ('epsilon'/'v_prediction') overrides what the scheduler config or the checkpoint suggests;
    `zero_terminal_snr` ('on'/'off') likewise overrides the scheduler config's `rescale_betas_zero_snr` or a single
    file's `ztsnr` key.
    """
    if prediction_type not in ("auto", *PREDICTION_TYPES):
        raise UserError(f"prediction_type = {prediction_type!r}: must be auto, epsilon or v_prediction",
                        "fix --prediction-type")
    if zero_terminal_snr not in ZERO_TERMINAL_SNR:
        raise UserError(f"zero_terminal_snr = {zero_terminal_snr!r}: must be auto, on or off",
                        "fix --zero-terminal-snr")
    override = None if prediction_type == "auto" else prediction_type
    ztsnr = {"on": True, "off": False}.get(zero_terminal_snr)
    vae_dtype = vae_dtype or dtype
    dtypes = dtype if vae_dtype == dtype else {"vae": vae_dtype, "default": dtype}  # diffusers: a dtype per component
    if spec == "tiny":
        from sdlora.tiny import MODEL_DIR

        tiny = families.get(families.TINY)
        pipe = _pipeline_class(tiny).from_pretrained(MODEL_DIR, **_pipeline_kwargs(tiny, dtypes))
        return _base(pipe, spec, override, ztsnr, TINY_RESOLUTION)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{spec} is not a diffusers model folder (no model_index.json)",
                            "point --base at the folder that holds model_index.json, or at a .safetensors file")
        family = families.detect_folder(json.loads((path / "model_index.json").read_text()))
        if as_stored and (stored := stored_dtypes(path, [family.denoiser, *family.text_encoders.values()])):
            dtypes = {"default": dtype, "vae": vae_dtype, **stored}
        pipe = _from_folder(str(path), family, dtypes)
        return _base(pipe, spec, override, ztsnr, _own_resolution(pipe))
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        if not path.is_file():
            raise UserError(f"base model file not found: {spec}", "check the path")
        pipe, suggested, suggested_ztsnr = _from_single_file(path, dtype, base_config, vae_dtype)
        return _base(pipe, spec, override or suggested, suggested_ztsnr if ztsnr is None else ztsnr)
    if spec.count("/") == 1 and not path.exists():
        pipe = _from_hub(spec, dtypes)
        return _base(pipe, spec, override, ztsnr, _own_resolution(pipe))
    raise UserError(f"base model not found: {spec}", "use 'tiny', a diffusers folder, a .safetensors file or a hub id")


def _pipeline_kwargs(family: Family, dtype: torch.dtype | dict) -> dict:
    return dict(dtype=dtype, **family.pipeline_kwargs)


def _pipeline_class(family: Family):
    import diffusers

    return getattr(diffusers, family.pipeline)


def _from_folder(folder: str, family: Family, dtype: torch.dtype | dict):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(folder, **_pipeline_kwargs(family, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load the diffusers folder {folder}: {first_line(e)}",
                        "check that it holds a complete Stable Diffusion model (unet, vae, text encoder, tokenizer)") from None


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def stored_dtypes(folder: str | Path, components: list[str]) -> dict[str, torch.dtype]:
    """component -> the floating dtype its weights are stored in, for each component of a diffusers folder whose
    .safetensors files (diffusers' or transformers' name, sharded or not, no variant) hold one such dtype only. Read
    from the files' headers; no tensor is read."""
    from safetensors import safe_open

    out = {}
    for component in components:
        folder_c = Path(folder) / component
        files = []
        for name in ("diffusion_pytorch_model", "model"):
            if (folder_c / f"{name}.safetensors").is_file():
                files = [folder_c / f"{name}.safetensors"]
            elif (index := folder_c / f"{name}.safetensors.index.json").is_file():
                files = [folder_c / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            if files:
                break
        found = set()
        try:
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    found |= {f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception:  # unreadable here: the load itself will say what is wrong
            continue
        floating = found & set(_SAFETENSORS_DTYPES)
        if len(floating) == 1 and found <= floating | {"I64", "I32"}:  # int buffers (position ids) stay as they are
            out[component] = _SAFETENSORS_DTYPES[floating.pop()]
    return out


# --- single-file checkpoints ------------------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    arch: str  # the layout of the weights: a Family.arch ("sd1", "sd2" or "sdxl")
    prediction_type: str | None  # what the file itself says or suggests; None = nothing either way
    why: str  # how prediction_type was found, for the start event
    zero_terminal_snr: bool | None = None  # the file says its schedule ends at zero SNR; None = it says nothing


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Tell the architecture of an original-layout (LDM/SGM) checkpoint from its keys and shapes, and whether it is
    a v-prediction model where the file says so."""
    path = Path(path)
    keys, tensor, metadata = _open_checkpoint(path)
    # FLUX.1's BFL files name the transformer's modules without model.diffusion_model.
    unet_keys = [k for k in keys if k.startswith((ORIGINAL_UNET, "double_blocks."))]
    if not unet_keys:
        hint = ("this looks like a diffusers-layout or partial file" if any(k.startswith(("down_blocks.", "unet."))
                                                                             for k in keys)
                else "sdlora trains Stable Diffusion 1.x, 2.x, SDXL, SD3.5 and FLUX.1 checkpoints")
        raise UserError(f"{path.name} is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights)",
                        f"{hint}; point --base at a full SD1/SD2/SDXL .safetensors file or a diffusers folder")
    conv_in = tensor(ORIGINAL_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise UserError(f"{path.name} is an inpainting or instruct model ({conv_in.shape[1]} input channels)",
                        "use a text-to-image base model (4 latent input channels)")
    family = families.detect_checkpoint(path.name, keys, tensor)
    arch = family.arch

    # v-prediction is a training choice the weights do not show by shape: look for what the file says.
    if "v_pred" in keys:  # ComfyUI writes an empty `v_pred` tensor into v-prediction checkpoints it saves
        # and reads an empty `ztsnr` beside it as a zero-terminal-SNR schedule (comfy/supported_models.py,
        # SDXL.model_type: "Some zsnr anime checkpoints", NoobAI-XL v-pred among them); without v_pred it ignores ztsnr
        if "ztsnr" in keys:
            return CheckpointInfo(arch, "v_prediction", "the checkpoint has v_pred and ztsnr keys", True)
        return CheckpointInfo(arch, "v_prediction", "the checkpoint has a v_pred key")
    spec_type = metadata.get("modelspec.prediction_type", "")
    if spec_type:
        pred = "v_prediction" if spec_type.startswith("v") else "epsilon"
        return CheckpointInfo(arch, pred, f"its modelspec.prediction_type is {spec_type}")
    guessed = family.checkpoint_prediction(tensor)  # a family whose weights show it (SD2, by a heuristic)
    if guessed:
        return CheckpointInfo(arch, *guessed)
    return CheckpointInfo(arch, None, "")


def _open_checkpoint(path: Path):
    """(keys, tensor(key) -> Tensor | None, safetensors metadata) without reading the whole file where possible."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:
            raise UserError(f"{path.name} is not a readable .safetensors file: {first_line(e)}",
                            "download it again; the file may be truncated") from None
        keys = set(f.keys())
        return keys, (lambda k: f.get_tensor(k) if k in keys else None), (f.metadata() or {})
    state = _torch_load(path)
    return set(state), state.get, {}


def _torch_load(path: Path) -> dict:
    """A .ckpt/.pt file through torch.load(weights_only=True) only: plain pickle can run arbitrary code."""
    import pickle

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path.name} holds pickled objects besides weights, and sdlora only loads .ckpt files with "
                        f"weights_only=True ({first_line(e, 120)})",
                        "use a .safetensors version of the model") from None
    except Exception as e:
        raise UserError(f"{path.name} could not be read as a PyTorch checkpoint: {first_line(e)}",
                        "use a .safetensors version of the model") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path.name} does not hold a state dict", "use a .safetensors version of the model")
    return state


def shipped_config(arch: str) -> str:
    """The diffusers config folder (no weights) that ships with sdlora for an architecture."""
    return str(CONFIGS_DIR / arch)


def single_file_lacks(family: Family) -> str:
    """What an original-layout single file of `family` lacks that `base_config` must bring, or "" where the configs
    shipped with sdlora complete it: FLUX.1's transformer-only file its VAE and text encoders, SD3.5's file the T5
    tokenizer (a sentencepiece model too large to ship: scripts/make_configs.py)."""
    if family.denoiser_from_original is not None:
        return "its VAE and text encoders (it holds the transformer only)"
    if not all((Path(shipped_config(family.arch)) / t).is_dir() for t in family.tokenizer_components):
        return "its T5 tokenizer, which does not ship with sdlora"
    return ""


def _from_single_file(path: Path, dtype: torch.dtype, base_config: str, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKL

    info = inspect_checkpoint(path)
    config = base_config or shipped_config(info.arch)
    family = families.of_arch(info.arch)
    label = family.label
    if base_config:
        index = Path(base_config) / "model_index.json"
        if Path(base_config).is_dir() and not index.exists():
            raise UserError(f"base_config {base_config} is not a diffusers model folder (no model_index.json)",
                            "point --base-config at a diffusers folder of the same architecture, or leave it empty")
        if index.exists():
            config_group = families.detect_folder(json.loads(index.read_text())).group
            if config_group != family.group:
                raise UserError(f"{path.name} is an {label} checkpoint but base_config {base_config} is "
                                f"an {config_group} model",
                                "give a base_config of the same family, or leave it empty to use the shipped one")
    if family.denoiser_from_original is not None:
        return _denoiser_from_single_file(path, family, base_config, dtype, vae_dtype), None, None
    if not base_config and single_file_lacks(family):
        raise UserError(f"{path.name} is an {label} checkpoint, and its T5 tokenizer does not ship with sdlora",
                        f"pass --base-config with a diffusers {label} folder or a cached hub id "
                        "(stabilityai/stable-diffusion-3.5-medium or -large)")
    cls = _pipeline_class(family)
    try:
        # config= a local folder: diffusers reads every component's config and the tokenizers from it, and with
        # local_files_only nothing is fetched, so this works offline (diffusers.loaders.single_file.from_single_file).
        kwargs = _pipeline_kwargs(family, dtype)
        if vae_dtype != dtype:  # diffusers' single-file loader takes one dtype: the VAE is read on its own
            kwargs["vae"] = AutoencoderKL.from_single_file(str(path), config=config, subfolder="vae",
                                                           local_files_only=True, dtype=vae_dtype)
        pipe = cls.from_single_file(str(path), config=config, local_files_only=True, **kwargs)
    except UserError:
        raise
    except Exception as e:  # diffusers raises many types here; the user needs one line
        hint = ("pass --base-config with a diffusers folder (or cached hub id) of this model's architecture"
                if not base_config else "check that --base-config has the same architecture as the file")
        raise UserError(f"could not load {path.name} as an {label} checkpoint: {first_line(e, 200)}", hint) from None
    for name in family.frozen_text_encoders:
        t5 = getattr(pipe, name, None)
        if t5 is not None:
            # diffusers 0.42 builds a single file's T5 without putting it in eval mode
            # (create_diffusers_t5_model_from_checkpoint), so its dropout (0.1) would change every encoding
            t5.eval()
        if t5 is not None and hasattr(t5, "shared") and t5.encoder.embed_tokens.weight.is_meta:
            # T5's input embedding is tied to `shared`; SD3 files hold it once, and diffusers 0.42's single-file
            # loader under transformers 5 leaves the tied copy unloaded (on the meta device)
            t5.encoder.embed_tokens = t5.shared
    pred = info.prediction_type
    if pred is None and not base_config:
        pred = family.prediction_type  # the shipped configs say so too; SD2 always gets an answer from inspect_checkpoint
    return pipe, pred, info.zero_terminal_snr


def _denoiser_from_single_file(path: Path, family: Family, base_config: str, dtype: torch.dtype,
                               vae_dtype: torch.dtype):
    """A pipeline whose denoiser is the original-layout single file `path` (FLUX.1 as BFL ships it: the transformer
    alone) and whose VAE, text encoders, tokenizers and scheduler come from the diffusers folder `base_config`.

    The transformer is built from base_config's transformer config (its dev/schnell guidance embedding as the file
    shows) and filled by the family's converter, which reads any depth and width: diffusers'
    convert_flux_transformer_checkpoint_to_diffusers assumes FLUX.1's 3072-wide blocks."""
    import diffusers
    from accelerate import init_empty_weights

    label = family.label
    if not base_config or not (Path(base_config) / "model_index.json").is_file() \
            or not any((Path(base_config) / "vae").glob("*.safetensors")):
        raise UserError(f"{path.name} holds the {label} transformer only; its VAE, CLIP-L and T5 come from a diffusers "
                        f"{label} folder", "pass --base-config with a diffusers folder of the model (with weights), "
                                           "e.g. a download of black-forest-labs/FLUX.1-dev or -schnell")
    index = json.loads((Path(base_config) / "model_index.json").read_text())
    if families.detect_folder(index).group != family.group:
        raise UserError(f"{path.name} is an {label} checkpoint but base_config {base_config} is not an {family.group} "
                        "model", f"give --base-config a diffusers {family.group} folder")
    cls = getattr(diffusers, index[family.denoiser][1])
    config = dict(cls.load_config(base_config, subfolder=family.denoiser))
    keys, tensor, _ = _open_checkpoint(path)
    state = {k.removeprefix(ORIGINAL_UNET): tensor(k) for k in keys}
    config["guidance_embeds"] = any(k.startswith("guidance_in.") for k in state)  # dev; schnell has none
    try:
        converted = family.denoiser_from_original(state, config)
        with init_empty_weights():
            denoiser = cls.from_config(config)
        denoiser.load_state_dict(converted, strict=True, assign=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"could not load {path.name} as an {label} transformer: {first_line(e, 200)}",
                        "check that --base-config has the same architecture as the file") from None
    denoiser = denoiser.to(dtype)
    dtypes = dtype if vae_dtype == dtype else {"vae": vae_dtype, "default": dtype}
    return _pipeline_class(family).from_pretrained(base_config, **{family.denoiser: denoiser},
                                                   **_pipeline_kwargs(family, dtypes))


# --- hub ids ----------------------------------------------------------------------------------------------------

def _from_hub(repo_id: str, dtype: torch.dtype | dict):
    from diffusers import DiffusionPipeline

    # the family shows once the pipeline is loaded: every family's loading arguments go along, and a pipeline
    # ignores the ones it does not take
    kwargs = {k: v for family in families.FAMILIES.values() for k, v in _pipeline_kwargs(family, dtype).items()}
    hint = "point --base at a local .safetensors file or diffusers folder"
    # Try the local cache first so an offline machine never waits on the network.
    try:
        return DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{repo_id} is not in the local model cache and the hub is switched off (HF_HUB_OFFLINE=1)",
                        hint)
    try:  # a short, bounded look first: a machine without a route to the hub fails here in seconds, not minutes
        from huggingface_hub import model_info

        model_info(repo_id, timeout=10)
    except Exception as e:
        raise UserError(f"{repo_id} is not in the local model cache and the hub did not answer "
                        f"({type(e).__name__})", hint) from None
    try:
        return DiffusionPipeline.from_pretrained(repo_id, **kwargs)
    except Exception as e:
        raise UserError(f"could not download {repo_id}: {first_line(e, 200)}", f"check the id and the network, or {hint}") from None


def unet_resolution(unet: dict, vae: dict) -> int:
    """A UNet base's own training size from its UNet's and VAE's configs (a loaded model's, or check.base_resolution's
    read from the files): the UNet's sample size times the VAE's scale (SD1.5: 64 x 8 = 512; a 64 px model: 16 x 4)."""
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _own_resolution(pipe) -> int | None:
    """A UNet base's training size as its own configs state it (unet_resolution); None for a transformer."""
    unet = getattr(pipe, "unet", None)
    if unet is None or not isinstance(unet.config.get("sample_size"), int):
        return None
    return unet_resolution(unet.config, pipe.vae.config)


def _base(pipe, name: str, prediction_type: str | None, ztsnr: bool | None, resolution: int | None = None) -> Base:
    settings = {}
    if prediction_type and pipe.scheduler.config.get("prediction_type", "epsilon") != prediction_type:
        settings["prediction_type"] = prediction_type
    if ztsnr is not None and ztsnr != zero_terminal_snr(pipe.scheduler.config):
        settings.update(ZTSNR_SCHEDULER if ztsnr else {"rescale_betas_zero_snr": False})
    if settings:  # the scheduler config carries them to the training objective and every sampler made from it
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **settings)
    if zero_terminal_snr(pipe.scheduler.config) and pipe.scheduler.config.get("prediction_type") != "v_prediction":
        # at zero SNR the noise is the whole input: predicting it says nothing about the image (Lin et al. 2023, 3.2)
        raise UserError(f"{name}: zero_terminal_snr needs a v-prediction base, and this one predicts epsilon",
                        "set --prediction-type v_prediction, or --zero-terminal-snr off")
    family = families.detect(pipe)
    pipe.set_progress_bar_config(disable=True)
    return Base(pipe=pipe, family=family.name, name=name, resolution=resolution or family.resolution,
                prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))


ZERO_TERMINAL_SNR = ("auto", "on", "off")


def zero_terminal_snr(scheduler_config) -> bool:
    """Whether a scheduler config describes a zero-terminal-SNR schedule (diffusers' `rescale_betas_zero_snr`)."""
    return bool(scheduler_config.get("rescale_betas_zero_snr", False))


def sample_guidance_rescale(value: float, scheduler_config) -> float:
    """The guidance rescale to sample with: `value`, or for -1 (auto) 0.7 on a zero-terminal-SNR base, else 0."""
    if value >= 0:
        return value
    return ZTSNR_GUIDANCE_RESCALE if zero_terminal_snr(scheduler_config) else 0.0


def check_sampler(name: str, scheduler_config) -> None:
    """A UserError when the diffusers scheduler class `name` cannot draw from a zero-terminal-SNR base: one without
    `rescale_betas_zero_snr` would quietly sample from the schedule the base was not trained on."""
    import inspect

    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not zero_terminal_snr(scheduler_config):
        return
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        raise UserError(f"sampler {name} cannot draw from a zero-terminal-SNR base (it has no rescale_betas_zero_snr)",
                        "use EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDIMScheduler, "
                        "DPMSolverMultistepScheduler or UniPCMultistepScheduler")
