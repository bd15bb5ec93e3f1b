"""Store the frozen base model's weights quantized (fp8, int8 or nf4) while the LoRA on top trains in fp32."""

from __future__ import annotations

import itertools

import torch

from sdlora.errors import UserError, first_line

PRECISIONS = ("auto", "fp8", "int8", "nf4")  # auto: the base stays in the training precision, unquantized
# Kept in the compute precision in every mode, by full module path: the UNet's first and last convolutions (a few
# thousand weights each, and diffusers' `model.dtype`, which the pipelines cast prompt embeddings to, reports the
# first parameter's dtype), the SD3.5 and FLUX.1 transformers' patch embedding and output projection (the same two
# layers there, about 0.2M weights each) and SDXL's pooled-text projection (transformers' own bitsandbytes path leaves
# a model's last module unquantized too: quantizers/base.py, get_keys_to_not_convert).
KEEP = ("conv_in", "conv_out", "pos_embed.proj", "x_embedder", "proj_out", "text_projection")


def check_precision(precision: str, *, cuda: bool) -> None:
    """Raise a one-line UserError when `precision` cannot run on this machine (`cuda`: a CUDA GPU trains).

    Called by TrainConfig.validate, before any model loads. fp8 runs wherever torch has float8 types; int8 and nf4
    need bitsandbytes, and on a CPU a build of it with CPU kernels (0.50.2 has them; older builds were CUDA-only),
    which a 64 x 64 layer quantized and run here shows.
    """
    assert precision in PRECISIONS, precision
    if precision == "auto":
        return
    if precision == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            raise UserError(f"base_precision fp8 needs torch 2.1 or later (this is {torch.__version__})",
                            "upgrade torch, or use --base-precision auto")
        return
    bnb = _bitsandbytes(precision)
    if cuda:
        return
    try:
        layer = _bnb_linear(bnb, torch.nn.Linear(64, 64), precision)
        layer(torch.randn(2, 64))
    except Exception as e:  # whatever bitsandbytes raises where it has no kernel for this device
        why = first_line(e, 120)
        hint = "use --base-precision fp8 (runs on any CPU or GPU), or train on a CUDA GPU"
        raise UserError(f"base_precision {precision} cannot run on this CPU with bitsandbytes "
                        f"{bnb.__version__} ({why})", hint) from None


def quantize_base(unet: torch.nn.Module, text_encoders: list[torch.nn.Module], precision: str,
                  device: torch.device | str | None = None, frozen: list[torch.nn.Module] = ()) -> str:
    """Store the frozen base's weights in `precision`, in place; return a one-line note of what is stored and its size.

    Call it once the models are frozen and in the compute dtype (the training loop's weight_dtype), on the CPU or
    their device, and before the adapters are attached (sdlora.adapters): each layer keeps computing in the dtype its weight has now, and peft
    then wraps the quantized layers with fp32 LoRA weights initialised exactly as on an unquantized base (for int8/nf4
    with its own bitsandbytes LoRA layers). The VAE is not touched. Afterwards move the models to `device` by device
    only: a `.to(dtype)` would turn the fp8 storage back into full precision. fp8 and nf4 are quantized where the
    models are; int8 layers are quantized as each moves to `device` (default: where it is), one at a time, because
    bitsandbytes' int8 scales do not follow a quantized layer that a module's `.to()` moves later (they stay on the
    CPU: "Expected a cuda device, but got: cpu" at the first step; seen with bitsandbytes 0.50.2).

    - fp8: every Linear and Conv2d weight (UNet and text encoders) is stored as torch.float8_e4m3fn and upcast to the
      compute dtype at each use, through a torch.nn.utils.parametrize parametrization. Autograd keeps each upcast
      copy for the backward pass, so this saves memory only with gradient checkpointing.
    - int8: every Linear becomes a bitsandbytes Linear8bitLt (LLM.int8(), outlier threshold 6 as diffusers' and
      transformers' BitsAndBytesConfig default); convolutions stay as they are.
    - nf4: every Linear becomes a bitsandbytes Linear4bit (NF4 with double quantization, as in QLoRA); convolutions
      stay as they are.
    - auto: nothing changes.

    `frozen`: encoders no adapter ever wraps (SD3.5's and FLUX.1's T5); under any quantized precision they are stored
    in fp8 (4.7 GB for T5-XXL where bf16 takes 9.5; ComfyUI's t5xxl_fp8), which the note adds.
    """
    assert precision in PRECISIONS, precision
    models = [unet, *text_encoders]
    before = [stored_bytes(m) for m in models]
    if precision == "fp8":
        for model in models:
            _to_fp8(model)
        how = "fp8 (torch float8_e4m3fn, Linear and Conv2d weights)"
    elif precision in ("int8", "nf4"):
        bnb = _bitsandbytes(precision)
        for model in models:
            _to_bnb(bnb, model, precision, device if precision == "int8" else None)
            # peft reads these flags (set by diffusers' and transformers' own bitsandbytes loaders) to wrap the layers
            # with its bitsandbytes LoRA layers (peft/tuners/lora/model.py, _create_and_replace)
            setattr(model, "is_loaded_in_4bit" if precision == "nf4" else "is_loaded_in_8bit", True)
        how = f"{precision} (bitsandbytes {bnb.__version__}, Linear layers)"
    else:
        how = f"{_weight_dtype(unet)} (not quantized)"
    after = [stored_bytes(m) for m in models]
    denoiser = "UNet" if "UNet" in type(unet).__name__ else "transformer"
    parts = f"{denoiser} {after[0] / 1e9:.2f} GB, text encoder(s) {sum(after[1:]) / 1e9:.2f} GB"
    if precision == "auto":
        return f"base weights stored as {how}: {parts}"
    note = f"base weights stored as {how}: {parts}, {sum(after) / 1e9:.2f} GB in all, was {sum(before) / 1e9:.2f} GB"
    for model in frozen:
        _to_fp8(model)
    if frozen:
        note += f"; T5 stored in fp8: {sum(stored_bytes(m) for m in frozen) / 1e9:.2f} GB"
    return note


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes a model's weights take as stored: parameters, buffers and bitsandbytes' quantization statistics."""
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)  # nf4: block scales (themselves 8-bit with double quantization)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
        scales = getattr(t, "SCB", None)  # int8: one scale per output row
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


class _Fp8Storage(torch.nn.Module):
    """Parametrization: the weight is stored in float8 and read in the compute dtype. Each use makes a new upcast
    tensor, which is what autograd saves for the backward pass; diffusers' enable_layerwise_casting instead casts the
    module back to float8 in place after its forward, and a convolution's backward then meets the float8 weight
    (RuntimeError: expected scalar type ... but found Float8_e4m3fn; seen with diffusers 0.42.1), so it serves
    inference only."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute_dtype)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        # a tuple: torch then stores it as a new tensor (`original0`), where one tensor would have to keep its dtype
        return (weight.to(torch.float8_e4m3fn),)


def unstored(module: torch.nn.Module) -> torch.nn.Module:
    """`module` (a copy, say) with every fp8 storage _to_fp8 gave it replaced, in place, by the plain weight it gives
    at each use (in the compute dtype): a `.float()` afterwards then casts it like any other weight."""
    from torch.nn.utils import parametrize

    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module


def _to_fp8(model: torch.nn.Module) -> None:
    """Store every Linear and Conv2d weight of `model` (but KEEP's) as float8_e4m3fn, upcast at each use."""
    from torch.nn.utils import parametrize

    for name, module in list(model.named_modules()):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name not in KEEP \
                and not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", _Fp8Storage(module.weight.dtype))
            module.requires_grad_(False)


def _to_bnb(bnb, model: torch.nn.Module, precision: str, device=None) -> None:
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f"{parent_name}.{name}" if parent_name else name
            if type(child) is torch.nn.Linear and path not in KEEP:
                setattr(parent, name, _bnb_linear(bnb, child, precision, device))


def _bnb_linear(bnb, linear: torch.nn.Linear, precision: str, device=None) -> torch.nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, on `device` (default: theirs): bitsandbytes quantizes them as
    the layer moves there (Params4bit/Int8Params.to)."""
    weight = linear.weight.data
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    if precision == "nf4":
        layer = bnb.nn.Linear4bit(*shape, compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device or weight.device).requires_grad_(False)


def _bitsandbytes(precision: str):
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"base_precision {precision} needs bitsandbytes, which is not installed",
                        "pip install bitsandbytes, or use --base-precision fp8 (no extra package)") from None
    return bitsandbytes


def _weight_dtype(model: torch.nn.Module) -> str:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
