"""Per-token cross-attention maps, collected on the fly during sampling.

Each conditional cross-attention call adds its maps, averaged over heads, a block of queries at a
time, to one running sum per map resolution and image: nothing per step, layer or head is kept, and
never a self-attention map. A patched model serves many sampler runs (queue runs, several
samplers), so the sums live in a run, and a new run starts whenever the noise level goes up again.
Finished runs are kept, a few of them, with their last denoised latent, so that a node after the
sampler can find the run that produced the latent it was given.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

KEPT_RUNS = 4
# A rise of the noise level beyond float rounding starts a new run: dpmpp_2s_ancestral's midpoint
# level equals the next step's up to rounding, and a rise by rounding there is the same run.
NEW_RUN_RISE = 1e-4


@dataclass
class MapRun:
    """The maps of one sampler run: running sums per resolution (downscale) and image."""

    sums: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # [queries, tokens of the image]
    calls: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # (h, w) of the maps
    sigma: float = float("inf")  # the latest noise level seen
    final: torch.Tensor | None = None  # the latest denoised latent: the run's result once it ends
    blend_mask: torch.Tensor | None = None  # the latest local blend mask [targets, H, W]

    def add(self, downscale: int, size: tuple[int, int], rows: slice, maps: list[torch.Tensor]) -> None:
        """Adds one block of a call's query rows; a call's blocks come in order, its first at row 0."""
        if downscale not in self.sums:
            self.sums[downscale] = [m.new_zeros(size[0] * size[1], m.shape[-1]) for m in maps]
            self.calls[downscale], self.sizes[downscale] = 0, size
        if rows.start == 0:
            self.calls[downscale] += 1
        for total, new in zip(self.sums[downscale], maps):
            total[rows] += new

    def nearest_downscale(self, downscale: int) -> int:
        """The recorded resolution closest to ``downscale`` (on a log scale; the finer on a tie)."""
        if not self.sums:
            raise LookupError("no cross-attention maps were recorded")
        return min(self.sums, key=lambda d: (abs(d.bit_length() - downscale.bit_length()), d))

    def mean(self, downscale: int) -> list[torch.Tensor]:
        """Per image ``[tokens, h, w]``: each token's map averaged over heads, layers and calls."""
        h, w = self.sizes[downscale]
        count = self.calls[downscale]
        return [(total / count).T.reshape(-1, h, w) for total in self.sums[downscale]]


class AttentionMapStore:
    """A ``Recorder`` for the controller: the maps of the latest runs of one patched model."""

    def __init__(self, kept_runs: int = KEPT_RUNS) -> None:
        self.runs: deque[MapRun] = deque(maxlen=kept_runs)

    def current(self, sigma: float) -> MapRun:
        """The run a call at ``sigma`` belongs to: a higher noise level than the last starts a new one."""
        if not self.runs or sigma > self.runs[-1].sigma * (1 + NEW_RUN_RISE):
            self.runs.append(MapRun())
        run = self.runs[-1]
        run.sigma = sigma
        return run

    def record(self, call, rows: slice, maps: list[torch.Tensor]) -> None:
        """``maps``: per image ``[rows, tokens]``, summed into the run of the call's noise level."""
        self.current(call.sigma).add(call.downscale, call.map_size, rows, maps)

    def run_of(self, latent: torch.Tensor) -> MapRun:
        """The kept run whose result is nearest to ``latent`` (a sampler's output, model space)."""
        candidates = [r for r in self.runs if r.final is not None and r.final.shape == latent.shape]
        if not candidates:
            raise LookupError("no kept run produced a latent of this shape")
        distance = lambda run: float((run.final.to(latent) - latent).norm())  # noqa: E731
        return min(candidates, key=distance)
