"""What an adapter type provides: the calls training, previews, export, merge, resize and info make on it."""

from __future__ import annotations

from typing import Protocol

import torch


class AdapterType(Protocol):
    name: str  # the registry key and the name users pick: "lora"
    network_module: str  # kohya's ss_network_module for files of this type ("networks.lora")
    key_suffixes: tuple[str, ...]  # the kohya-layout key suffixes of one module's tensors
    conv: bool  # also adapts the UNet's ResNet layers, 3x3 convolutions at conv rank and alpha (LoCon, LoHa, LoKr)
    dora: bool  # a trained magnitude per output channel: a module's change depends on the base weight

    def attach(self, model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float,
               dropout: float = 0.0) -> list[torch.nn.Parameter]:
        """Add the type's layers to `model` (frozen) on the modules named by `targets`; return their trainable
        parameters, taken from the layers themselves, in a fixed order."""

    def layers(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Module path -> layer of this type, for every module of `model` that carries one."""

    def set_strength(self, model: torch.nn.Module, strength: float) -> None:
        """Scale the output of every layer of this type in `model` by `strength` (0 = the base model)."""

    def state_dict(self, named_layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        """The tensors of these layers (kohya name -> layer) in the kohya/LyCORIS file layout, fp32 on the CPU."""

    def read(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> "dict | None":
        """kohya name -> this type's weights of each module in a file's tensors (kohya or diffusers/peft layout),
        with "stray" keys listed apart; None when the file is not of this type."""

    def delta(self, weights, strength: float = 1.0) -> torch.Tensor:
        """The weight change one module's weights make at `strength`, in fp32, flattened to (out, in)."""

    def describe(self, weights) -> dict:
        """One module's weights in a few numbers: {"rank" (an int, or "full"), "alpha", "scale" (what loaders multiply
        by), "shape" (out, in * kh * kw) of the weight it changes}."""

    def metadata(self, *, rank: int, alpha: float, dropout: float) -> dict[str, str]:
        """The ss_network_* fields kohya's tools (and every UI) read for a file of this type."""
