"""The training step: the base put on the device and frozen, adapters added, and one optimizer update per call."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from sdlora.config import TrainConfig
from sdlora.graphs import Graphed
from sdlora import families
from sdlora import adapters
from sdlora.families.targets import UNET_CONV3X3_TARGETS, UNET_CONV_OTHER_TARGETS
from sdlora import objectives
from sdlora.quantize import quantize_base


def build_step(accelerator, pipe, config: TrainConfig, family=None, on_fail=None) -> "Step":
    """Put the base model on the device (frozen, in the compute dtype; the VAE in fp32, since fp16 VAEs overflow into
    NaNs), add the LoRA adapters (fp32 parameters: updates would vanish in fp16; initial values from the run's seed),
    and make the optimizer, the schedule, the objective and the `Step` that trains them. `family`: the base's
    (sdlora.families), found from the pipeline when not given."""
    family = family or families.detect(pipe)
    device = accelerator.device
    unet, vae = family.denoiser_of(pipe), pipe.vae  # the denoiser: a UNet, or SD3's transformer
    text_encoders = family.text_encoder_models(pipe)
    dtype = weight_dtype(accelerator)
    vae.requires_grad_(False).to(device, torch.float32)
    frozen = family.encoders(pipe)[len(text_encoders):]  # SD3's and FLUX.1's T5: never adapted
    # --base-precision: the frozen weights stored in fp8/int8/nf4 (sdlora.quantize; T5 in fp8); the adapters stay
    # fp32. Quantized on the CPU after loading (int8: layer by layer as each moves), then moved: the full-precision
    # base never has to fit on the GPU. Unquantized, a base loaded as its files store it is cast where it will run.
    for model in (unet, *text_encoders, *frozen):
        model.requires_grad_(False)
        if config.base_precision == "auto":
            move(model, device, dtype)
        else:
            model.to(dtype)
    base_storage = quantize_base(unet, text_encoders, config.base_precision, device=device, frozen=frozen)
    for model in (unet, *text_encoders, *frozen):
        model.to(device)  # by device only: a dtype would undo the fp8 storage

    torch.manual_seed(config.seed)
    adapter = adapters.for_config(config)
    unet_targets, conv_targets = unet_adapter_targets(family, config)
    unet_params = adapter.attach(unet, unet_targets, rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout,
                                 conv_targets=conv_targets, conv_rank=config.conv_rank, conv_alpha=config.conv_alpha,
                                 rslora=config.use_rslora, exclude=family.unet_exclude)
    te_params = []
    if config.train_text_encoder:
        for text_encoder in text_encoders:
            te_params += adapter.attach(text_encoder, family.text_targets[config.targets], rank=config.rank,
                                        alpha=config.alpha, dropout=config.lora_dropout, rslora=config.use_rslora)
    if dtype != torch.float32:
        for model in (unet, *text_encoders):
            _norms_in_compute_dtype(model)
        # peft casts each LoRA layer's input to its fp32 weights, then autocast casts it back to bf16/fp16 for the
        # matmul: two extra passes over every activation for the same result. Keep the input in the compute dtype.
        for model in (unet, *text_encoders):
            for layer in model.modules():
                if isinstance(layer, LoraLayer):
                    layer.cast_input_dtype_enabled = False
    # fp8 and nf4 save memory only with checkpointing: autograd would keep every dequantized weight otherwise. Not
    # int8: bitsandbytes' int8 layers fail under checkpointing on CUDA (TrainConfig.validate says so).
    if config.gradient_checkpointing or config.base_precision in ("fp8", "nf4"):
        # no RNG to replay (no dropout in the base), and saving CUDA's RNG state cannot be captured in a CUDA graph
        unet.enable_gradient_checkpointing(_checkpoint)
        if config.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})

    # fused AdamW on a GPU: one kernel for all LoRA tensors
    groups = [{"params": unet_params, "lr": config.unet_lr}]
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr})
    optimizer = _optimizer(config, groups, fused=device.type == "cuda")
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared schedule once per process each optimizer step, hence the factor; schedule-free
    # AdamW warms up by itself
    n = accelerator.num_processes
    warmup = 0 if config.optimizer == "adamw-schedulefree" else round(config.warmup_fraction * config.steps)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup * n,
                                 num_training_steps=config.steps * n, num_cycles=config.lr_cycles)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    objective = objectives.make(family, pipe.scheduler.config, config, device)
    return Step(accelerator, family, unet, family.encoders(pipe), unet_params, te_params, optimizer, lr_scheduler,
                objective, (vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0), dtype,
                cuda_graphs=device.type == "cuda" and config.cuda_graphs,
                on_fail=on_fail, base_storage=base_storage, clip_skip=family.resolve_clip_skip(config.clip_skip))


def unet_adapter_targets(family, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(layers at the run's rank, 3x3 convolutions at conv_rank) of the UNet for the run's adapter type: LoCon adds
    the ResNet blocks' layers as kohya's conv_dim does (sdlora.families.targets)."""
    targets = list(family.unet_targets[config.targets])
    if not adapters.for_config(config).conv:
        return targets, []
    return targets + UNET_CONV_OTHER_TARGETS, list(UNET_CONV3X3_TARGETS)


class Step:
    """One optimizer update: the loss and adapter gradients of each micro-batch, averaged over micro-batches and
    processes, clipped, applied. Nothing in it waits for the host, so on a GPU `loss_and_grads` replays as a CUDA
    graph per bucket shape (sdlora.graphs): no Python and no kernel launches per layer, which is what an
    overhead-bound LoRA step spends most of its time on."""

    def __init__(self, accelerator, family, unet, text_encoders, unet_params, te_params, optimizer, lr_scheduler,
                 objective, scaling: tuple[float, float], dtype, cuda_graphs: bool, on_fail=None,
                 base_storage: str = "", clip_skip: int = 0):
        from accelerate.utils import AutocastKwargs

        self.accelerator, self.family, self.unet = accelerator, family, unet
        # all of them (family.encoders: trained or not, SD3's T5 too): captions not cached are encoded here
        self.text_encoders = text_encoders
        adapted = text_encoders[:len(family.text_encoders)]
        self.trained = [unet, *(adapted if te_params else [])]  # whose adapters train, in checkpoint order
        self.unet_params, self.te_params, self.params = unet_params, te_params, unet_params + te_params
        self.optimizer, self.lr_scheduler, self.objective = optimizer, lr_scheduler, objective
        # the VAE's latents to the denoiser's: (latents - shift_factor) * scaling_factor (SD3's VAE shifts; SD's: 0)
        (self.scaling_factor, self.shift_factor), self.weight_dtype = scaling, dtype
        self.base_storage = base_storage  # what the frozen base takes, as sdlora.quantize reports it
        self.clip_skip = clip_skip or family.clip_skip  # the text encoders' layer the captions are encoded from
        # no autocast weight cache: a CUDA graph cannot hold tensors cached outside it
        self.autocast = AutocastKwargs(cache_enabled=False)
        self.run = Graphed(self.loss_and_grads, enabled=cuda_graphs, on_fail=on_fail)

    def loss_and_grads(self, mean, std, eps, noise, timesteps, time_ids=None, hidden=None, pooled=None, mask=None,
                       loss_weight=None, **ids):
        """Sample the latents from their cached distribution, noise them, predict, weighted MSE against the
        objective's target; return (loss, gradients of the adapter parameters). `mask` (batch, 1, h, w): each latent
        pixel's loss weight (masked_loss); `loss_weight` (batch,): each image's (prior_loss_weight for reg images)."""
        context = self.family.step_context(mean.device) if self.family.step_context else contextlib.nullcontext()
        with context:  # forward and backward: the backward recomputes checkpointed blocks with the same kernels
            return self._loss_and_grads(mean, std, eps, noise, timesteps, time_ids, hidden, pooled, mask,
                                        loss_weight, ids)

    def _loss_and_grads(self, mean, std, eps, noise, timesteps, time_ids, hidden, pooled, mask, loss_weight, ids):
        latents = ((mean + std * eps - self.shift_factor) * self.scaling_factor).to(self.weight_dtype)
        noisy_latents = self.objective.noisy(latents, noise, timesteps)
        target = self.objective.target(latents, noise, timesteps)
        with self.accelerator.autocast(self.autocast):
            if ids:  # captions not cached: encode their token ids here (through the text encoders' adapters)
                inputs = [ids[f"ids_{j}"] for j in range(len(ids))]
                # a frozen encoder's output cached by Batches comes in place of its ids: it is passed through as is
                encoders = [_Cached() if x.is_floating_point() else te for x, te in zip(inputs, self.text_encoders)]
                hidden, pooled = self.family.encode(encoders, inputs, self.clip_skip)
            model_pred = self.family.predict(self.unet, noisy_latents, timesteps, hidden, pooled, time_ids)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        if mask is not None:
            # kohya's apply_masked_loss: loss * mask, then the plain mean over every latent pixel. Not renormalised by
            # the mask's area (sum(loss * mask) / sum(mask)): a picture trains in proportion to the part of it its
            # mask keeps, learning rates carry over from kohya's recipes, and a nearly empty mask cannot blow up
            loss = loss * mask
        loss = loss.mean(dim=(1, 2, 3)) * self.objective.weights(timesteps)
        if loss_weight is not None:  # kohya's loss_weights: prior_loss_weight for regularisation images, else 1
            loss = loss * loss_weight
        loss = loss.mean()
        scaler = self.accelerator.scaler  # fp16 only: scale the loss so small gradients do not underflow
        # zeros for adapters the loss does not reach (SDXL conditions on the penultimate layer of CLIP-L)
        grads = torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss, self.params,
                                    allow_unused=True, materialize_grads=True)
        return loss.detach(), grads

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within: the adapter weights to sample with and to save. Schedule-free AdamW trains at a point between its
        iterates and its average, and the average is the result (its eval mode); other optimizers' weights are used
        as they are."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if not hasattr(optimizer, "eval") or not callable(optimizer.eval):
            yield
            return
        optimizer.eval()
        try:
            yield
        finally:
            optimizer.train()

    def __call__(self, micro_batches: list[dict]) -> torch.Tensor:
        """Update the adapter parameters from `micro_batches` (dicts of input tensors, sdlora.batches); return the
        mean loss as a tensor on the device."""
        loss, grads = None, None
        for inputs in micro_batches:
            micro_loss, micro_grads = self.run(**inputs)  # the graph's outputs: overwritten by the next replay
            if grads is None:
                loss = micro_loss.clone()
                grads = [g.clone() for g in micro_grads] if len(micro_batches) > 1 else list(micro_grads)
            else:
                loss += micro_loss
                torch._foreach_add_(grads, micro_grads)
        if len(micro_batches) > 1:
            loss /= len(micro_batches)
            torch._foreach_div_(grads, len(micro_batches))
        if self.accelerator.num_processes > 1:  # data parallel: one all-reduce of every adapter gradient at once
            flat = self.accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
            grads = [g.view_as(p) for g, p in zip(flat.split([p.numel() for p in self.params]), self.params)]
            loss = self.accelerator.reduce(loss, reduction="mean")
        for p, g in zip(self.params, grads):
            p.grad = g
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        return loss


def weight_dtype(accelerator) -> torch.dtype:
    """The frozen base's compute dtype under the run's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@torch.no_grad()
def move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `model` to `device` and cast its floating tensors to `dtype` there, one tensor at a time. A base loaded
    in the dtype its files hold (fp16 or fp32, no copy on the CPU) is cast by the GPU, not by the CPU, where the cast
    is a sizeable part of the load. One tensor at a time, the GPU never holds more than the model in `dtype` plus its
    largest tensor (an fp32 SDXL UNet moved whole needs 10 GB before its cast)."""
    for tensor in (*model.parameters(), *model.buffers()):
        moved = tensor.data.to(device)
        tensor.data = moved.to(dtype) if moved.is_floating_point() else moved


class _GroupNorm(torch.nn.GroupNorm):
    """A frozen base's GroupNorm run in its own dtype (bf16/fp16; the kernel keeps its statistics in fp32). Autocast
    would run it in fp32: its input cast up, its output and the activation after it written in fp32 (twice the
    bytes), and a cast back down before the next convolution, forward and backward: those casts are a large share of
    a step's GPU time (docs/benchmarks.md)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(self.weight.dtype), self.num_groups, self.weight, self.bias, self.eps)


class _LayerNorm(torch.nn.LayerNorm):
    """A frozen base's LayerNorm run in its own dtype, as _GroupNorm."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)


def _norms_in_compute_dtype(model: torch.nn.Module) -> None:
    """Let `model`'s affine group and layer norms run in the dtype their weights are stored in (see _GroupNorm).
    The modules stay what they were to everything else: same parameters, names and state dict."""
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm and module.affine:
            module.__class__ = _GroupNorm
        elif type(module) is torch.nn.LayerNorm and module.elementwise_affine and module.bias is not None:
            module.__class__ = _LayerNorm


def _optimizer(config: TrainConfig, groups, fused: bool = False):
    """The optimizer `config.optimizer` names, from the package that implements it; each group keeps its own lr."""
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":  # https://arxiv.org/abs/2306.06101: lr ~1 scales the step size it estimates
        from prodigyopt import Prodigy

        return Prodigy(groups, weight_decay=config.weight_decay, d_coef=config.prodigy_d_coef,
                       safeguard_warmup=config.prodigy_safeguard_warmup)
    if config.optimizer == "adamw-schedulefree":  # https://arxiv.org/abs/2405.15682
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(groups, weight_decay=config.weight_decay,
                                      warmup_steps=round(config.warmup_fraction * config.steps))
        optimizer.train()  # it steps only in train mode; samples and saves switch to the averaged weights
        return optimizer
    if config.optimizer == "adafactor":  # with the run's learning rates, as kohya's LoRA recipes use it
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=config.unet_lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused or None)


def _checkpoint(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


class _Cached:
    """Stands in for a frozen text encoder whose output the batch already holds: called with it, returns it as the
    model's output tuple."""

    def __call__(self, hidden: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (hidden,)
