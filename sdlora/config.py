"""TrainConfig: every knob of a training run, its default and why, presets, validation and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import examples
from sdlora.errors import UserError


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adamw-schedulefree", "adafactor")
# What an optimizer wants unless told otherwise (build_config): Prodigy scales a learning rate of about 1 by the step
# size it estimates; schedule-free AdamW averages its weights instead of following a schedule.
OPTIMIZER_DEFAULTS = {"prodigy": {"unet_lr": 1.0, "text_encoder_lr": 1.0},
                      "adamw-schedulefree": {"lr_scheduler": "constant"}}

# How images are drawn unless told otherwise: a run's samples, `sdlora generate` and the app's previews.
SAMPLE_STEPS, SAMPLE_GUIDANCE, SAMPLE_SCHEDULER = 25, 7.0, "EulerDiscreteScheduler"


def _knob(default, help: str, choices: tuple | None = None, **kw):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """One training run, completely. The CLI, the app and the tests build one and call `sdlora.train.train`."""

    # What to train on
    dataset: str = _knob("", "folder or .zip of images with same-name .txt captions (or a metadata.jsonl), or "
                              "example:character / example:style")
    base: str = _knob("tiny", "base model: 'tiny' (embedded), a diffusers folder, a .safetensors checkpoint or a hub id")
    preset: str = _knob("", "the preset these settings started from (--preset sets it); a run warns when the preset "
                            "was made for another model family")
    base_config: str = _knob("", "for a single-file base: a diffusers folder (or cached hub id) of the same architecture to take "
                                 "configs and tokenizers from; empty = the ones shipped for the family the file shows")
    prediction_type: str = _knob("auto", "what the base predicts; auto = its scheduler config, or for a single file what "
                                         "the file shows (SD2 768 models: v_prediction)",
                                 choices=("auto", "epsilon", "v_prediction"))
    zero_terminal_snr: str = _knob("auto", "noise schedule rescaled so its last timestep is pure noise (Lin et al. "
                                           "2023; NoobAI-XL v-pred and other ZTSNR bases; needs v_prediction): auto = "
                                           "as the base says (a single file's ztsnr key, a folder's scheduler config)",
                                   choices=("auto", "on", "off"))
    clip_skip: int = _knob(0, "text-encoder layer to condition on, counted from the end as AUTOMATIC1111 and kohya "
                              "count it: 1 = last, 2 = penultimate (NovelAI-lineage SD1 anime models); 0 = the base's "
                              "own (SD1/SD2 1; SDXL always 2, both encoders' penultimate, which is why kohya ignores it "
                              "there)")
    trigger: str = _knob("", "trigger word put first in every caption (added where a caption lacks it)")
    caption_template: str = _knob("a picture", "caption for images without a .txt file (after the trigger)")
    shuffle_tags: bool = _knob(False, "shuffle comma-separated tags each step (tag captions only; never sentences)")
    keep_tags: int = _knob(1, "tags kept in place at the front when shuffling (1 keeps the trigger first)")
    caption_dropout: float = _knob(0.0, "chance of training a step with an empty caption; 0.05-0.1 helps styles")
    resolution: int = _knob(0, "training resolution in pixels; 0 = the base model's own (tiny 64, SD1 512, SDXL, "
                                 "SD3.5 and FLUX.1 1024)")
    random_crop: bool = _knob(False, "random instead of centre crops (turns off the latent cache)")
    flip: bool = _knob(False, "random horizontal flips; only for subjects without a handed side (text, asymmetry)")
    masked_loss: bool = _knob(False, "weight each picture's loss by its mask, NAME_mask.png beside NAME.png (white = "
                                     "learn, black = ignore, grey between); pictures without one train whole")
    alpha_mask: bool = _knob(False, "with masked_loss: a picture's transparency is its mask where it has no mask file")
    reg_data: str = _knob("", "regularisation pictures: a folder or .zip (in the app also a dataset's name) of class "
                              "pictures with captions, repeat folders as in the dataset, trained beside it so the class "
                              "keeps its look; empty = none")
    reg_ratio: float = _knob(0.5, "share of each epoch's pictures drawn from reg_data (0.5 = as many as the dataset's "
                                  "with repeats, kohya's way)")
    prior_loss_weight: float = _knob(1.0, "loss weight of the reg_data pictures (kohya's prior_loss_weight)")

    # The adapter
    adapter: str = _knob("lora", "adapter type: lora (the usual: characters, concepts); locon also adapts the UNet's "
                                 "ResNet convolutions (textures and styles); loha (LyCORIS LoHa) reaches rank^2 with "
                                 "the weights of rank 2*rank (styles, many concepts in a small file); lokr (LyCORIS "
                                 "LoKr) a Kronecker product, the smallest files (style, quick tests); dora learns each "
                                 "output channel's magnitude apart (fidelity at low rank)",
                         choices=("lora", "locon", "loha", "lokr", "dora"))
    rank: int = _knob(16, "LoRA rank (dim): capacity of the adapter")
    alpha: float = _knob(8.0, "LoRA alpha; the update is scaled by alpha/rank, so LR and alpha travel together")
    lora_dropout: float = _knob(0.0, "dropout inside the LoRA layers (lora, locon, dora; LyCORIS has none for loha/lokr)")
    conv_rank: int = _knob(8, "locon, loha, lokr (and dora with dora_conv): rank of the ResNet 3x3 convolutions "
                              "(kohya's and LyCORIS's conv_dim)")
    conv_alpha: float = _knob(4.0, "locon, loha, lokr (and dora with dora_conv): alpha of the ResNet 3x3 convolutions "
                                   "(conv_alpha)")
    dora_conv: bool = _knob(False, "dora: also the UNet's ResNet convolutions, as locon (DoRA on LoCon)")
    lokr_factor: int = _knob(-1, "lokr: size of the Kronecker product's small factor (LyCORIS's factor; -1 = as "
                                 "LyCORIS picks, near the square root of each dimension)")
    lokr_full_matrix: bool = _knob(False, "lokr: train both factors as full matrices, no rank (LyCORIS's full_matrix)")
    use_rslora: bool = _knob(False, "scale updates by alpha/sqrt(rank) instead of alpha/rank (rsLoRA): high ranks "
                                    "keep learning at the same learning rate")
    targets: str = _knob("attn", "layers to adapt: attention only, or attention + MLP (kohya's default)",
                         choices=("attn", "attn-mlp"))
    train_text_encoder: bool = _knob(True, "also train a LoRA on the text encoder(s)")

    # Optimisation
    steps: int = _knob(600, "optimizer steps in total")
    batch_size: int = _knob(4, "images per step (per GPU)")
    grad_accum: int = _knob(1, "gradient accumulation: steps of batch_size images per optimizer step")
    unet_lr: float = _knob(5e-4, "UNet learning rate (at alpha/rank = 0.5)")
    text_encoder_lr: float = _knob(1e-4, "text-encoder learning rate; 1/2 to 1/5 of the UNet's")
    optimizer: str = _knob("adamw", "adamw; adamw8bit (needs bitsandbytes); prodigy (finds its own step size, lr 1); "
                                    "adamw-schedulefree (needs no schedule); adafactor", choices=OPTIMIZERS)
    weight_decay: float = _knob(1e-2, "weight decay (decoupled, as AdamW's)")
    prodigy_d_coef: float = _knob(1.0, "Prodigy: scales the step size it finds (below 1 if the LoRA overcooks)")
    prodigy_safeguard_warmup: bool = _knob(True, "Prodigy: keep its step-size estimate from growing during warmup")
    lr_scheduler: str = _knob("cosine", "learning-rate schedule after warmup",
                              choices=("constant", "cosine", "cosine_with_restarts", "linear"))
    lr_cycles: int = _knob(1, "restarts for cosine_with_restarts")
    warmup_fraction: float = _knob(0.05, "fraction of the steps spent warming the learning rate up")
    min_snr_gamma: float = _knob(5.0, "min-SNR loss weighting (Hang et al. 2023); 0 turns it off")
    noise_offset: float = _knob(0.0, "noise offset; helps very dark/bright images (0.05 SD1, 0.0357 SDXL)")
    debiased_estimation: bool = _knob(False, "weight each step's loss by 1/sqrt(SNR) (Yu et al. 2024): less weight on "
                                             "the nearly clean timesteps; combines with min-SNR")
    timestep_min: int = _knob(0, "train on noise levels from this timestep (0-999)")
    timestep_max: int = _knob(1000, "... up to, not including, this one (1-1000); e.g. 500-1000 for composition only")
    # flow matching (SD3.5): diffusers' train_dreambooth_lora_sd3.py's weighting_scheme, split into its two parts
    flow_timestep_sampling: str = _knob("logit_normal", "flow matching (SD3.5): how noise levels are drawn; "
                                        "logit_normal (SD3's), mode or uniform",
                                        choices=("logit_normal", "mode", "uniform"))
    flow_logit_mean: float = _knob(0.0, "flow matching: logit_normal's mean")
    flow_logit_std: float = _knob(1.0, "flow matching: logit_normal's standard deviation")
    flow_mode_scale: float = _knob(1.29, "flow matching: mode sampling's scale (SD3 paper, section 3.1)")
    flow_loss_weighting: str = _knob("none", "flow matching: each image's loss weight by its noise level; none, "
                                             "sigma_sqrt (1/sigma^2) or cosmap", choices=("none", "sigma_sqrt", "cosmap"))
    train_guidance: float = _knob(1.0, "FLUX.1 dev: the guidance its transformer is told while training (diffusers' "
                                       "README_flux.md recipes: 1.0); samples use --sample-guidance")
    mixed_precision: str = _knob("auto", "auto = bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU",
                                 choices=("auto", "no", "fp16", "bf16"))
    base_precision: str = _knob("auto", "how the frozen base (UNet, text encoders) is stored while the LoRA trains in "
                                        "fp32: auto = unquantized, or fp8 where auto_memory finds the GPU short; fp8 = float8 (torch); "
                                        "int8, nf4 = bitsandbytes 8-bit / 4-bit layers; fp8 and nf4 turn "
                                        "gradient_checkpointing on (docs/tools.md)",
                                choices=("auto", "fp8", "int8", "nf4"))
    gradient_checkpointing: bool = _knob(False, "trade compute for memory")
    auto_memory: bool = _knob(True, "on a GPU, pick batch_size, gradient_checkpointing and base_precision left at their "
                                    "defaults from the model family and the free GPU memory (the run says what it picked)")
    cache_latents: bool = _knob(True, "encode every image once instead of every step")
    cuda_graphs: bool = _knob(True, "on a GPU, replay the training step as CUDA graphs (one per bucket shape): much faster, "
                                    "most of all at small batches; turn off to debug")
    seed: int = _knob(0, "seed for data order, noise and samples: the same seed gives the same run")

    # What the run leaves behind
    sample_every: int = _knob(0, "make sample images every N steps (0 = 4 times per run); always at step 0 and the end")
    sample_prompts: list = _knob([], "prompts for samples (default: the first two captions of the dataset)")
    sample_negative: str = _knob("", "negative prompt for samples")
    sample_seed: int = _knob(0, "seed for the first sample prompt; the next prompts use seed+1, seed+2...")
    sample_steps: int = _knob(SAMPLE_STEPS, "inference steps for samples")
    sample_guidance: float = _knob(SAMPLE_GUIDANCE, "classifier-free guidance for samples")
    sample_guidance_rescale: float = _knob(-1.0, "guidance rescale for samples (Lin et al. 2023, against the "
                                                 "overexposure strong guidance gives a zero-terminal-SNR base); "
                                                 "-1 = auto: 0.7 on a zero-terminal-SNR base, else 0")
    sample_scheduler: str = _knob(SAMPLE_SCHEDULER, "diffusers scheduler class used for samples")
    save_every: int = _knob(0, "save the adapter every N steps (0 = 4 times per run)")
    ema_decay: float = _knob(0.0, "keep an exponential moving average of the adapter weights with this decay (e.g. "
                                  "0.999; 0 = off): each save gets a *-ema.safetensors beside it")
    ema_start: int = _knob(0, "EMA: average from this step on (before it the average follows the weights)")
    ema_every: int = _knob(1, "EMA: update the average every N steps")
    ema_samples: bool = _knob(False, "EMA: draw the samples with the averaged weights")
    log_with: str = _knob("", "also log loss, learning rate and samples to tensorboard or wandb (through accelerate; "
                              "pip install tensorboard / wandb); events.jsonl is written either way",
                          choices=("", "tensorboard", "wandb"))
    keep_checkpoints: int = _knob(2, "resumable checkpoints kept (older ones are deleted)")
    evaluate: bool = _knob(True, "at every save, measure what the LoRA learned and how much it changes prompts without "
                                 "the trigger; at the end, say which save and strength to use")
    eval_holdout: int = _knob(-1, "pictures kept out of training to measure learning on (-1 = a few when the dataset "
                                  "has 30 or more, else none: training pictures are measured instead)")
    export_diffusers: bool = _knob(False, "also write the adapter in the diffusers/peft layout")
    title: str = _knob("", "title written into the file's metadata (default: the run's name)")
    description: str = _knob("", "description written into the file's metadata")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown setting(s): {', '.join(unknown)}", "check the spelling against `sdlora train --help`")
        return cls(**{name: _typed(name, value) for name, value in values.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}", "give the path of a config.json") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}", "fix the file or write it again") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} does not hold settings", 'write one JSON object, e.g. {"steps": 600}')
        return cls.from_dict(values)

    def validate(self) -> None:
        """Check every value once, before anything loads; raise UserError naming the setting."""
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise UserError(f"{name} = {getattr(self, name)!r}: {what}", f"fix --{name.replace('_', '-')}")

        need(bool(self.dataset), "dataset", "give a folder or .zip of images")
        need(self.preset in ("", *PRESETS), "preset", f"use one of {', '.join(PRESETS)}, or none")
        need(self.rank >= 1, "rank", "must be at least 1")
        need(self.alpha > 0, "alpha", "must be positive")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(self.conv_rank >= 1, "conv_rank", "must be at least 1")
        need(self.conv_alpha > 0, "conv_alpha", "must be positive")
        need(self.lora_dropout == 0 or self.adapter not in ("loha", "lokr"), "lora_dropout",
             f"{self.adapter} takes no dropout (LyCORIS has none for it); set 0")
        need(not self.export_diffusers or self.adapter not in ("loha", "lokr"), "export_diffusers",
             f"diffusers' layout has no {self.adapter}; the LyCORIS file is what ComfyUI, Forge and InvokeAI load")
        need(self.base_precision == "auto" or self.adapter not in ("loha", "lokr"), "base_precision",
             f"{self.adapter} needs the base's plain weights (peft's LoHa/LoKr layers read the weight's shape); use auto")
        need(self.lokr_factor == -1 or self.lokr_factor >= 1, "lokr_factor", "must be -1 (automatic) or at least 1")
        need(not self.dora_conv or self.adapter == "dora", "dora_conv", "applies to --adapter dora only")
        need(self.adapter == "lokr" or (self.lokr_factor == -1 and not self.lokr_full_matrix),
             "lokr_factor" if self.lokr_factor != -1 else "lokr_full_matrix", "applies to --adapter lokr only")
        need(self.steps >= 1, "steps", "must be at least 1")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.grad_accum >= 1, "grad_accum", "must be at least 1")
        need(self.unet_lr > 0, "unet_lr", "must be positive")
        need(self.text_encoder_lr >= 0, "text_encoder_lr", "must be 0 or more")
        need(0 <= self.caption_dropout <= 1, "caption_dropout", "must be in [0, 1]")
        need(self.keep_tags >= 0, "keep_tags", "must be 0 or more")
        need(0 <= self.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)")
        need(self.min_snr_gamma >= 0, "min_snr_gamma", "must be 0 (off) or more")
        need(self.flow_logit_std > 0, "flow_logit_std", "must be positive")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be 0 (off) to below 1, e.g. 0.999")
        need(self.ema_every >= 1, "ema_every", "must be at least 1")
        need(self.ema_start >= 0, "ema_start", "must be 0 or more")
        need(0 <= self.timestep_min <= 999, "timestep_min", "must be 0 to 999")
        need(self.timestep_min < self.timestep_max <= 1000, "timestep_max", "must be above timestep_min, at most 1000")
        need(self.resolution == 0 or self.resolution >= 64, "resolution", "must be 0 (model default) or at least 64")
        need(not self.alpha_mask or self.masked_loss, "alpha_mask", "gives masks to masked_loss: turn masked_loss on too")
        need(0 < self.reg_ratio < 1, "reg_ratio", "must be above 0 and below 1, e.g. 0.5")
        need(self.prior_loss_weight >= 0, "prior_loss_weight", "must be 0 or more")
        if self.reg_data:
            reg = Path(examples.resolve(self.reg_data))
            need(reg.exists(), "reg_data", "no such folder or .zip")
            need(not self.dataset or reg.resolve() != Path(examples.resolve(self.dataset)).resolve(), "reg_data",
                 "is the dataset itself: give a folder of other pictures of the same class")
        need(self.sample_every >= 0 and self.save_every >= 0, "sample_every", "must be 0 or more")
        need(self.sample_steps >= 1, "sample_steps", "must be at least 1")
        need(self.train_guidance >= 0, "train_guidance", "must be 0 or more (FLUX.1 dev trains at 1.0)")
        need(self.sample_guidance_rescale == -1 or 0 <= self.sample_guidance_rescale <= 1, "sample_guidance_rescale",
             "must be 0 to 1, or -1 (auto)")
        need(0 <= self.clip_skip <= 12, "clip_skip", "must be 0 (the base's own) or 1 to 12 (1 = the last layer)")
        need(self.zero_terminal_snr != "on" or self.prediction_type != "epsilon", "zero_terminal_snr",
             "needs v-prediction (at zero SNR the noise is the whole input): set prediction_type v_prediction or auto")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        need(self.eval_holdout >= -1, "eval_holdout", "must be -1 (automatic), 0 or more")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                need(False, f.name, f"must be one of {', '.join(choices)}")
        import diffusers

        if not self.sample_scheduler.endswith("Scheduler") or not hasattr(diffusers, self.sample_scheduler):
            need(False, "sample_scheduler", "not a diffusers scheduler class (e.g. EulerDiscreteScheduler)")
        if self.zero_terminal_snr == "on":  # with auto, the loaded base tells (sdlora.models.check_sampler)
            from sdlora.models import check_sampler

            check_sampler(self.sample_scheduler, {"rescale_betas_zero_snr": True})
        if self.base_precision != "auto":  # a mode this machine cannot run (no bitsandbytes, no CPU kernel) stops here
            import torch

            from sdlora.quantize import check_precision

            check_precision(self.base_precision, cuda=torch.cuda.is_available())
            if self.base_precision == "int8" and self.gradient_checkpointing and torch.cuda.is_available():
                raise UserError("base_precision int8 does not train with gradient_checkpointing on a GPU (bitsandbytes' "
                                "int8 layers break torch.utils.checkpoint)",
                                "use --base-precision nf4 or fp8, or turn gradient_checkpointing off")
        if self.log_with:
            try:
                __import__(self.log_with)
            except ImportError:
                raise UserError(f"log_with {self.log_with} needs the {self.log_with} package",
                                f"pip install {self.log_with}, or leave --log-with out") from None
        if self.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UserError("optimizer adamw8bit needs bitsandbytes", "pip install bitsandbytes, or use --optimizer adamw") from None


def optimizer_warnings(config: TrainConfig) -> list[str]:
    """Settings that fight the chosen optimizer, each said in a line (the run's warnings, the app's plan)."""
    out = []
    if config.optimizer == "prodigy" and min(config.unet_lr, config.text_encoder_lr or 1.0) < 0.1:
        out.append(f"Prodigy finds its own step size and expects learning rates near 1: with unet_lr {config.unet_lr:g} "
                   f"and text_encoder_lr {config.text_encoder_lr:g} it learns almost nothing (set both to 1)")
    if config.optimizer == "adamw-schedulefree" and config.lr_scheduler != "constant":
        out.append(f"schedule-free AdamW averages its weights instead of following a schedule: lr_scheduler "
                   f"{config.lr_scheduler} works against it (use constant; its warmup is warmup_fraction)")
    return out


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list"}


def _typed(name: str, value):
    """`value` as the type of setting `name`'s default (an int where a float is wanted becomes a float); a value of
    another type (`"steps": "ten"` in a config file) is a UserError naming the setting."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():  # JSON writes 600 as 600.0 at times
        return int(value)
    if isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)):
        return value
    raise UserError(f"setting {name} = {value!r}: must be {_KINDS.get(kind, kind.__name__)}",
                    f"fix {name} in the config file")


# Presets are plain field values applied over the defaults (see docs in README). Numbers from field practice:
# hollowstrawberry's SD1.5 recipe (dim 16 / alpha 8, UNet 5e-4, TE 1e-4), "TE can be 0 for a style".
#
# The SDXL anime presets are for bases trained on booru tags (Illustrious, NoobAI-XL, Pony Diffusion V6 XL): tag
# captions shuffled behind the trigger, at 1024, SDXL's fixed CLIP skip 2 (what these bases' cards ask for), no noise
# offset (a v-prediction zero-terminal-SNR base needs none: its schedule already reaches pure noise, Lin et al. 2023)
# and the UNet only, as OneTrainer's and kohya_ss's SDXL presets train it.
_ANIME_TAGS = {"resolution": 1024, "shuffle_tags": True, "keep_tags": 1, "clip_skip": 2, "noise_offset": 0.0,
               "targets": "attn-mlp", "train_text_encoder": False, "rank": 16, "alpha": 8.0}
PRESETS: dict[str, dict] = {
    "quick": {"steps": 100, "sample_every": 50, "save_every": 50},
    "character": {"targets": "attn-mlp", "train_text_encoder": True, "rank": 16, "alpha": 8.0},
    "style": {"targets": "attn-mlp", "train_text_encoder": False, "caption_dropout": 0.05, "rank": 16, "alpha": 8.0},
    "sdxl-anime-tags": _ANIME_TAGS,
    "sdxl-anime-vpred": {**_ANIME_TAGS, "prediction_type": "v_prediction", "zero_terminal_snr": "on"},
    # Pony-style bases: the same tag captions; a style learns from every picture, so some steps drop the caption
    "sdxl-pony-style": {**_ANIME_TAGS, "caption_dropout": 0.05},
    # SD3.5 (flow matching): diffusers' train_dreambooth_lora_sd3.py trains the joint attention (image and text
    # streams) at 1e-4 with logit-normal noise levels (the default flow_timestep_sampling) and no loss weighting
    "sd3.5-style": {"resolution": 1024, "targets": "attn", "train_text_encoder": False, "rank": 16, "alpha": 8.0,
                    "unet_lr": 1e-4, "caption_dropout": 0.05},
    # FLUX.1: diffusers' README_flux.md recipes train the attention at 1e-4 (the transformer told guidance 1);
    # samples as the pipelines draw them: dev with its distilled guidance 3.5 in 28 steps, schnell in 4 without
    "flux-style": {"resolution": 1024, "targets": "attn", "train_text_encoder": False, "rank": 16, "alpha": 16.0,
                   "unet_lr": 1e-4, "caption_dropout": 0.05, "sample_guidance": 3.5, "sample_steps": 28},
    "flux-schnell-style": {"resolution": 1024, "targets": "attn", "train_text_encoder": False, "rank": 16,
                           "alpha": 16.0, "unet_lr": 1e-4, "caption_dropout": 0.05, "sample_guidance": 0.0,
                           "sample_steps": 4},
}
# The families a preset's values are made for (family labels); a preset not named here suits every family.
PRESET_FAMILIES: dict[str, tuple[str, ...]] = {
    "sdxl-anime-tags": ("SDXL",), "sdxl-anime-vpred": ("SDXL",), "sdxl-pony-style": ("SDXL",),
    "sd3.5-style": ("SD3.5 Medium", "SD3.5 Large"), "flux-style": ("FLUX.1 dev",),
    "flux-schnell-style": ("FLUX.1 schnell",),
}
# The preset the app picks when a base of these families is chosen: flow-matching bases want their own learning rate,
# layers and sampling, which the presets for every family do not set.
FAMILY_PRESET: dict[str, str] = {"SD3.5 Medium": "sd3.5-style", "SD3.5 Large": "sd3.5-style",
                                 "FLUX.1 dev": "flux-style", "FLUX.1 schnell": "flux-schnell-style"}
# One line each, for `sdlora train --help`, the app and the README.
PRESET_HELP: dict[str, str] = {
    "quick": "100 steps to see the whole path work",
    "character": "a person or creature: attention and MLP layers, text encoder on",
    "style": "a look: attention and MLP layers, text encoder off, 5% caption dropout",
    "sdxl-anime-tags": "SDXL bases trained on booru tags (Illustrious, NoobAI-XL epsilon): 1024, shuffled tag "
                       "captions, clip skip 2, no noise offset",
    "sdxl-anime-vpred": "the same for v-prediction zero-terminal-SNR bases (NoobAI-XL v-pred)",
    "sdxl-pony-style": "a style on Pony-style SDXL bases: tag captions, clip skip 2, 5% caption dropout",
    "sd3.5-style": "a style on SD3.5 Medium/Large: 1024, joint attention, lr 1e-4, logit-normal noise levels",
    "flux-style": "a style on FLUX.1 dev: 1024, attention, lr 1e-4, samples at guidance 3.5 in 28 steps",
    "flux-schnell-style": "a style on FLUX.1 schnell: 1024, attention, lr 1e-4, samples in 4 steps",
}


def build_config(preset: str | None = None, config_file: str | None = None, **overrides) -> TrainConfig:
    """Defaults, then a preset, then a config file, then explicit values: later wins."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset], preset=preset)
    if config_file:
        values.update(dataclasses.asdict(TrainConfig.from_file(config_file)))
    values.update(overrides)
    # the chosen optimizer's own defaults sit under everything set
    return TrainConfig.from_dict({**OPTIMIZER_DEFAULTS.get(values.get("optimizer"), {}), **values})
