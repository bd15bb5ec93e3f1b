"""Replay a function of tensors as CUDA graphs, one captured per input shape, so a step costs no Python or launches."""

from __future__ import annotations

import torch


class Graphed:
    """Call `fn(**tensors)` eagerly, or on a GPU replay it as a CUDA graph.

    The first `warmup` calls with a given set of input shapes run eagerly (they are real calls: their results are
    used), on a side stream as CUDA requires before a capture; the next one captures the graph and replays it, and
    every later call with those shapes only copies its inputs into the graph's and replays. Each bucket shape of a
    run gets its own graph; all share one memory pool. `fn` must not synchronize with the host (no `.item()`, no
    data-dependent Python) and must return tensors, which are overwritten by the next replay: use them before calling
    again. If a capture fails, `on_fail(error)` is told once and every later call runs eagerly.
    """

    def __init__(self, fn, enabled: bool, warmup: int = 2, on_fail=None):
        self.fn, self.enabled, self.warmup, self.on_fail = fn, enabled, warmup, on_fail
        self.graphs = {}  # shapes -> (graph, static inputs, static outputs)
        self.calls = {}  # shapes -> eager calls so far
        self.pool = None
        self.stream = torch.cuda.Stream() if enabled else None

    def __call__(self, **inputs):
        if not self.enabled:
            return self.fn(**inputs)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        if key in self.graphs:
            graph, static_in, static_out = self.graphs[key]
            for name, t in inputs.items():
                static_in[name].copy_(t, non_blocking=True)
            graph.replay()
            return static_out
        if self.calls.get(key, 0) < self.warmup:
            self.calls[key] = self.calls.get(key, 0) + 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.fn(**inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        return self._capture(key, inputs)

    def _capture(self, key, inputs):
        static_in = {name: t.clone() for name, t in inputs.items()}
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the capture allocates from its own pool: hand back what eager calls cached
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.fn(**static_in)
        except Exception as e:  # an op that cannot be captured (a host sync in some library layer): stay eager
            self.enabled = False
            self.graphs.clear()
            torch.cuda.synchronize()
            if self.on_fail:
                self.on_fail(e)
            return self.fn(**inputs)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static_in, static_out)
        graph.replay()
        return static_out

    @property
    def captured(self) -> int:
        return len(self.graphs)
