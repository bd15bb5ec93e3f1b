"""Write the shareable LoRA file (kohya/LyCORIS layout + metadata) and verify it through diffusers' own loader (LoHa
and LoKr, which diffusers does not read, through the lycoris package's formulas)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from sdlora import adapters, families
from sdlora.config import TrainConfig
from sdlora.adapters.lora import ADAPTER, DORA_SUFFIX, KOHYA_SUFFIXES, LORA, PEFT_SUFFIXES
from sdlora.info import Adapter, base_modules, fit
from sdlora.lora import check_lora_fits, read_lora, usual_mode
from sdlora.models import Base, load_base
from sdlora.patch import Patches
from sdlora.quantize import unstored

VERIFY_ADAPTER = "sdlora_verify"


def kohya_metadata(config: TrainConfig, *, family: str, resolution: int, step: int, epochs: float, num_images: int,
                   tag_frequency: dict, started_at: float, title: str, precision: str,
                   prediction_type: str | None = None, zero_terminal_snr: bool = False, clip_skip: int = 0,
                   reg_dirs: dict | None = None) -> dict[str, str]:
    """The `ss_*` fields kohya's tools write and the `modelspec.*` fields of SAI's model spec; all strings.

    `epochs`: the passes over the dataset so far (0.1 for a run stopped early); kohya's `ss_epoch` counts the epoch
    under way (1 there), sdlora's `sdlora_epochs` keeps the fraction. `precision`: the mixed precision that ran
    (accelerate's "no", "fp16" or "bf16"), not the setting "auto".

    `prediction_type` is the base's (an SDXL v-prediction model says so here); by default the family's.
    `zero_terminal_snr`: the base's schedule was rescaled to zero terminal SNR. `clip_skip`: the text-encoder layer
    trained on (1 = last); 0 = the family's own.

    `reg_dirs`: the regularisation pictures' folders, `sdlora.dataset.dataset_dirs`; kohya's `ss_num_reg_images`
    counts them with their repeats, as kohya does.
    """
    fam = families.get(family)
    pred = prediction_type or fam.prediction_type
    family_fields = fam.lora_metadata()
    now = time.time()
    meta = {
        **adapters.for_config(config).metadata(rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout,
                                                conv_rank=config.conv_rank, conv_alpha=config.conv_alpha,
                                                rslora=config.use_rslora),
        "ss_base_model_version": family_fields["ss_base_model_version"],
        "ss_v2": family_fields["ss_v2"],
        "ss_sd_model_name": Path(config.base).name if config.base != "tiny" else "sdlora-tiny",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_images),
        "ss_steps": str(step),
        "ss_epoch": str(max(1, math.ceil(epochs))),
        "sdlora_epochs": f"{round(epochs, 2):g}",
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_learning_rate": str(config.unet_lr),
        "ss_unet_lr": str(config.unet_lr),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": _optimizer_name(config),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        # kohya's train_network.py writes ss_zero_terminal_snr and ss_clip_skip; ss_v_parameterization is its
        # argument's name, which metadata readers (LoRA viewers, model managers) look for beside
        # modelspec.prediction_type. No loader configures itself from a LoRA's metadata: these say how to use it.
        "ss_v_parameterization": str(pred == "v_prediction"),
        "ss_zero_terminal_snr": str(zero_terminal_snr),
        "ss_clip_skip": str(clip_skip or fam.clip_skip),
        "ss_noise_offset": str(config.noise_offset),
        "ss_debiased_estimation": str(config.debiased_estimation),
        "ss_min_timestep": str(config.timestep_min),
        "ss_max_timestep": str(config.timestep_max),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tags),
        "ss_flip_aug": str(config.flip),
        # kohya's train_network.py writes no masked-loss field; ss_masked_loss is the one metadata viewers show
        "ss_masked_loss": str(config.masked_loss),
        "sdlora_alpha_mask": str(config.alpha_mask),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_num_reg_images": str(sum(d["n_repeats"] * d["img_count"] for d in (reg_dirs or {}).values())),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs or {}),
        "sdlora_reg_ratio": str(config.reg_ratio if reg_dirs else 0),
        "ss_mixed_precision": precision,
        "ss_seed": str(config.seed),
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now),
        "ss_training_comment": config.description,
        "sdlora_targets": config.targets,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family_fields["modelspec.architecture"],
        "modelspec.implementation": family_fields["modelspec.implementation"],
        "modelspec.title": title,
        "modelspec.description": config.description,
        "modelspec.trigger_phrase": config.trigger,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
    }
    if fam.peft_names:  # the file's lora_B holds alpha / rank (sdlora.families.naming.peft_layout)
        meta["sdlora_alpha_in_weights"] = "True"
    return meta


# The optimizer's class as kohya's ss_optimizer names it (module path, then the arguments set), so tools that read
# kohya's metadata show it
_OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                      "prodigy": "prodigyopt.prodigy.Prodigy",
                      "adamw-schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
                      "adafactor": "transformers.optimization.Adafactor"}


def _optimizer_name(config: TrainConfig) -> str:
    args = {"prodigy": f"d_coef={config.prodigy_d_coef},safeguard_warmup={config.prodigy_safeguard_warmup}",
            "adafactor": "relative_step=False,scale_parameter=False,warmup_init=False"}.get(config.optimizer)
    return _OPTIMIZER_CLASSES[config.optimizer] + (f"({args})" if args else "")


def write_diffusers_layout(path: str | Path, unet, text_encoders: list, config: TrainConfig,
                           family: str | None = None) -> None:
    """The same adapter in the diffusers/peft layout, with the LoRA config so diffusers keeps the alpha.

    `text_encoders` are the adapted text encoders in pipeline order (none, or all of the family's). `family`: the
    base's; by default the one the UNet's config shows.
    """
    import diffusers

    fam = families.get(family) if family else families.detect_denoiser(unet.config)

    def layers(model):  # peft's own layout: `...to_q.lora_A.weight`, without the adapter name
        return {n.replace(f".{ADAPTER}.", "."): p.detach().float().cpu().contiguous()
                for n, p in model.named_parameters() if "lora_" in n}

    def meta(targets, conv_targets=(), exclude=""):  # peft's LoraConfig fields, as diffusers reads them back
        return {"r": config.rank, "lora_alpha": config.alpha, "target_modules": [*targets, *conv_targets],
                "rank_pattern": {t: config.conv_rank for t in conv_targets},
                "alpha_pattern": {t: config.conv_alpha for t in conv_targets},
                "use_dora": adapters.for_config(config).dora, "use_rslora": config.use_rslora,
                **({"exclude_modules": exclude} if exclude else {})}

    from sdlora.step import unet_adapter_targets

    path = Path(path)
    kw = {f"{fam.denoiser}_lora_layers": layers(unet),  # SD3.5: transformer_lora_layers
          f"{fam.denoiser}_lora_adapter_metadata": meta(*unet_adapter_targets(fam, config), fam.unet_exclude)}
    for name, te in zip(fam.text_encoders.values(), text_encoders):
        kw[f"{name}_lora_layers"] = layers(te)
        kw[f"{name}_lora_adapter_metadata"] = meta(fam.text_targets[config.targets])
    getattr(diffusers, fam.pipeline).save_lora_weights(str(path.parent), weight_name=path.name, **kw)
    usual_mode(path)


@torch.no_grad()
def verify(path: str | Path, base_spec: str, *, base_config: str = "", prediction_type: str = "auto",
           zero_terminal_snr: str = "auto", base: Base | None = None) -> dict:
    """Reload `path` through diffusers' `load_lora_weights` into a fresh copy of the base and check that every key
    landed (same weights, same alpha/rank scale) and that strength 0 gives back the base model's output exactly.

    A file made for another model family is refused with a UserError naming both. `base`: a fresh copy of the base
    already loaded from `base_spec` (it gets the adapter added), instead of loading one here.
    """
    state, metadata = read_lora(path)
    if base is None:
        base = load_base(base_spec, base_config=base_config, prediction_type=prediction_type,
                         zero_terminal_snr=zero_terminal_snr)
    check_lora_fits(Path(path).name, state, metadata, base)
    pipe, fam = base.pipe, base.fam
    denoiser = fam.denoiser_of(pipe)
    gen = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=gen)  # FLUX packs them in `predict`
    t = torch.tensor([500.0])

    time_ids = fam.time_ids((64, 64), (0, 0), (64, 64))  # a 64 x 64 image, uncropped (None: not conditioned on)
    time_ids = None if time_ids is None else time_ids[None]

    def forward():  # the pipelines' own prompt encoding, so the text-encoder LoRA counts too
        hidden, pooled = fam.encode_prompt(pipe, "a photo", "cpu")
        return fam.predict(denoiser, latents, t, hidden, pooled, time_ids)

    before = forward()
    kind, found = adapters.read_any(state, metadata) or (LORA, None)
    if kind is not LORA:
        return _verify_patched(path, state, Adapter(found["modules"], metadata, found["layout"], found["stray"], kind),
                               base, forward, before)
    pipe.load_lora_weights(str(path), adapter_name=VERIFY_ADAPTER)
    loaded = {fam.kohya_unet_name(p, denoiser.config): m for p, m in LORA.layers(denoiser, VERIFY_ADAPTER).items()}
    for prefix, te in base.text_encoders().items():
        loaded.update({fam.kohya_text_encoder_name(prefix, p): m
                       for p, m in LORA.layers(te, VERIFY_ADAPTER).items()})
    # the file's modules as sdlora reads them (kohya layout, or SD3.5's peft layout with alpha folded: alpha = rank)
    modules = (LORA.read(state, metadata) or {}).get("modules", {})
    consumed = 0
    for name, (down, up, alpha, *_) in modules.items():
        layer = loaded.get(name)
        if layer is None:
            continue
        same = (torch.equal(layer.lora_A[VERIFY_ADAPTER].weight.float(), down.float())
                and torch.equal(layer.lora_B[VERIFY_ADAPTER].weight.float(), up.float())
                and abs(layer.scaling[VERIFY_ADAPTER] - alpha / down.shape[0]) < 1e-6)
        if same:  # all of this module's keys landed: its down, its up and (when written) its alpha
            consumed += sum(f"{name}{s}" in state for s in (*KOHYA_SUFFIXES, *PEFT_SUFFIXES))
    # diffusers 0.42 drops `dora_scale` from kohya/LyCORIS files ("a DoRA checkpoint that is not compatible in
    # Diffusers", lora_conversion_utils.py) and loads the rest as a plain LoRA: the magnitudes are checked by
    # check_file instead, and said to be unread here.
    dora_keys = sum(k.endswith(DORA_SUFFIX) for k in state)
    pipe.set_adapters([VERIFY_ADAPTER], adapter_weights=[0.0])
    strength0 = (forward() - before).abs().max().item()
    pipe.set_adapters([VERIFY_ADAPTER], adapter_weights=[1.0])
    strength1 = (forward() - before).abs().mean().item()
    ok = consumed == len(state) - dora_keys and (strength0 == 0.0)
    result = {"path": str(path), "keys_written": len(state), "keys_consumed": consumed,
              "strength0_max_diff": strength0, "strength1_mean_diff": strength1, "ok": ok}
    if dora_keys:
        result["note"] = (f"diffusers {diffusers_version()} does not read DoRA's dora_scale ({dora_keys} keys): it loads "
                          "the file as a plain LoRA; ComfyUI, Forge and LyCORIS read the magnitudes")
    return result


def _verify_patched(path, state: dict, adapter: Adapter, base: Base, forward, before: torch.Tensor) -> dict:
    """verify() for a LoHa/LoKr file: every module mapped onto a layer of the base, its change (the lycoris
    package's diff_weight, sdlora.adapters.lycoris) put into the weights at strength 0 and 1, as ComfyUI applies it."""
    table = base_modules(base.pipe, base.family)
    mapped = set(fit(adapter, table)["mapped"])
    consumed = sum(k.rsplit(".", 1)[0] in mapped for k in state)
    patches = Patches(table)
    try:
        patches.apply([(adapter, 0.0)])
        strength0 = (forward() - before).abs().max().item()
        patches.apply([(adapter, 1.0)])
        strength1 = (forward() - before).abs().mean().item()
    finally:
        patches.restore()
    return {"path": str(path), "keys_written": len(state), "keys_consumed": consumed,
            "strength0_max_diff": strength0, "strength1_mean_diff": strength1,
            "ok": consumed == len(state) and not adapter.stray and strength0 == 0.0,
            "note": f"diffusers {diffusers_version()} does not read LyCORIS {adapter.kind.name} files: read by the "
                    "lycoris package's formulas into the base's weights, as ComfyUI and Forge apply them"}


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


@torch.no_grad()
def check_file(path: str | Path, trained: dict[str, torch.nn.Module], adapter, atol: float = 1e-5) -> dict:
    """Read `path` back with the adapter type's own reader and check, module by module, that the weight change it
    gives (`adapter.delta`, in fp32) changes each layer's output as the trained layer does at strength 1, and that
    strength 0 changes nothing. `trained`: kohya name -> the trained peft layer (sdlora.lora.kohya_modules).
    Returns {"modules": n, "max_diff": largest difference seen, "ok"}."""
    state, metadata = read_lora(path)
    found = adapter.read(state, metadata)
    modules = found["modules"] if found else {}
    worst, ok = 0.0, set(modules) == set(trained) and not (found or {}).get("stray")
    gen = torch.Generator("cpu").manual_seed(0)
    for name, layer in trained.items():
        if name not in modules or layer.get_base_layer().weight.dtype not in (torch.float32, torch.float16,
                                                                              torch.bfloat16):
            continue  # a quantized base (sdlora.quantize) has no plain weight to add a change to
        # an fp32 copy on the CPU: the comparison then shows the file's rounding, not the compute dtype's. An fp8
        # base (sdlora.quantize) upcasts its weight to the compute dtype at each use: the copy keeps that weight as
        # a plain one, which .float() can then cast.
        layer = unstored(copy.deepcopy(layer)).float().cpu()
        base_layer = layer.get_base_layer()
        weight = base_layer.weight.detach().float().cpu()
        delta = adapter.delta(modules[name], 1.0, base_weight=weight).reshape(weight.shape)
        zero = adapter.delta(modules[name], 0.0, base_weight=weight)
        conv = isinstance(base_layer, torch.nn.Conv2d)
        x = torch.randn((2, weight.shape[1], 6, 6) if conv else (4, weight.shape[1]), generator=gen)
        wanted = (layer(x) - base_layer(x)).float().cpu()
        apply = (lambda w: torch.nn.functional.conv2d(x, w, stride=base_layer.stride, padding=base_layer.padding)) \
            if conv else (lambda w: x @ w.T)
        diff = (apply(delta) - wanted).abs().max().item()
        worst = max(worst, diff)
        ok = ok and diff <= atol * max(1.0, wanted.abs().max().item()) and zero.abs().max().item() == 0.0
    return {"modules": len(modules), "max_diff": worst, "ok": bool(ok)}
