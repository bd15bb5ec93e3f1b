"""Adapter files put into a model's own weights (W + s * delta) and taken out again exactly: previews and checks of
what diffusers' loader does not read (LoHa, LoKr, DoRA's magnitudes)."""

from __future__ import annotations

import torch


class Patches:
    """The weight changes of some adapter files in the layers of `table` (kohya name -> Linear/Conv2d, as
    `sdlora.info.base_modules` gives it), each layer's weight kept as it was so the next `apply` starts from the base.
    Files are applied one after another, as ComfyUI does (a DoRA module's change depends on the weight it lands on)."""

    def __init__(self, table: dict[str, torch.nn.Module]):
        self.table = table
        self._originals: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}

    @torch.no_grad()
    def apply(self, files: list[tuple[object, float]]) -> None:
        """Put in these (sdlora.info.Adapter, strength) pairs instead of the ones put in before; strength 0 puts in
        nothing, so the weights are the base's bit for bit."""
        self.restore()
        for adapter, strength in files:
            if strength == 0:
                continue
            for name, weights in adapter.modules.items():
                layer = self.table[name]
                weight = layer.weight
                self._originals.setdefault(id(layer), (layer, weight.detach().clone()))
                delta = adapter.kind.delta(weights, strength, base_weight=weight.detach().float().cpu())
                weight += delta.reshape(weight.shape).to(weight.device, weight.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        """Give every changed layer back its base weight."""
        for layer, original in self._originals.values():
            layer.weight.copy_(original)
        self._originals.clear()
