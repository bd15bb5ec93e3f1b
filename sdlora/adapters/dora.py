"""DoRA's layers computed with fewer passes than peft's (same outputs and gradients): the norms |W + s BA| without
forming BA, and a layer's whole output in one matmul or convolution with the magnitude folded into the weight."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft.utils.integrations import dequantize_module_weight

ADAPTER = "default"  # peft's adapter name for the one sdlora trains (as sdlora.adapters.lora)


def use(layer) -> None:
    """Make a peft DoRA layer compute as this module does, its magnitude starting at the fp32 norms it divides by (peft
    rounds them to the base's dtype, so a bf16 base would start a few 1/1000 off the base's output otherwise)."""
    dora = layer.lora_magnitude_vector[ADAPTER]
    base = layer.get_base_layer()
    with torch.no_grad():
        norms = row_norms(dequantize_module_weight(base), layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                          layer.scaling[ADAPTER])
        dora.weight.data = norms.reshape(dora.weight.shape)  # fp32, as sdlora trains adapter tensors
    if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        layer.forward = types.MethodType(_folded_forward, layer)
    dora.forward = types.MethodType(_change, dora)


def row_norms(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """|W + scale * up @ down| per output channel (fp32), without forming the out x in sum: with W's rows as vectors,
    |W_i|^2 + 2 scale <up_i, (W down^T)_i> + scale^2 up_i (down down^T) up_i^T. That reads W twice (its row norms and
    one matmul of rank r) where peft forms up @ down, W + it and its norms: several passes of W's size. Convolutions
    count as (out, in * kh * kw)."""
    w = weight.flatten(1)
    a = down.flatten(1).float()
    b = up.flatten(1).float()
    own = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    cross = (b * (w @ a.to(w.dtype).t()).float()).sum(1)
    change = (b @ (a @ a.t()) * b).sum(1)
    return (own + 2 * scale * cross + scale * scale * change).clamp_min(0).sqrt()


def _change(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name=ADAPTER):
    """peft's DoRA layer's change to the output (DoraLinearLayer / DoraConv2dLayer forward: m / |W + s BA| scales the
    base's output and the LoRA's, the norm held constant in the backward pass as the DoRA paper does), with the norms
    from row_norms. Used where peft's own forward runs (_folded_forward says when)."""
    conv = isinstance(base_layer, torch.nn.Conv2d)
    weight = dequantize_module_weight(base_layer)
    weight = weight if conv else weight.to(x.dtype)
    if getattr(self, "fan_in_fan_out", False):  # transformers' Conv1D keeps (in, out)
        weight = weight.t()
    with torch.no_grad():
        norm = row_norms(weight, lora_A.weight, lora_B.weight, scaling)
    shape = (1, -1, 1, 1) if conv else (1, -1)
    scale = self.weight.reshape(shape) / norm.reshape(shape)
    bias = base_layer.bias
    if base_result is None:
        base_result = base_layer._conv_forward(x, weight, None) if conv else F.linear(x, weight)
    elif bias is not None:
        base_result = base_result - bias.reshape(shape)
    return (scale - 1) * base_result + scale * lora_B(lora_A(x)) * scaling


def _folded_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A DoRA layer's output, c * (base(x) + s B(A(x))) + bias with c = m / |W + s BA| per output channel, as one
    matmul or convolution with c folded into W and one rank-r path (_Folded). peft runs the base layer, then rescales
    its output and the LoRA's in several full-size elementwise passes, forward and back. peft's own forward runs for
    what this does not cover: adapters off or merged, another adapter, dropout in training, extra arguments, grouped,
    dilated or padded-by-name convolutions, a LoRA bias."""
    base = self.get_base_layer()
    if args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [ADAPTER] or \
            (self.training and not isinstance(self.lora_dropout[ADAPTER], torch.nn.Identity)) or \
            self.lora_B[ADAPTER].bias is not None or \
            (isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or base.dilation != (1, 1) or x.dim() != 4 or
                                                    isinstance(base.padding, str) or base.padding_mode != "zeros")):
        return type(self).forward(self, x, *args, **kwargs)
    return _Folded.apply(x, base, self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight,
                         self.lora_magnitude_vector[ADAPTER].weight, self.scaling[ADAPTER])


class _Folded(torch.autograd.Function):
    """out = base(x; c W) + B'(A(x)) + bias with B' = s c B, c = m / |W + s BA| held constant (as peft and the DoRA
    paper hold it), for a Linear layer (A, B' matmuls) or a convolution (A the base's kernel shape and stride, B' 1x1).
    In the compute dtype (autocast's, else the weight's); c W is rounded to it as a weight is. Backward: x's gradient
    through c W and through A and B'; A's and B's as for LoRA (B's times s c); m's, the sum over tokens or pixels of
    g (out - bias) / m, from the output itself, so no full-size weight gradient is formed. The base layer's weight is
    read again in the backward pass (a quantized one dequantized again), never held between the two."""

    @staticmethod
    def forward(ctx, x, base, down, up, magnitude, scale):
        weight, bias = dequantize_module_weight(base), base.bias
        conv = isinstance(base, torch.nn.Conv2d)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            c = magnitude.detach().float().reshape(-1) / row_norms(weight, down, up, scale)
            xc, a = x.to(dtype), down.to(dtype)
            up_c = (up.flatten(1).float() * (scale * c)[:, None]).to(dtype)  # (out, r)
            folded = _fold(weight, c, dtype)
            bias_c = None if bias is None else bias.to(dtype)
            if conv:
                h = F.conv2d(xc, a, None, base.stride, base.padding)
                out = F.conv2d(xc, folded, bias_c, base.stride, base.padding) + F.conv2d(h, up_c[:, :, None, None])
            else:
                h = F.linear(xc, a)
                out = F.linear(xc, folded, bias_c) + F.linear(h, up_c)
        ctx.save_for_backward(xc, h, a, up_c, c, magnitude, out)
        ctx.base, ctx.scale, ctx.dtype, ctx.dtypes = base, scale, dtype, (x.dtype, down.dtype, up.dtype)
        ctx.up_shape = up.shape
        return out

    @staticmethod
    def backward(ctx, g):
        xc, h, a, up_c, c, magnitude, out = ctx.saved_tensors
        base = ctx.base
        weight, bias = dequantize_module_weight(base), base.bias
        x_dtype, down_dtype, up_dtype = ctx.dtypes
        conv = isinstance(base, torch.nn.Conv2d)
        with torch.autocast(g.device.type, enabled=False):
            g = g.to(ctx.dtype)
            grad_x = None
            if conv:
                gh = F.conv2d(g, up_c.t()[:, :, None, None])  # (n, r, h, w)
                if ctx.needs_input_grad[0]:
                    through = torch.nn.grad.conv2d_input
                    grad_x = through(xc.shape, _fold(weight, c, ctx.dtype), g, base.stride, base.padding) + \
                        through(xc.shape, a, gh, base.stride, base.padding)
                grad_down = torch.nn.grad.conv2d_weight(xc, a.shape, gh, base.stride, base.padding)
                grad_up = torch.einsum("nihw,nkhw->ik", g, h).float()
            else:
                g_rows = g.reshape(-1, out.shape[-1])  # (tokens, out)
                gh = g_rows @ up_c  # (tokens, r)
                if ctx.needs_input_grad[0]:
                    grad_x = (g_rows @ _fold(weight, c, ctx.dtype) + gh @ a).reshape(xc.shape)
                grad_down = gh.t() @ xc.reshape(-1, xc.shape[-1])
                grad_up = (g_rows.t() @ h.reshape(-1, h.shape[-1])).float()
            grad_up = (grad_up * (ctx.scale * c)[:, None]).reshape(ctx.up_shape)
            # d out / d m = (out - bias) / m: the sum of g * out over all but the channels, less bias times g's sum
            dims = (0, 2, 3) if conv else tuple(range(g.dim() - 1))
            moment = torch.sum(g * out, dims, dtype=torch.float32)
            if bias is not None:
                moment = moment - bias.float() * g.sum(dims, dtype=torch.float32)
            m = magnitude.detach().float().reshape(-1)
            grad_m = moment * torch.where(m != 0, 1 / m, torch.zeros_like(m))
        return (None if grad_x is None else grad_x.to(x_dtype), None, grad_down.to(down_dtype),
                grad_up.to(up_dtype), grad_m.reshape(magnitude.shape).to(magnitude.dtype), None)


def _fold(weight: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """c W (c per output channel, in fp32), rounded to the compute dtype."""
    return (weight.float() * c.reshape(-1, *[1] * (weight.dim() - 1))).to(dtype)
