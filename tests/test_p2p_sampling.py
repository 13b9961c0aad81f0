"""Prompt-to-Prompt mechanisms on tiny SD1.x, SD2.x (v-prediction) and SDXL models with stock samplers."""
from __future__ import annotations

import pytest
import torch

from p2p_helpers import assert_same, MapRecorder, controller_of, p2p, plain, refine, reweight, sample, swap

KINDS = ("sd15", "sd2v", "sdxl")
PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a hippopotamus riding a bicycle"
DETERMINISTIC = ("euler", "ddim", "dpmpp_2m", "uni_pc", "heun", "lms", "dpm_2")
# ComfyUI's lcm re-noises between steps: it is stochastic, like the ancestral and SDE samplers.
STOCHASTIC = ("euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm")


@pytest.mark.parametrize("kind", KINDS)
def test_identity_edit_reproduces_the_source_and_a_plain_run(host, load_tiny, kind):
    model, clip, _ = load_tiny(kind)
    edit = reweight(host, "cat", 1.0, previous=swap(host, PROMPT, PROMPT))
    patched, positive, latent = p2p(host, model, clip, edit, cross=1.0, self_=1.0)
    out = sample(host, patched, clip, positive, latent)
    reference = plain(host, model, clip, PROMPT)
    assert out.shape == (2,) + reference.shape[1:]
    assert_same(out[1], out[0])
    assert_same(out[0], reference[0])


@pytest.mark.parametrize("kind", KINDS)
def test_zero_steps_is_a_plain_generation_of_the_target(host, load_tiny, kind):
    model, clip, _ = load_tiny(kind)
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET), cross=0.0, self_=0.0)
    out = sample(host, patched, clip, positive, latent)
    assert_same(out[0], plain(host, model, clip, PROMPT)[0])
    assert_same(out[1], plain(host, model, clip, TARGET)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_word_swap_keeps_composition_closer_than_a_plain_edit(host, load_tiny, kind):
    model, clip, _ = load_tiny(kind)
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET), cross=0.8, self_=0.4)
    out = sample(host, patched, clip, positive, latent)
    plain_target = plain(host, model, clip, TARGET)[0]
    assert not torch.allclose(out[1], out[0], atol=1e-4)  # the edit does something
    assert (out[1] - out[0]).abs().mean() < (plain_target - out[0]).abs().mean()


@pytest.mark.parametrize("kind", KINDS)
def test_full_replacement_maps_equal_the_mapped_source_maps(host, load_tiny, kind):
    model, clip, _ = load_tiny(kind)
    patched, positive, latent = p2p(host, model, clip, swap(host, "a cat on the mat", "a hippopotamus on the mat"), cross=1.0, self_=0.0)
    controller = controller_of(host, patched)
    recorder = MapRecorder()
    controller.recorders.append(recorder)
    sample(host, patched, clip, positive, latent, steps=2)
    token_map = controller.plan.targets[0].token_map
    assert {call.site for call, _ in recorder.calls} == set(host.pack.nodes.patch.attention_sites(model))
    assert len(recorder.calls) == 2 * len(host.pack.nodes.patch.attention_sites(model))
    for call, probs in recorder.calls:
        expected = probs[0] @ token_map.matrix
        torch.testing.assert_close(probs[1], expected, atol=1e-6, rtol=0)


def test_reweight_scales_exactly_the_chosen_tokens(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    edit = reweight(host, "cat, bicycle: -1.5", 3.0, prompt=PROMPT)
    patched, positive, latent = p2p(host, model, clip, edit, cross=1.0, self_=0.0)
    controller = controller_of(host, patched)
    recorder = MapRecorder()
    controller.recorders.append(recorder)
    out = sample(host, patched, clip, positive, latent, steps=2)
    tokens = controller.plan.source
    scale = torch.ones(len(tokens))
    words = [t.text for t in tokens.tokens]
    scale[words.index("cat")] = 3.0
    scale[words.index("bicycle")] = -1.5
    assert sorted(controller.plan.targets[0].scale.tolist()) == sorted(scale.tolist())
    for _, probs in recorder.calls:
        torch.testing.assert_close(probs[1], probs[0] * scale, atol=1e-6, rtol=0)
    assert not torch.allclose(out[1], out[0], atol=1e-3)


def test_refine_new_tokens_keep_their_own_maps(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, refine(host, "a castle", "a gothic castle at night"), cross=1.0, self_=0.0)
    controller = controller_of(host, patched)
    recorder = MapRecorder()
    controller.recorders.append(recorder)
    sample(host, patched, clip, positive, latent, steps=1)
    token_map = controller.plan.targets[0].token_map
    new = ~token_map.from_source
    assert new.sum() == 3  # gothic, at, night
    for _, probs in recorder.calls:
        mapped = probs[0] @ token_map.matrix
        torch.testing.assert_close(probs[1][..., ~new], mapped[..., ~new], atol=1e-6, rtol=0)
        assert bool((probs[1][..., new] > 0).all())  # own maps, not the (empty) mapped ones


def test_several_targets_in_one_batch(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    dog = "a photo of a dog riding a bicycle"
    edit = swap(host, PROMPT, dog, previous=swap(host, PROMPT, TARGET))
    patched, positive, latent = p2p(host, model, clip, edit, cross=0.0, self_=0.0)
    assert positive[0][0].shape[0] == 3 and latent["samples"].shape[0] == 3 and latent["batch_index"] == [0, 0, 0]
    out = sample(host, patched, clip, positive, latent)
    for row, prompt in enumerate([PROMPT, TARGET, dog]):
        assert_same(out[row], plain(host, model, clip, prompt)[0])


def test_per_word_cross_replace_steps(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    patched, _, _ = p2p(host, model, clip, swap(host, PROMPT, TARGET), cross=0.8, words="hippopotamus: 0.2, bicycle: 1")
    target = controller_of(host, patched).plan.targets[0]
    by_text = {}
    for token, until in zip(target.tokens.tokens, target.cross_until.tolist()):
        by_text.setdefault(token.text, set()).add(round(until, 4))
    assert by_text["hippo"] == by_text["potam"] == by_text["us"] == {0.2}
    assert by_text["bicycle"] == {1.0} and by_text["riding"] == {0.8}


def test_a_reweighted_word_is_edited_over_the_whole_schedule_unless_given_a_window(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    edit = reweight(host, "cat, bicycle", 3.0, prompt=PROMPT)
    target = lambda words: controller_of(host, p2p(host, model, clip, edit, cross=0.0, self_=0.0, words=words)[0]).plan.targets[0]  # noqa: E731
    default = target("")
    words = [t.text for t in default.tokens.tokens]
    cat, bicycle, riding = (words.index(w) for w in ("cat", "bicycle", "riding"))
    assert default.cross_until[[cat, bicycle, riding]].tolist() == [1.0, 1.0, 0.0]
    assert target("bicycle: 0.3").cross_until[[cat, bicycle, riding]].tolist() == pytest.approx([1.0, 0.3, 0.0])
    # At cross_replace_steps 0 the reweight still acts (over the whole schedule): the image changes.
    patched, positive, latent = p2p(host, model, clip, edit, cross=0.0, self_=0.0)
    out = sample(host, patched, clip, positive, latent)
    assert not torch.allclose(out[1], out[0], atol=1e-3)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_deterministic_samplers_keep_the_identity(host, load_tiny, sampler):
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, PROMPT), cross=0.8, self_=0.4)
    scheduler = "ddim_uniform" if sampler == "ddim" else "normal"
    out = sample(host, patched, clip, positive, latent, sampler=sampler, scheduler=scheduler)
    assert_same(out[1], out[0])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_share_noise_through_the_p2p_sampler(host, load_tiny, sampler):
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, PROMPT))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        negative = host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        stock = nodes["KSamplerSelect"]().get_sampler(sampler)[0]
        shared = host.pack.NODE_CLASS_MAPPINGS["P2PSampler"]().wrap(stock)[0]
        sigmas = nodes["BasicScheduler"]().get_sigmas(patched, "karras", 4, 1.0)[0]
        run = lambda s: nodes["SamplerCustom"]().sample(patched, True, 5, 7.0, positive, negative, s, sigmas, latent)[0]["samples"]  # noqa: E731
        with_shared, with_stock = run(shared), run(stock)
    assert_same(with_shared[1], with_shared[0])
    assert not torch.allclose(with_stock[1], with_stock[0], atol=1e-3)  # why the node exists


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_gives_finite_images(host, dtype):
    import tiny_models

    path = host.folder_paths.get_full_path("checkpoints", tiny_models.tiny_checkpoint_name("sd15"))
    with torch.inference_mode():
        model, clip, _, _ = host.sd.load_checkpoint_guess_config(path, output_vae=False, embedding_directory=None)
        model.model.diffusion_model.to(dtype)
    model.model.diffusion_model.dtype = dtype
    model.model.manual_cast_dtype = None
    edit = reweight(host, "bicycle", 10.0, previous=swap(host, PROMPT, TARGET))
    patched, positive, latent = p2p(host, model, clip, edit, cross=1.0, self_=1.0)
    out = sample(host, patched, clip, positive, latent, steps=3)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


@pytest.mark.parametrize("sampler", ("euler_ancestral", "dpmpp_sde"))
def test_the_shared_noise_sampler_stays_inside_its_noise_interval(host, load_tiny, sampler):
    """torchsde warned 'Should have tb<=t1' at the first step: its tree rounded its end below the first sigma."""
    import warnings

    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        negative = host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        shared = host.pack.NODE_CLASS_MAPPINGS["P2PSampler"]().wrap(nodes["KSamplerSelect"]().get_sampler(sampler)[0])[0]
        sigmas = nodes["BasicScheduler"]().get_sigmas(patched, "karras", 3, 1.0)[0]
        nodes["SamplerCustom"]().sample(patched, True, 5, 7.0, positive, negative, shared, sigmas, latent)
    assert not [str(w.message) for w in caught if "Should have" in str(w.message)]


def test_a_midpoint_sampler_run_is_one_run(host, load_tiny):
    """dpmpp_2s_ancestral's midpoint noise level equals the next step's up to rounding: no new run
    (the maps and the local blend of a run would restart there)."""
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        negative = host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        shared = host.pack.NODE_CLASS_MAPPINGS["P2PSampler"]().wrap(nodes["KSamplerSelect"]().get_sampler("dpmpp_2s_ancestral")[0])[0]
        sigmas = nodes["BasicScheduler"]().get_sigmas(patched, "karras", 5, 1.0)[0]
        nodes["SamplerCustom"]().sample(patched, True, 5, 7.0, positive, negative, shared, sigmas, latent)
    assert len(controller_of(host, patched).maps.runs) == 1
