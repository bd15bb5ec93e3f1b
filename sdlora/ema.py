"""An exponential moving average of the adapter weights: updated after each step, swapped in to sample or save."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """shadow = decay * shadow + (1 - decay) * weights, every `every` steps from step `start`; before `start` the
    shadow follows the weights. Updates are in-place tensor ops with no host sync, so they queue behind the step's
    CUDA graph like the optimizer's."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, start: int = 0, every: int = 1):
        self.params, self.decay, self.start, self.every = params, decay, start, every
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        if step <= self.start:
            torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])
        elif step % self.every == 0:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Within: the parameters hold the averaged weights; after, their own again, exactly."""
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], own)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shadow weights by position, for a checkpoint."""
        return {f"ema.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.shadow)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.shadow):
            t.copy_(tensors[f"ema.{i}"])
