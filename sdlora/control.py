"""Run control: stop, sample and save requests (signals and files), and the losses read behind the GPU, NaN included."""

from __future__ import annotations

import math
import signal
from collections import deque
from pathlib import Path

import torch

from sdlora.errors import UserError
from sdlora.rundir import take_request


class Requests:
    """(stop, sample, save, bad loss) as asked by a signal or a file in the run folder, or as seen by a process that
    read a non-finite loss; all processes act on the same answer at the same step.

    One process answers at once. Several agree through a collective every `every` steps; on GPUs they act on it one
    exchange later: the merged flags are copied to pinned memory behind the steps already queued and have long landed
    when read, so the host never waits for that queue to drain (reading them at once would, every exchange). A signal
    or a file therefore takes effect within 2 x `every` steps."""

    def __init__(self, accelerator, run_dir: Path, every: int = 10):
        self.accelerator, self.run_dir, self.every = accelerator, run_dir, every
        self.posted = None  # the last exchange's merged flags: (host tensor, copy event)

    def __call__(self, signalled: bool, step: int, bad: bool = False) -> tuple[bool, bool, bool, bool]:
        accelerator, n = self.accelerator, self.accelerator.num_processes
        if n > 1 and step % self.every:
            return False, False, False, False
        main = accelerator.is_main_process
        flags = [signalled or (main and take_request(self.run_dir, "STOP")),
                 main and take_request(self.run_dir, "SAMPLE"), main and take_request(self.run_dir, "SAVE"), bad]
        if n == 1:
            return tuple(flags)
        mine = torch.tensor([flags])
        if accelerator.device.type != "cuda":  # gloo on the host: no queue of steps to wait for, answer at once
            return tuple(bool(f) for f in accelerator.gather(mine).any(dim=0).tolist())
        answer = (False, False, False, False)
        if self.posted is not None:
            host, copied = self.posted
            copied.synchronize()
            answer = tuple(bool(f) for f in host.tolist())
        # pinned and non-blocking both ways: a plain copy would wait for the queued steps too
        self.posted = to_host(accelerator.gather(mine.pin_memory().to(accelerator.device, non_blocking=True)).any(dim=0))
        return answer


class Losses:
    """Each step's loss, read without waiting for the GPU: copied to pinned host memory behind the step and read once
    a CUDA event says the copy landed (a `.item()` per step, or even once a second, would stall the queue of steps
    the host runs ahead). Only `read(wait=True)` waits for them all: a save must not keep weights a NaN reached."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pending = deque()  # (step, loss, copy event or None, images seen) not read yet
        self.recent = deque(maxlen=50)  # the last losses read, for the smoothed loss
        self.bad = None  # (step, value) of the first non-finite loss seen
        self.last_good = None  # the path of the newest save before it, named in the error

    def keep(self, step: int, loss: torch.Tensor, seen: int) -> None:
        self.pending.append((step, *to_host(loss), seen))

    def read(self, wait: bool = False) -> list[tuple[int, float, int]]:
        """(step, loss, images trained up to it) of the steps finished since the last read, oldest first; with `wait`,
        of every step run. A non-finite loss raises, at once with one process; with several, all of them stop at
        the next point they agree on (`wait`)."""
        out = []
        while self.pending and (wait or self.pending[0][2] is None or self.pending[0][2].query()):
            at, loss, copied, seen_at = self.pending.popleft()
            if copied is not None:
                copied.synchronize()
            value = loss.item()
            if not math.isfinite(value) and self.bad is None:
                self.bad = (at, value)
            self.recent.append(value)
            out.append((at, value, seen_at))
        if self.bad is not None and (wait or self.processes == 1):
            at, value = self.bad
            keep = f"; the last good save is {self.last_good.name}" if self.last_good else ""
            raise UserError(f"the loss became {value} at step {at}{keep}",
                            "lower unet_lr/text_encoder_lr, or use bf16/fp32 instead of fp16")
        return out

    def smoothed(self, decay: float = 0.9) -> float:
        values = list(self.recent)
        ema = values[0]
        for v in values[1:]:
            ema = decay * ema + (1 - decay) * v
        return ema


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """A GPU tensor copied to pinned host memory behind the work queued before it, without waiting, and the event that
    says the copy landed; a host tensor as it is, with None."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


class StopSignals:
    """SIGINT/SIGTERM set a flag the loop checks each step, so a stop always saves first."""

    def __init__(self):
        self.requested = False
        self._old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a UI worker): rely on the STOP file
            self._old = {}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
