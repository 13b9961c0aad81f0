"""P2P DDIM Invert on the real host: round trips through P2P Controller and a stock sampler, the
per-step data on every row, mismatch errors, interrupts, v-prediction and SDXL."""
from __future__ import annotations

import math

import pytest
import torch

from p2p_helpers import assert_same, edits, image_latent, psnr, smooth, steer_attention, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
STEPS = 12
NEGATIVE = "a photo of a cat"
SCHEDULER = "ddim_uniform"


def conditioning(host, clip, text: str) -> list:
    with torch.inference_mode():
        return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def invert(host, model, clip, latent, method, steps=STEPS, cfg=7.5, scheduler=SCHEDULER, iterations=10, negative=NEGATIVE, early_stop=0.0):
    """(inverted latent, patched model) from P2P DDIM Invert (its sampler output is the ddim sampler here)."""
    node = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]()
    with torch.inference_mode():
        return node.invert(model, conditioning(host, clip, PROMPT), conditioning(host, clip, negative), latent, steps, cfg, scheduler, method, iterations, early_stop)[:2]


def sample_back(host, model, clip, latent, edit=None, steps=STEPS, cfg=7.5, scheduler=SCHEDULER, sampler="ddim", add_noise="disable", start=0, negative=NEGATIVE, models=None):
    """P2P Controller, then KSamplerAdvanced from the inverted latent without noise: the source
    row first, then the target(s). ``models`` receives the controller's patched model."""
    edit = edit or swap(host, PROMPT, PROMPT)
    with torch.inference_mode():
        patched, positive, batch = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, edit, latent, 0.8, 0.4)
        if models is not None:
            models.append(patched)
        out = host.nodes.KSamplerAdvanced().sample(
            patched, add_noise, 0, steps, cfg, sampler, scheduler, positive, conditioning(host, clip, negative), batch, start, 10000, "disable"
        )[0]
    return out["samples"]


@pytest.fixture(scope="module")
def tiny(host, load_tiny):
    """(smoothed model, clip, the image's latent) per kind."""
    cache = {}

    def load(kind: str = "sd15") -> tuple:
        if kind not in cache:
            model, clip, vae = load_tiny(kind)
            cache[kind] = smooth(host, model), clip, image_latent(host, vae)
        return cache[kind]

    return load


def round_trip(host, tiny, kind: str, method: str, cfg: float, steps: int = STEPS, **options) -> float:
    """Invert, then sample back with source == target: the PSNR of the source row (the target row
    must equal it: every row shares the inverted trajectory)."""
    model, clip, latent = tiny(kind)
    inverted, patched = invert(host, model, clip, latent, method, steps=steps, cfg=cfg, **options)
    assert inverted["samples"].shape == latent["samples"].shape
    out = sample_back(host, patched, clip, inverted, steps=steps, cfg=cfg)
    assert out.shape[0] == 2
    assert_same(out[1], out[0])
    value = psnr(out[:1], latent["samples"])
    print(f"{kind} {method} cfg {cfg} {steps} steps: {value:.1f} dB")
    return value


PSNR = {}


@pytest.mark.parametrize("method, cfg", [("ddim", 1.0), ("ddim", 7.5), ("direct", 7.5), ("direct", 1.0), ("null-text", 7.5)])
def test_round_trip_psnr(host, tiny, method, cfg):
    PSNR[method, cfg] = value = round_trip(host, tiny, "sd15", method, cfg)
    if method == "ddim" and cfg == 1.0:
        assert value >= 40  # near exact without guidance
    elif method == "ddim":
        assert value < 36 and value < PSNR.get(("ddim", 1.0), math.inf) - 5  # guidance drifts
    else:
        assert value >= 40
    if method == "direct":
        assert value > 100  # exact up to float32 rounding, at any cfg


@pytest.mark.parametrize("kind", ["sd2v", "sdxl"])
def test_v_prediction_and_sdxl(host, tiny, kind):
    assert round_trip(host, tiny, kind, "direct", 7.5) > 100
    # Fewer steps than sd15 to stay fast: null-text must remove most of plain DDIM's guidance drift
    # (it cannot beat the pivot's own accuracy, DDIM's figure at cfg 1).
    steps = 6
    unguided, guided = (round_trip(host, tiny, kind, "ddim", cfg, steps=steps) for cfg in (1.0, 7.5))
    null_text = round_trip(host, tiny, kind, "null-text", 7.5, steps=steps, iterations=5)
    assert unguided > guided and null_text - guided >= 0.5 * (unguided - guided)


class UnetRecorder:
    """A UNet wrapper already on the model (another pack's): records what every call was given."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, apply_model, args):
        self.calls.append((float(args["timestep"].max()), list(args["cond_or_uncond"]), args["c"]["c_crossattn"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])


def test_null_text_embeddings_reach_every_row_through_a_chained_wrapper(host, tiny):
    model, clip, latent = tiny()
    recorder = UnetRecorder()
    recorded = model.clone()
    recorded.set_model_unet_function_wrapper(recorder)
    inverted, patched = invert(host, recorded, clip, latent, "null-text", steps=3, iterations=2)
    embeddings = patched.model_options["model_function_wrapper"].inverted.embeddings
    recorder.calls.clear()
    out = sample_back(host, patched, clip, inverted, edit=swap(host, PROMPT, TARGET), steps=3)
    assert not torch.allclose(out[1], out[0])  # the edit does something
    sigmas = patched.model_options["model_function_wrapper"].inverted.sigmas
    steps_seen = []
    for sigma, chunks, context in recorder.calls:
        step = min(range(3), key=lambda i: abs(sigmas[i] - sigma))
        rows = context.shape[0] // len(chunks)
        for k, chunk in enumerate(chunks):
            if chunk == 1:
                expected = embeddings[step].repeat(1, context.shape[1] // embeddings[step].shape[1], 1)
                for row in context[k * rows : (k + 1) * rows]:  # the source and the target alike
                    torch.testing.assert_close(row[None], expected.to(row), rtol=0, atol=0)
                steps_seen.append(step)
    assert steps_seen == [0, 1, 2] and rows == 2
    assert not torch.equal(embeddings[0], embeddings[2])  # optimised per step


def test_direct_inversion_edits_share_the_correction(host, load_tiny):
    """With an edit, the source row is still exactly the image; a local blend keeps the target equal
    to it outside the mask (the edit only changes what it should)."""
    model, clip, vae = load_tiny("sd15")
    steered = steer_attention(host, model, 5)  # "cat" / "dog" take the top-left quarter of every map
    latent = image_latent(host, vae, size=256)
    inverted, patched = invert(host, steered, clip, latent, "direct", steps=4)
    edit = edits(host).local_blend(swap(host, PROMPT, TARGET), "cat", "dog", "", 0.3, 0.2, None, "union", "P2P Local Blend")
    models = []
    out = sample_back(host, patched, clip, inverted, edit=edit, steps=4, models=models)
    assert psnr(out[:1], latent["samples"]) > 100
    mask = host.pack.nodes.patch.installed_controller(models[0], "test").maps.runs[-1].blend_mask
    outside = (mask[0] == 0)[None].expand_as(out[1])
    assert outside.any() and (~outside).any()
    assert_same(out[1][outside], latent["samples"][0][outside])
    assert not torch.allclose(out[1][~outside], latent["samples"][0][~outside], atol=1e-3)


@pytest.fixture(scope="module")
def quick(host, tiny):
    """A small null-text inversion and its model, for the mismatch checks."""
    model, clip, latent = tiny()
    return invert(host, model, clip, latent, "null-text", steps=3, iterations=1)


@pytest.mark.parametrize(
    "change, input_name",
    [
        ({"steps": 4}, "steps"),
        ({"scheduler": "karras"}, "steps"),
        ({"cfg": 5.0}, "cfg"),
        ({"add_noise": "enable"}, "latent"),
        ({"start": 1}, "steps"),
        ({"negative": ""}, "negative"),
    ],
)
def test_mismatch_is_an_error_during_sampling(host, tiny, quick, change, input_name):
    _, clip, _ = tiny()
    inverted, patched = quick
    options = {"steps": 3, **change}
    with pytest.raises(host.pack.p2p_attention.errors.P2PError) as error:
        sample_back(host, patched, clip, inverted, **options)
    assert error.value.node == "P2P DDIM Invert" and error.value.input_name == input_name
    assert "Fix:" in str(error.value)


def test_direct_inversion_needs_euler_steps(host, tiny):
    model, clip, latent = tiny()
    inverted, patched = invert(host, model, clip, latent, "direct", steps=4)
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match="ddim or euler") as error:
        sample_back(host, patched, clip, inverted, steps=4, sampler="dpmpp_2m")
    assert error.value.input_name == "method"
    sample_back(host, patched, clip, inverted, steps=4, sampler="euler", cfg=3.0)  # any cfg


def test_progress_and_interrupt_leave_the_model_usable(host, tiny):
    model, clip, latent = tiny()
    weights = {n: p.clone() for n, p in model.model.diffusion_model.named_parameters()}
    options = dict(model.model_options)
    updates = []
    host.utils.set_progress_bar_global_hook(lambda value, total, preview=None, **_: updates.append((value, total)))
    calls = {"n": 0}

    def interrupt_later(apply_model, args):
        calls["n"] += 1
        if calls["n"] == 6:  # during null-text's second step
            host.model_management.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    interrupted = model.clone()
    interrupted.set_model_unet_function_wrapper(interrupt_later)
    try:
        with pytest.raises(host.model_management.InterruptProcessingException):
            invert(host, interrupted, clip, latent, "null-text", steps=3, iterations=2)
        assert 3 < len(updates) < 9 and updates[-1][1] == 9  # 3 steps x (pivot + 2 iterations)
        updates.clear()
        invert(host, model, clip, latent, "null-text", steps=3, iterations=2)
        assert updates[-1] == (9, 9)
    finally:
        host.utils.set_progress_bar_global_hook(None)
        host.model_management.interrupt_current_processing(False)
    for name, p in model.model.diffusion_model.named_parameters():
        assert torch.equal(p, weights[name]) and p.grad is None
    assert model.model_options.keys() == options.keys()
    assert round_trip(host, tiny, "sd15", "direct", 7.5, steps=3) > 100


def test_bad_inputs(host, tiny):
    model, clip, latent = tiny()
    P2PError = host.pack.p2p_attention.errors.P2PError
    two = {"samples": latent["samples"].repeat(2, 1, 1, 1)}
    with pytest.raises(P2PError, match="batch of 2"):
        invert(host, model, clip, two, "direct")
    edited = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, swap(host, PROMPT, TARGET), latent, 0.8, 0.4)[0]
    with pytest.raises(P2PError, match="already carries"):
        invert(host, edited, clip, latent, "direct")
    with pytest.raises(P2PError, match="rectified-flow") as error:
        invert(host, model, clip, latent, "fireflow")
    assert error.value.input_name == "method"
    with pytest.raises(P2PError, match="at cfg 1 there is none") as error:  # nothing to optimise
        invert(host, model, clip, latent, "null-text", cfg=1.0)
    assert error.value.input_name == "cfg"
