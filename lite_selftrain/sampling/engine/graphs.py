"""The decode step as CUDA graphs: captured once per (rows, columns) bucket, then replayed, so a step costs
one launch instead of a few hundred kernel launches from Python (the host overhead that bounds an eager
decode step of a small model, whatever the batch).

    graphs = StepGraphs(step)   # step(b, columns): one decode step, every tensor it touches at a fixed address
    graphs(b, columns)          # the first call of a bucket runs step eagerly, then captures it; later ones replay

Capture records kernels without running them, so the first call's step runs eagerly (which also warms up
cuBLAS and the allocator on a side stream, as capture asks) and the step is recorded after it. Every graph
shares one memory pool: a step's temporaries are dead once it ends, so the graphs can reuse each other's.
If a capture fails (an operation a graph cannot hold), one line says so and the steps run eagerly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch


class StepGraphs:
    """Replay `step(b, columns)` from a CUDA graph per (b, columns)."""

    def __init__(self, step: Callable[[int, int], None]):
        self.step = step
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None  # the memory pool every graph shares, once the first is captured
        self.eager = False  # a capture failed: no more graphs

    def __call__(self, b: int, columns: int) -> None:
        graph = self.graphs.get((b, columns))
        if graph is not None:
            graph.replay()
            return
        if self.eager:
            self.step(b, columns)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # this step, eagerly: lazy initialisation happens outside the capture
            self.step(b, columns)
        torch.cuda.current_stream().wait_stream(side)
        self._capture(b, columns)

    def _capture(self, b: int, columns: int) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(b, columns)  # recorded, not run
        except RuntimeError as err:
            print(f"sampling: decoding eagerly, a CUDA graph capture failed ({str(err).splitlines()[0]})",
                  file=sys.stderr)
            self.eager = True
            return
        self.pool = graph.pool()
        self.graphs[(b, columns)] = graph
