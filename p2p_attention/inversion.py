"""Inverting an image latent along a sampling schedule, so that a sampler gives it back.

Everything is written in ComfyUI's (k-diffusion's) parametrisation, where the model is seen only
through a denoiser ``D(x, sigma) -> x0`` and its sampler's Euler step is
``x' = x + (x - D) * (sigma' - sigma) / sigma`` (ComfyUI's ``ddim`` sampler is that step too).
One set of formulas serves every model sampling ComfyUI has for images: epsilon and v-prediction
(``x = x0 + sigma * eps``) and rectified flow (CONST: ``x = (1 - sigma) * x0 + sigma * eps``, where
``(x - D) / sigma`` is the flow's velocity and the Euler step is the flow's own). The families differ
only in the scale of the model's input, ``input_scale(sigma)``: ``1 / sqrt(1 + sigma^2)`` (DDPM's
``z_t``) for epsilon and v-prediction, 1 for flow. ``sigmas`` is always the sampling schedule,
descending and ending at 0; ``path[i]`` is the latent at ``sigmas[i]``, ``path[-1]`` the image's own.

Methods:

- ``ddim``: DDIM inversion, the same Euler steps run up the schedule with the conditional
  prediction (no guidance, as the paper's pivot). Sampling back at cfg 1 retraces it up to the
  method's small error; at higher cfg the guidance pulls the trajectory away (the drift that
  null-text and direct fix).
- ``null-text`` (Mokady et al., arXiv 2211.09794): keeps the DDIM path as a pivot and, step by step
  in sampling order, optimises the unconditional embedding with Adam so that the guided Euler step
  lands on the pivot's next latent. The sampler then uses the step's embedding as its negative.
  Only for models sampled with an unconditional branch (not guidance-distilled Flux.1 dev).
- ``direct`` ("direct inversion", Ju et al., arXiv 2310.01506): keeps the DDIM path and, during
  sampling, corrects each step's prediction by the difference between what the source row needs to
  land exactly on the path's next latent and what it predicted. The same correction goes to every
  row of the batch (the edits share the source's trajectory), so the source is reconstructed
  exactly at any cfg, with no optimisation: inversion costs one conditional pass per step.
- ``fireflow`` (Deng et al., ICML 2025, arXiv 2412.07517), for rectified-flow models: a midpoint
  step whose predictor is the previous step's midpoint velocity, so second-order accurate at one
  model call per step (and one more to start); sampled back with the same solver
  (``fireflow_sample``), the pair reconstructs far better than Euler at few steps. Chosen over
  RF-Solver's second-order Taylor step, which needs two model calls per step for the same order.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .errors import P2PError

INVERT = "P2P DDIM Invert"
NULL_TEXT, DDIM, DIRECT, FIREFLOW = "null-text", "ddim", "direct", "fireflow"
METHODS = (NULL_TEXT, DDIM, DIRECT, FIREFLOW)
PAPER_STEPS = 50  # the null-text paper's schedule: its learning rate and early stop are per step of 50
SIGMA_RTOL = 1e-4  # the sampler's sigmas are float32 copies of the same schedule
FIRST_SLOPE_FRACTION = 1e-2  # small against the step, large enough that x - D keeps float32 digits
PATH_RTOL = 1e-3  # of the latent's peak: far above float32 rounding, far below any added noise

Denoise = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) -> x0
InputScale = Callable[[float], float]  # sigma -> the factor ComfyUI scales the model's input by


def velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """``dx / dsigma`` of the sampling ODE: a rectified flow's velocity, ``eps`` for epsilon models."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of ComfyUI's ``ddim`` / ``euler`` sampler."""
    return x + (x - denoised) * ((sigma_next - sigma) / sigma)


def ddim_inversion(
    latent: torch.Tensor, sigmas: Sequence[float], denoise: Denoise, input_scale: InputScale, on_step: Callable[[], None] = lambda: None
) -> list[torch.Tensor]:
    """The DDIM path ``[x at sigmas[0], ..., latent]`` of ``latent`` under ``denoise``.

    Each step up takes the slope the model predicts for the current latent at the next (higher)
    noise level, fed to the model as the same input, as DDIM inversion does (diffusers, the null-text
    reference): this also covers the first step up from sigma 0, where the slope at the current
    level is undefined.
    """
    path = [latent]
    x = latent
    for i in reversed(range(len(sigmas) - 1)):
        on_step()
        low, high = sigmas[i + 1], sigmas[i]
        probe = x * (input_scale(low) / input_scale(high))  # the same model input, one level up
        x = x + velocity(probe, denoise(probe, high), high) * (high - low)
        path.append(x)
    path.reverse()
    return path


def fireflow_inversion(
    latent: torch.Tensor, sigmas: Sequence[float], denoise: Denoise, on_step: Callable[[], None] = lambda: None
) -> list[torch.Tensor]:
    """The FireFlow path ``[x at sigmas[0], ..., latent]`` of ``latent`` (rectified-flow models).

    Each step up is a midpoint step whose half-step predictor is the previous step's midpoint
    velocity. The first predictor is the latent's own slope, at sigma 0, where the denoiser's
    ``(x - D) / sigma`` is 0/0: it is taken just above, at ``FIRST_SLOPE_FRACTION`` of the first
    step (the first noise level itself costs up to 10 dB of round trip at few steps). One model call
    per step, plus one.
    """
    path = [latent]
    x = latent
    probe = sigmas[-2] * FIRST_SLOPE_FRACTION
    predictor = velocity(x, denoise(x, probe), probe)
    for i in reversed(range(len(sigmas) - 1)):
        on_step()
        low, high = sigmas[i + 1], sigmas[i]
        middle = (low + high) / 2
        halfway = x + predictor * (middle - low)
        predictor = velocity(halfway, denoise(halfway, middle), middle)
        x = x + predictor * (high - low)
        path.append(x)
    path.reverse()
    return path


def fireflow_sample(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """FireFlow sampling, as a k-diffusion sampler function (``model(x, sigma, **extra_args) -> x0``):
    the same midpoint steps down the schedule, the first predictor the slope at the start."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    predictor = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if predictor is None:
            predictor = velocity(x, model(x, sigma * ones, **extra_args), sigma)
        middle = (sigma + sigma_next) / 2
        halfway = x + predictor * (middle - sigma)
        denoised = model(halfway, middle * ones, **extra_args)
        predictor = velocity(halfway, denoised, middle)
        x = x + predictor * (sigma_next - sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
    return x


def evaluation_sigmas(method: str, sigmas: Sequence[float]) -> list[float]:
    """The noise levels at which sampling back evaluates the model, in order: every step's start
    (Euler), or FireFlow's start and every step's middle."""
    if method == FIREFLOW:
        return [sigmas[0]] + [(a + b) / 2 for a, b in zip(sigmas[:-1], sigmas[1:])]
    return list(sigmas[:-1])


def denoised_to_land(x: torch.Tensor, sigma: float, sigma_next: float, target: torch.Tensor) -> torch.Tensor:
    """The prediction with which one Euler step from ``x`` at ``sigma`` lands exactly on ``target``."""
    return x - (target - x) * (sigma / (sigma_next - sigma))


def direct_correction(denoised: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float, target: torch.Tensor) -> torch.Tensor:
    """Direct inversion: every row gets the correction that puts row 0 (the source) on ``target``."""
    return denoised + (denoised_to_land(x[:1], sigma, sigma_next, target) - denoised[:1])


def null_text_lr(step: int, steps: int) -> float:
    """The paper's ``1e-2 * (1 - i / 100)`` for step ``i`` of 50, on any number of steps."""
    return 1e-2 * (1.0 - step * PAPER_STEPS / steps / 100.0)


def null_text_tolerance(step: int, steps: int, early_stop: float) -> float:
    """The paper's early stop ``epsilon + i * 2e-5`` (epsilon 1e-5) for step ``i`` of 50, on any
    number of steps; the growth is kept proportional to ``early_stop``, so 0 turns it off."""
    return early_stop * (1.0 + 2.0 * step * PAPER_STEPS / steps)


@contextmanager
def gradients() -> Iterator[None]:
    """Autograd on, even inside ``torch.inference_mode`` (ComfyUI runs nodes there).

    ``allow_mutation_on_saved_tensors``: some UNets add residuals in place to tensors autograd saved.
    """
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
        yield


def optimise_null_step(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    target: torch.Tensor,
    cond_denoised: torch.Tensor,
    embedding: torch.Tensor,
    denoise_uncond: Callable[[torch.Tensor], torch.Tensor],
    cfg: float,
    iterations: int,
    lr: float,
    tolerance: float,
    scale: float,
    on_iteration: Callable[[], None],
) -> tuple[torch.Tensor, int]:
    """One step of null-text inversion: the unconditional embedding with which the guided Euler step
    from ``x`` lands closest to ``target``, starting from ``embedding``; and the iterations run.

    ``denoise_uncond(embedding)`` is the unconditional prediction at (``x``, ``sigma``), differentiable
    in the embedding. The loss is the paper's: the mean squared error of the model's inputs (``scale``
    is ``sigma_next``'s input scale: the variance-preserving latents of epsilon models), so
    ``tolerance`` means what the paper's early stop means.
    """
    with gradients():
        # Tensors made in inference mode cannot be saved for backward: work on normal copies.
        x, target, cond_denoised = x.clone(), target.clone(), cond_denoised.clone()
        embedding = embedding.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([embedding], lr=lr)
        for iteration in range(1, iterations + 1):
            on_iteration()
            uncond = denoise_uncond(embedding)
            guided = uncond + cfg * (cond_denoised - uncond)
            landed = euler_step(x, guided, sigma, sigma_next)
            loss = torch.nn.functional.mse_loss(landed * scale, target * scale)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if loss.item() < tolerance:
                break
    return embedding.detach(), iteration


def null_text_inversion(
    path: Sequence[torch.Tensor],
    sigmas: Sequence[float],
    denoise_cond: Denoise,
    denoise_uncond: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor],
    embedding: torch.Tensor,
    cfg: float,
    iterations: int,
    early_stop: float,
    input_scale: InputScale,
    on_iteration: Callable[[], None] = lambda: None,
) -> list[torch.Tensor]:
    """One optimised unconditional embedding per sampling step, along the pivot ``path``.

    ``denoise_uncond(x, sigma, embedding)`` predicts with ``embedding`` as the unconditional context
    (differentiably when gradients are on). Progress: ``on_iteration`` once per iteration budgeted,
    ``iterations`` per step, also for iterations an early stop skipped.
    """
    steps = len(sigmas) - 1
    embeddings = []
    x = path[0]
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        cond = denoise_cond(x, sigma)
        embedding, ran = optimise_null_step(
            x, sigma, sigma_next, path[i + 1], cond, embedding,
            lambda e: denoise_uncond(x, sigma, e), cfg, iterations,
            null_text_lr(i, steps), null_text_tolerance(i, steps, early_stop), input_scale(sigma_next), on_iteration,
        )
        for _ in range(iterations - ran):
            on_iteration()
        embeddings.append(embedding)
        uncond = denoise_uncond(x, sigma, embedding)
        x = euler_step(x, uncond + cfg * (cond - uncond), sigma, sigma_next)
    return embeddings


@dataclass
class InvertedPath:
    """What sampling needs to retrace an inversion: shared by the patches of the model it returns.

    ``path`` is in the sampler's latent space (after ``process_latent_in``). ``last_step`` is the
    only per-run state: it tells a new run (the step index goes down) from the next step of one,
    and is cleared at a run's last step.
    """

    method: str
    sigmas: list[float]
    path: list[torch.Tensor]
    cfg: float
    scheduler: str
    embeddings: list[torch.Tensor] | None = None
    negative: torch.Tensor | None = None  # the context null-text started from: the sampler's must match
    last_step: int | None = None

    def step_of(self, sigma: float) -> int:
        """Which of the method's model evaluations the sampler is at; a sigma that is none is a mismatch."""
        for i, s in enumerate(evaluation_sigmas(self.method, self.sigmas)):
            if math.isclose(sigma, s, rel_tol=SIGMA_RTOL):
                return i
        sampler = "P2P DDIM Invert's sampler output in SamplerCustom" if self.method == FIREFLOW else "the ddim or euler sampler"
        raise P2PError(
            INVERT,
            "steps",
            f"the sampler is at noise level sigma={sigma:.4g}, which is not on the schedule this latent was "
            f"inverted along ({len(self.sigmas) - 1} steps, {self.scheduler!r} scheduler, sigma {self.sigmas[0]:.4g} to 0).",
            f"give the sampler the same model, steps and scheduler as P2P DDIM Invert, denoise 1.0, and {sampler}.",
        )

    def _off_path(self, x: torch.Tensor, step: int) -> bool:
        expected = self.path[step].to(x)
        peak = max(1.0, float(expected.abs().max()))
        return float((x - expected).abs().max()) > PATH_RTOL * peak

    def check(self, x: torch.Tensor, sigma: float, cfg: float | None) -> int:
        """Check one sampler step against the inversion and return its index.

        A run must start at the top of the schedule, from the inverted latent itself (no noise added);
        null-text needs the cfg it optimised for; direct inversion needs the source (row 0) on the path
        at every step, which only the Euler step (ddim, euler) keeps.
        """
        step = self.step_of(sigma)
        # Only a run's first evaluation is at the top of the schedule (heun-like samplers evaluate a
        # step's end too: the index repeats, it never goes down within a run).
        new_run = step == 0 or self.last_step is None or step < self.last_step
        if new_run and step != 0:
            raise P2PError(
                INVERT,
                "steps",
                f"the sampler starts at step {step} of {len(self.sigmas) - 1}, but the inverted latent is at step 0.",
                "set start_at_step to 0 (and denoise to 1.0) in the sampler.",
            )
        if new_run and self._off_path(x, 0):
            raise P2PError(
                INVERT,
                "latent",
                "the sampler does not start from the inverted latent: it added noise to it, or got another latent.",
                "use KSamplerAdvanced with add_noise 'disable' (or SamplerCustom with add_noise off), and connect "
                "the latent output of P2P DDIM Invert (through P2P Controller) unchanged.",
            )
        if self.method == NULL_TEXT and cfg is not None and not math.isclose(cfg, self.cfg, rel_tol=1e-3, abs_tol=1e-3):
            raise P2PError(
                INVERT,
                "cfg",
                f"the sampler runs at cfg {cfg:.3g}, but null-text optimised its embeddings for cfg {self.cfg:.3g}.",
                "use the same cfg in the sampler and in P2P DDIM Invert.",
            )
        if self.method == DIRECT and not new_run and self._off_path(x[:1], step):
            raise P2PError(
                INVERT,
                "method",
                f"at step {step} the source left the inverted path: the sampler does not take plain Euler steps, "
                "which direct inversion corrects.",
                "use the ddim or euler sampler (KSamplerAdvanced or KSamplerSelect).",
            )
        # Set only once the step passed: after an error the next run is checked from its start.
        self.last_step = None if step == len(evaluation_sigmas(self.method, self.sigmas)) - 1 else step
        return step

    def correct(self, denoised: torch.Tensor, x: torch.Tensor, step: int) -> torch.Tensor:
        """The prediction the sampler continues with: direct inversion's correction, else unchanged."""
        if self.method != DIRECT:
            return denoised
        target = self.path[step + 1].to(denoised)
        return direct_correction(denoised, x, self.sigmas[step], self.sigmas[step + 1], target)


def recovered_cfg(denoised: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> float | None:
    """The guidance scale of ``denoised = uncond + cfg * (cond - uncond)``, by least squares; None
    where cond and uncond agree (the scale is then undetermined)."""
    direction = (cond - uncond).double()
    norm = float(direction.pow(2).sum())
    if norm <= 1e-12 * max(1.0, float(cond.double().pow(2).sum())):
        return None
    return float(((denoised - uncond).double() * direction).sum()) / norm
