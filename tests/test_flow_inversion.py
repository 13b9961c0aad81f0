"""P2P DDIM Invert on rectified-flow models (v0.3.75): tiny Flux.1 dev and SD3.5 in ComfyUI's real
architectures (and Chroma, Qwen-Image and Flux.2, more briefly), inverted and sampled back through P2P Controller and stock samplers at each model's
usual guidance (Flux.1 dev: cfg 1 with FluxGuidance 3.5; SD3.5: cfg 4.5).

As in test_inversion, the random-weight models are wrapped in ``smooth`` (a stock UNet wrapper: a
Gaussian posterior mean plus a small multiple of the real DiT's own correction), so that an
inversion can retrace them at all; the real DiT is in every prediction. Skipped on the 2024 host.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import tiny_dit_models
from p2p_helpers import assert_same, image_latent, psnr, smooth, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
NEGATIVE = "blurry, low quality"
SCHEDULER = "simple"  # the flow models' usual schedule (sigma 1 down to 0)
STEPS = 8
USUAL_CFG = {"flux_dev": 1.0, "sd35": 4.5, "chroma": 4.0, "qwen_image": 4.0, "flux2": 1.0}
FLUX_GUIDANCE = 3.5
EXACT_DB = 60.0


@pytest.fixture(scope="module")
def flow(host: Any, load_tiny_dit: Any):
    """(smoothed model, clip, the image's latent) per kind."""
    cache: dict[str, tuple] = {}

    def load(kind: str) -> tuple:
        if kind not in cache:
            model, clip, vae = load_tiny_dit(kind)
            cache[kind] = smooth(host, model, weight=0.01), clip, image_latent(host, vae)
        return cache[kind]

    return load


def conditioning(host: Any, kind: str, clip: Any, text: str) -> list:
    """CLIP Text Encode; for Flux.1 dev and Flux.2 then FluxGuidance, as their workflows do."""
    with torch.inference_mode():
        cond = host.nodes.CLIPTextEncode().encode(clip, text)[0]
        if kind in tiny_dit_models.DISTILLED:
            cond = host.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(cond, FLUX_GUIDANCE)[0]
    return cond


def invert(host: Any, kind: str, model: Any, clip: Any, latent: dict, method: str, cfg: float, steps: int = STEPS) -> tuple:
    """(inverted latent, patched model, sampler) from P2P DDIM Invert."""
    node = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]()
    positive, negative = conditioning(host, kind, clip, PROMPT), conditioning(host, kind, clip, NEGATIVE)
    with torch.inference_mode():
        return node.invert(model, positive, negative, latent, steps, cfg, SCHEDULER, method, 10, 0.0)


def sample_back(host: Any, kind: str, model: Any, clip: Any, latent: dict, sampler: Any, cfg: float, edit: Any = None,
                steps: int = STEPS, add_noise: bool = False) -> torch.Tensor:
    """P2P Controller, then stock SamplerCustom (no added noise, BasicScheduler's sigmas, the given
    SAMPLER): the source row first, then the target."""
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        patched, positive, batch = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(
            model, clip, edit or swap(host, PROMPT, PROMPT), latent, 0.8, 0.4
        )
        if kind in tiny_dit_models.DISTILLED:
            positive = nodes["FluxGuidance"].execute(positive, FLUX_GUIDANCE)[0]
        sigmas = nodes["BasicScheduler"]().get_sigmas(patched, SCHEDULER, steps, 1.0)[0]
        negative = conditioning(host, kind, clip, NEGATIVE)
        return nodes["SamplerCustom"]().sample(patched, add_noise, 0, cfg, positive, negative, sampler, sigmas, batch)[0]["samples"]


def round_trip(host: Any, flow: Any, kind: str, method: str, cfg: float, steps: int = STEPS) -> float:
    """Invert and sample back with source == target: the source row's latent PSNR (the target row
    must equal it)."""
    model, clip, latent = flow(kind)
    inverted, patched, sampler = invert(host, kind, model, clip, latent, method, cfg, steps)
    out = sample_back(host, kind, patched, clip, inverted, sampler, cfg, steps=steps)
    assert_same(out[1], out[0])
    value = psnr(out[:1], latent["samples"])
    print(f"{kind} {method} cfg {cfg} {steps} steps: {value:.1f} dB")
    return value


@pytest.mark.parametrize("kind", ["flux_dev", "sd35"])
def test_exact_methods_reconstruct_at_the_usual_guidance_and_plain_inversion_drifts(host, flow, kind):
    cfg = USUAL_CFG[kind]
    direct = round_trip(host, flow, kind, "direct", cfg)
    plain = round_trip(host, flow, kind, "ddim", cfg)
    assert direct >= EXACT_DB and direct > 100  # exact up to float32 rounding
    assert plain < EXACT_DB - 20  # Euler's error (and, at cfg > 1, the guidance) pulls it off the path
    if kind == "sd35":  # a model sampled with a negative: null-text removes much of the guidance drift
        # (it cannot beat the pivot's own accuracy, plain inversion's figure at cfg 1)
        unguided = round_trip(host, flow, kind, "ddim", 1.0)
        null_text = round_trip(host, flow, kind, "null-text", cfg)
        assert null_text - plain >= 0.4 * (unguided - plain)


# Flux.2 at 32 steps: at 8, Euler's errors on its schedule happen to cancel (ad hoc, Euler / FireFlow:
# 41.1 / 37.0 dB at 8 steps, 38.0 / 46.5 at 16, 39.9 / 59.5 at 32).
@pytest.mark.parametrize("kind, steps", [("chroma", STEPS), ("qwen_image", STEPS), ("flux2", 32)])
def test_the_other_flow_families_invert_through_the_same_mechanism(host, flow, kind, steps):
    assert round_trip(host, flow, kind, "direct", USUAL_CFG[kind], steps=4) > 100
    assert round_trip(host, flow, kind, "fireflow", 1.0, steps) > round_trip(host, flow, kind, "ddim", 1.0, steps) + 10


@pytest.mark.parametrize("kind", ["flux_dev", "sd35"])
def test_fireflow_reconstructs_far_better_than_euler_at_few_steps(host, flow, kind):
    """Without guidance drift (cfg 1), what is left is each solver's own error. (At 4 steps of the
    shifted schedules the last step, sigma 0.5 to 0, is too long for either.)"""
    for steps in (8, 16):
        euler, fireflow = (round_trip(host, flow, kind, method, 1.0, steps) for method in ("ddim", "fireflow"))
        assert fireflow > euler + 10


@pytest.mark.parametrize("method, source_db", [("direct", 100), ("fireflow", 35)])
def test_an_edit_after_inversion_changes_the_target(host, flow, method, source_db):
    model, clip, latent = flow("flux_dev")
    inverted, patched, sampler = invert(host, "flux_dev", model, clip, latent, method, 1.0)
    out = sample_back(host, "flux_dev", patched, clip, inverted, sampler, 1.0, edit=swap(host, PROMPT, TARGET))
    print(f"{method} edit: source {psnr(out[:1], latent['samples']):.1f} dB, target {psnr(out[1:], out[:1]):.1f} dB from it")
    assert psnr(out[:1], latent["samples"]) > source_db  # the source row is still the image
    assert psnr(out[1:], out[:1]) < 60  # the target is not
    assert psnr(out[1:], latent["samples"]) > 10  # but keeps its composition


def test_null_text_refuses_guidance_distilled_flux(host, flow):
    model, clip, latent = flow("flux_dev")
    with pytest.raises(host.pack.p2p_attention.errors.P2PError) as error:
        invert(host, "flux_dev", model, clip, latent, "null-text", 1.0)
    assert error.value.node == "P2P DDIM Invert" and error.value.input_name == "cfg"
    assert "Flux.1 dev" in str(error.value) and "Fix: choose method direct" in str(error.value)


def test_mismatches_are_errors_during_sampling(host, flow):
    model, clip, latent = flow("sd35")
    P2PError = host.pack.p2p_attention.errors.P2PError
    inverted, patched, sampler = invert(host, "sd35", model, clip, latent, "fireflow", 1.0, steps=3)
    euler = host.nodes.NODE_CLASS_MAPPINGS["KSamplerSelect"]().get_sampler("euler")[0]
    with pytest.raises(P2PError, match="sampler output") as error:  # FireFlow's latent, Euler's steps
        sample_back(host, "sd35", patched, clip, inverted, euler, 1.0, steps=3)
    assert error.value.input_name == "steps"
    with pytest.raises(P2PError) as error:
        sample_back(host, "sd35", patched, clip, inverted, sampler, 1.0, steps=3, add_noise=True)
    assert error.value.input_name == "latent"
    assert psnr(sample_back(host, "sd35", patched, clip, inverted, sampler, 1.0, steps=3)[:1], latent["samples"]) > 20  # still usable


def test_direct_inversion_through_ksampler_advanced(host, flow):
    """The stock KSamplerAdvanced (add_noise disable) starts a flow model from the inverted latent
    itself, not from ``(1 - sigma) * latent`` (0 at sigma 1)."""
    model, clip, latent = flow("sd35")
    inverted, patched, _ = invert(host, "sd35", model, clip, latent, "direct", 4.5, steps=4)
    with torch.inference_mode():
        controlled, positive, batch = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(patched, clip, swap(host, PROMPT, PROMPT), inverted, 0.8, 0.4)
        out = host.nodes.KSamplerAdvanced().sample(
            controlled, "disable", 0, 4, 4.5, "euler", SCHEDULER, positive, conditioning(host, "sd35", clip, NEGATIVE), batch, 0, 10000, "disable"
        )[0]["samples"]
    assert psnr(out[:1], latent["samples"]) > 100


def test_progress_counts_model_steps(host, flow):
    model, clip, latent = flow("flux_dev")
    updates = []
    host.utils.set_progress_bar_global_hook(lambda value, total, preview=None, **_: updates.append((value, total)))
    try:
        invert(host, "flux_dev", model, clip, latent, "fireflow", 1.0, steps=3)
    finally:
        host.utils.set_progress_bar_global_hook(None)
    assert updates[-1] == (3, 3)
