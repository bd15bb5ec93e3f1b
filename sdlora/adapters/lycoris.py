"""LoHa and LoKr (peft's layers, applying their change without forming it where that is cheaper) in the LyCORIS file
layout: `hada_w1_a/b`, `hada_w2_a/b` or `lokr_w1` (or its `_a/_b`), `lokr_w2` (or its `_a/_b`) and `alpha`, as
`lycoris.kohya` writes them; a file's weight change is computed by the lycoris package's own functions."""

from __future__ import annotations

import json
import math
import types

import torch
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer

from sdlora import families
from sdlora.families.naming import KOHYA_UNET

ADAPTER = "default"  # peft's adapter name for the one sdlora trains (as sdlora.adapters.lora)
DORA_SUFFIX = ".dora_scale"  # read, never written: LyCORIS's DoHa/DoKr magnitudes


class _Lycoris:
    """What LoHa and LoKr share: peft layers on the targets (the UNet's ResNet convolutions too, at conv rank and
    alpha, as LyCORIS's conv_dim), their tensors under LyCORIS's names, and LyCORIS's metadata."""

    network_module = "lycoris.kohya"
    conv = True  # the ResNet blocks' layers, as LoCon: LyCORIS adapts them whenever conv_dim is given
    dora = False
    algo = ""
    tensors: tuple[str, ...] = ()  # peft's parameter names, which are LyCORIS's key names
    layer_class: type = object

    def __init__(self, name: str):
        self.name = name
        self.key_suffixes = tuple(f".{t}" for t in self.tensors) + (".alpha",)

    def _config(self, **kw):
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float,
               dropout: float = 0.0, conv_targets: list[str] = (), conv_rank: int = 0, conv_alpha: float = 0.0,
               rslora: bool = False, exclude: str = "") -> list[torch.nn.Parameter]:
        """peft layers on `targets` and `conv_targets` (at `conv_rank`/`conv_alpha`), a fresh adapter leaving the
        output as it was; the base frozen, the adapter's parameters fp32. `rslora` scales by alpha/sqrt(rank), as
        LyCORIS's rs_lora: peft has no such switch, so the alpha given to peft is alpha * sqrt(rank). LyCORIS
        trains no dropout inside LoHa/LoKr (TrainConfig.validate refuses one). `exclude`: module paths left out, as
        for LoRA."""
        assert dropout == 0.0, "LoHa and LoKr take no dropout"

        def scaled(a, r):
            return a * math.sqrt(r) if rslora else a

        config = self._config(r=rank, alpha=scaled(alpha, rank), target_modules=[*targets, *conv_targets],
                              rank_pattern={t: conv_rank for t in conv_targets},
                              alpha_pattern={t: scaled(conv_alpha, conv_rank) for t in conv_targets},
                              exclude_modules=exclude or None)
        model.requires_grad_(False)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        params = []
        for layer in self.layers(model).values():
            self._lycoris_shapes(layer)
            for t in self.tensors:
                if ADAPTER in getattr(layer, t):
                    p = getattr(layer, t)[ADAPTER]
                    p.data = p.data.float()
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def _lycoris_shapes(self, layer) -> None:
        """Make the layer's tensors what LyCORIS would train (LoKr: its factorization; its Linear layers then apply
        the factors without forming their product)."""

    def layers(self, model: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.nn.Module]:
        """Module path -> peft layer of this type, for every layer carrying `adapter` (sdlora's by default)."""
        return {name: m for name, m in model.named_modules()
                if isinstance(m, self.layer_class) and adapter in m._available_adapters}

    def set_strength(self, model: torch.nn.Module, strength: float) -> None:
        for layer in self.layers(model).values():
            layer.set_scale(ADAPTER, strength)  # scaling = strength * alpha / r; 0 adds exactly nothing

    def state_dict(self, named_layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, layer in named_layers.items():
            for t in self.tensors:
                if ADAPTER in getattr(layer, t):
                    # a copy: on the CPU .float().cpu() is the parameter itself, which training changes in place
                    out[f"{key}.{t}"] = getattr(layer, t)[ADAPTER].detach().float().cpu() \
                        .clone(memory_format=torch.contiguous_format)
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha[ADAPTER]), dtype=torch.float32)
        return out

    def read(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict | None:
        """{"modules": kohya name -> {tensor name: tensor, "alpha": float}, "layout": "lycoris", "stray": [keys]};
        None when no key of this type's is in the file. A missing `.alpha` is the rank (scale 1), as every loader
        takes it."""
        suffixes = (*self.key_suffixes, DORA_SUFFIX)
        prefixes = (KOHYA_UNET, *families.kohya_text_encoder_prefixes())
        names: dict[str, dict] = {}
        stray = []
        for key, value in state.items():
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            name = key[: -len(suffix)] if suffix else ""
            if suffix and name.startswith(prefixes) and "." not in name:
                names.setdefault(name, {})[suffix[1:]] = value
            else:
                stray.append(key)
        modules = {}
        for name, parts in names.items():
            if not self._complete(parts):
                stray += [f"{name}.{p}" for p in parts]
                continue
            parts["alpha"] = float(parts["alpha"]) if "alpha" in parts else None
            modules[name] = parts
        return {"modules": modules, "layout": "lycoris", "stray": sorted(stray)} if modules else None

    def delta(self, weights, strength: float = 1.0, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """`base_weight` is needed only for a module with a `dora_scale` (LyCORIS's DoHa/DoKr): W' = m * V / |V| per
        output channel, V = W + change, and strength s gives W + s * (W' - W), as LyCORIS and ComfyUI apply it."""
        change = self._change(weights).float()
        if "dora_scale" not in weights:
            return change.flatten(1) * strength
        assert base_weight is not None, "a DoRA module's change needs the base weight"
        base = base_weight.flatten(1).float()
        merged = base + change.reshape(base.shape)
        magnitude = weights["dora_scale"].reshape(-1, 1).float()
        return strength * (magnitude * merged / merged.norm(dim=1, keepdim=True) - base)

    def metadata(self, *, rank: int, alpha: float, dropout: float, conv_rank: int = 0, conv_alpha: float = 0.0,
                 rslora: bool = False) -> dict[str, str]:
        """As LyCORIS records a run of `--network_module lycoris.kohya --network_args algo=...`: ss_network_args holds
        the algo and conv_dim/conv_alpha as strings; the alphas written are the ones in the file's `.alpha` keys."""
        def written(a, r):
            return a * math.sqrt(r) if rslora else a

        args = {"algo": self.algo, "conv_dim": str(conv_rank), "conv_alpha": str(written(conv_alpha, conv_rank)),
                **self._args()}
        if rslora:
            args["rs_lora"] = "True"
        return {"ss_network_module": self.network_module, "ss_network_dim": str(rank),
                "ss_network_alpha": str(written(alpha, rank)), "ss_network_dropout": str(dropout),
                "ss_network_args": json.dumps(args), "sdlora_adapter": self.name}

    def describe(self, weights) -> dict:
        """rank (or "full"), alpha, the scale loaders apply, and the (out, in) size of the weight it changes."""
        raise NotImplementedError

    def _complete(self, parts: dict) -> bool:
        raise NotImplementedError

    def _change(self, weights) -> torch.Tensor:
        raise NotImplementedError

    def _args(self) -> dict:
        return {}


class LoHa(_Lycoris):
    """LoHa (FedPara): dW = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b), the Hadamard product of two rank-r products,
    so rank r reaches rank r^2. Convolutions are flattened to (out, in * kh * kw) (LyCORIS without Tucker)."""

    algo = "loha"
    tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    layer_class = LoHaLayer

    def _config(self, **kw):
        return LoHaConfig(**kw)

    def _lycoris_shapes(self, layer):
        if isinstance(layer.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d)):
            layer._get_delta_activations = types.MethodType(_hadamard_activations, layer)

    def _complete(self, parts):
        return all(t in parts for t in self.tensors)

    def _change(self, w):
        from lycoris.functional.loha import diff_weight

        rank = w["hada_w1_b"].shape[0]
        alpha = w["alpha"] if w["alpha"] is not None else rank
        # lycoris's (w1d, w1u, w2d, w2u, t1, t2): down is LyCORIS's `_b`, up its `_a`
        return diff_weight(*(w[t].float() for t in ("hada_w1_b", "hada_w1_a", "hada_w2_b", "hada_w2_a")),
                           w.get("hada_t1"), w.get("hada_t2"), gamma=alpha / rank)

    def describe(self, weights):
        rank = weights["hada_w1_b"].shape[0]
        alpha = weights["alpha"] if weights["alpha"] is not None else float(rank)
        return {"rank": rank, "alpha": alpha, "scale": alpha / rank,
                "shape": (weights["hada_w1_a"].shape[0], weights["hada_w1_b"].shape[1])}


class LoKr(_Lycoris):
    """LoKr: dW = kron(w1, w2), w1 the small factor (a x c), w2 the large one (b x d) or its rank-r product
    w2_a @ w2_b, with out = a*b and in = c*d split as LyCORIS's factorization splits them (`factor`: the size of the
    small factor, -1 as near the square root as the dimension allows). Scaled by alpha/r when a factor is a low-rank
    product, by 1 when both are full matrices (LyCORIS's lokr.py sets alpha = rank then; ComfyUI and lycoris'
    functional.lokr read such a file at scale 1 whatever its alpha). `full_matrix`: w2 full always (LyCORIS's
    full_matrix)."""

    algo = "lokr"
    tensors = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    layer_class = LoKrLayer

    def __init__(self, name: str = "lokr", factor: int = -1, full_matrix: bool = False):
        super().__init__(name)
        self.factor, self.full_matrix = factor, full_matrix

    def _config(self, **kw):
        return LoKrConfig(decompose_factor=self.factor, init_weights="lycoris", **kw)

    def _lycoris_shapes(self, layer):
        # peft's factorization keeps a factor above the square root on the small side (128 at factor 16: 16 x 8)
        # where LyCORIS's puts it on the large one (8 x 16), and peft has no full_matrix: the layer's tensors are
        # made again, by peft, in the shapes lycoris.modules.lokr.LokrModule gives them
        from lycoris.functional.general import factorization

        base = layer.get_base_layer()
        weight = base.weight
        out_dim, in_dim, *kernel = weight.shape
        r = layer.r[ADAPTER]
        (a, b), (c, d) = factorization(out_dim, self.factor), factorization(in_dim, self.factor)
        use_w2 = self.full_matrix or r >= max(b, d) / 2
        for t in self.tensors + ("lokr_t2",):
            if ADAPTER in getattr(layer, t):
                del getattr(layer, t)[ADAPTER]
        layer.create_adapter_parameters(ADAPTER, r, ((a, b), (c, d), *kernel), True, use_w2, False)
        layer.reset_adapter_parameters_lycoris_way(ADAPTER)
        layer._move_adapter_to_device_of_base_layer(ADAPTER)
        if use_w2:  # both factors full: scale 1, the alpha LyCORIS writes then is the rank
            layer.alpha[ADAPTER] = r
            layer.set_scale(ADAPTER, 1.0)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            layer._get_delta_activations = types.MethodType(_kron_activations, layer)

    def _complete(self, parts):
        return ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)) and \
            ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts))

    def _change(self, w):
        from lycoris.functional.lokr import diff_weight

        rank = _lokr_rank(w)
        # lycoris's functional.lokr scales by gamma / rank when a factor is a product, by 1 otherwise
        alpha = w["alpha"] if w["alpha"] is not None and rank else (rank or 1.0)
        return diff_weight(*(w.get(t) if w.get(t) is None else w[t].float()
                             for t in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                       "lokr_t2")), gamma=alpha)

    def describe(self, weights):
        rank = _lokr_rank(weights)
        alpha = weights["alpha"] if weights["alpha"] is not None else float(rank or 1)
        w1 = weights["lokr_w1"].shape if "lokr_w1" in weights else (weights["lokr_w1_a"].shape[0], weights["lokr_w1_b"].shape[1])
        w2 = weights["lokr_w2"].flatten(1).shape if "lokr_w2" in weights else (weights["lokr_w2_a"].shape[0], weights["lokr_w2_b"].shape[1])
        return {"rank": rank or "full", "alpha": alpha, "scale": alpha / rank if rank else 1.0,
                "shape": (w1[0] * w2[0], w1[1] * w2[1])}

    def _args(self):
        return {"factor": str(self.factor), **({"full_matrix": "True"} if self.full_matrix else {})}


def _kron_activations(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoKr layer's change to its output, x kron(w1, w2)^T * scale, without forming the product. A Linear layer: with
    x's last dimension as a c x d matrix X, it is w1 X w2^T per token (a x b, flattened), a*d*(c + b) per token against
    a*b*c*d. A convolution (its input channels c groups of d, w2 a b x d x kh x kw kernel): w2 convolves each of the c
    groups, then w1 mixes the groups, (b*d*kh*kw + a*b)*c per pixel against a*b*c*d*kh*kw. peft forms the full
    product every step and runs a second matmul or convolution of the base layer's size. Rank dropout and the Tucker
    form (which sdlora never sets) and grouped convolutions take peft's own path."""
    base = layer.get_base_layer()
    conv = isinstance(base, torch.nn.Conv2d)
    if _peft_path(layer, adapter, x, layer.lokr_t2):
        return type(layer)._get_delta_activations(layer, adapter, x, *args, **kwargs)
    w1 = layer.lokr_w1[adapter] if adapter in layer.lokr_w1 else layer.lokr_w1_a[adapter] @ layer.lokr_w1_b[adapter]
    w2 = layer.lokr_w2[adapter] if adapter in layer.lokr_w2 else layer.lokr_w2_a[adapter] @ layer.lokr_w2_b[adapter]
    (a, c), b = w1.shape, w2.shape[0]
    x = layer._cast_input_dtype(x, w1.dtype)  # as peft's path: fp32, or what autocast makes of it
    if not conv:
        d = w2.shape[1]
        y = torch.matmul(torch.matmul(w1, x.reshape(*x.shape[:-1], c, d)), w2.t())
        return y.reshape(*x.shape[:-1], a * b) * layer.scaling[adapter]
    n, channels, height, width = x.shape
    kernel = w2.reshape(b, channels // c, *base.kernel_size)
    y = torch.nn.functional.conv2d(x.reshape(n * c, channels // c, height, width), kernel, stride=base.stride,
                                   padding=base.padding, dilation=base.dilation)
    out_h, out_w = y.shape[-2:]
    y = torch.matmul(w1, y.reshape(n, c, b * out_h * out_w))  # (n, a, b * pixels)
    return y.reshape(n, a * b, out_h, out_w) * layer.scaling[adapter]


def _hadamard_activations(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoHa layer's change to its output. The change (w1_a w1_b) * (w2_a w2_b) is U V with U's columns
    w1_a[:, k] * w2_a[:, l] and V's rows w1_b[k] * w2_b[l] (all r^2 pairs k, l), so a token costs r^2 (in + out)
    through V, then U, against in * out through the formed change, which peft forms every step (2 r in out more) and
    sends back a full-size gradient through. The cheaper of the two runs: the factors for layers wider than 2 r^2
    (128 at rank 8, 512 at rank 16) given enough tokens, the formed change for narrower ones. Rank dropout and the
    Tucker form (which sdlora never sets) and grouped convolutions take peft's own path."""
    base = layer.get_base_layer()
    conv = isinstance(base, torch.nn.Conv2d)
    formed = type(layer)._get_delta_activations
    w1a, w1b = layer.hada_w1_a[adapter], layer.hada_w1_b[adapter]
    w2a, w2b = layer.hada_w2_a[adapter], layer.hada_w2_b[adapter]
    (out_dim, r), in_dim = w1a.shape, w1b.shape[1]
    tokens = x.numel() // x.shape[1 if conv else -1]
    if _peft_path(layer, adapter, x, layer.hada_t1) or \
            tokens * r * r * (in_dim + out_dim) >= (2 * r + tokens) * in_dim * out_dim:
        return formed(layer, adapter, x, *args, **kwargs)
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_dim, r * r) * layer.scaling[adapter]
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, in_dim)
    x = layer._cast_input_dtype(x, w1a.dtype)  # as peft's path: fp32, or what autocast makes of it
    if not conv:
        return torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
    h = torch.nn.functional.conv2d(x, down.reshape(r * r, -1, *base.kernel_size), stride=base.stride,
                                   padding=base.padding, dilation=base.dilation)
    return torch.nn.functional.conv2d(h, up[:, :, None, None])


def _peft_path(layer, adapter: str, x: torch.Tensor, tucker) -> bool:
    """Whether a LoHa or LoKr layer's change needs peft's own path: rank dropout while training, the Tucker form
    (`tucker`: the layer's core tensors), a grouped convolution or an input that is no batch of pictures."""
    base = layer.get_base_layer()
    return bool(layer.training and layer.rank_dropout[adapter]) or adapter in tucker or \
        (isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or x.dim() != 4))


def _lokr_rank(w) -> int:
    """The rank of a LoKr module's low-rank factor; 0 when both factors are full matrices."""
    if "lokr_w1_a" in w:
        return w["lokr_w1_a"].shape[1]
    if "lokr_w2_a" in w:
        return w["lokr_w2_a"].shape[1]
    return 0


LOHA = LoHa("loha")
LOKR = LoKr()
