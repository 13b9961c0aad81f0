"""P2P Controller as a ComfyUI citizen: clones, no mutation, chaining, no leaking state, clear errors."""
from __future__ import annotations

import copy
import re

import pytest
import torch

import comfy_host
from p2p_helpers import CONTROLLER_ID, SAMPLER_ID, assert_same, controller_of, controller_prompt, p2p, plain, reweight, sample, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"


def test_inputs_are_not_mutated_and_the_model_is_a_clone(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    options_before = copy.deepcopy(model.model_options)
    latent = host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples_before = latent["samples"].clone()
    edit = swap(host, PROMPT, TARGET)
    patched, positive, out_latent = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, edit, latent, 0.8, 0.4)
    assert patched is not model and patched.model is model.model
    assert model.model_options == options_before
    assert set(latent) == {"samples"} and torch.equal(latent["samples"], samples_before)
    assert len(edit.targets) == 1
    sites = host.pack.nodes.patch.attention_sites(model)
    replace = patched.model_options["transformer_options"]["patches_replace"]
    assert set(replace["attn1"]) == set(replace["attn2"]) == set(sites) and len(sites) > 0


def test_patches_survive_clone_and_state_does_not_leak_between_runs(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    first = sample(host, patched, clip, positive, latent)
    downstream = patched.clone()  # what a LoRA loader or another patch node does
    assert controller_of(host, downstream) is controller_of(host, patched)
    assert torch.equal(sample(host, downstream, clip, positive, latent), first)
    other = sample(host, patched, clip, positive, latent, seed=11)  # a second sampler on the same model
    assert not torch.equal(other, first)
    assert torch.equal(sample(host, patched, clip, positive, latent), first)


def test_chains_to_an_attention_patch_already_on_the_model(host, load_tiny):
    """Another pack's replace patch in the same slots keeps running under the P2P patch."""
    model, clip, _ = load_tiny("sd15")
    from comfy.ldm.modules.attention import optimized_attention

    calls = {"attn1": 0, "attn2": 0}

    def scaled(kind):
        def patch(q, k, v, extra_options):
            calls[kind] += 1
            return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

        return patch

    other = model.clone()
    for site in host.pack.nodes.patch.attention_sites(model):
        other.set_model_attn1_replace(scaled("attn1"), site[0], site[1], site[2])
        other.set_model_attn2_replace(scaled("attn2"), site[0], site[1])  # a two-part key, as some packs use
    patched, positive, latent = p2p(host, other, clip, swap(host, PROMPT, PROMPT), cross=1.0, self_=1.0)
    out = sample(host, patched, clip, positive, latent)
    assert calls["attn1"] > 0 and calls["attn2"] > 0
    assert_same(out[1], out[0])  # P2P still applies
    assert_same(out[0], plain(host, other, clip, PROMPT)[0])  # so does the other patch
    assert not torch.allclose(out[0], plain(host, model, clip, PROMPT)[0], atol=1e-3)


def test_executor_runs_twice_with_cached_patched_model(host, captured):
    prompt = controller_prompt([{"class_type": "P2PWordSwap", "inputs": {"source": PROMPT, "target": TARGET}}], steps=3, negative="blurry", capture="a")
    first = host.execute(prompt)
    a = captured["a"]["samples"].clone()
    prompt[SAMPLER_ID]["inputs"]["seed"] = 2  # re-runs the sampler only; the patched MODEL comes from the cache
    host.execute(prompt, executor=first["executor"])
    prompt[SAMPLER_ID]["inputs"]["seed"] = 1
    host.execute(prompt, executor=first["executor"])
    assert torch.equal(captured["a"]["samples"], a)


@pytest.mark.parametrize(
    "make_edit, match",
    [
        (lambda h: reweight(h, "zebra", 2.0, prompt=PROMPT), r"\[P2P Reweight › words\] 'zebra' is not a word"),
        (lambda h: swap(h, PROMPT, "a photo of a big dog riding a bicycle"), r"\[P2P Word Swap › target\].*P2P Refine"),
    ],
)
def test_edits_that_do_not_fit_the_prompts_get_clear_errors(host, load_tiny, make_edit, match):
    model, clip, _ = load_tiny("sd15")
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=match):
        p2p(host, model, clip, make_edit(host))


def chained_swaps_prompt(second_target: str) -> dict:
    """Two chained Word Swaps into a controller; the controller's latent is captured."""
    return controller_prompt([
        {"class_type": "P2PWordSwap", "inputs": {"source": PROMPT, "target": TARGET}},
        {"class_type": "P2PWordSwap", "inputs": {"source": PROMPT, "target": second_target}},
    ])


@pytest.mark.parametrize(
    "second_target, failing_node, match",
    [
        ("a photo of a big dog riding a bicycle", "3", r"\[P2P Word Swap #3 › target\] .*'a photo of a big dog riding a bicycle' has 9"),
        ("a photo of a embedding:nosuchemb riding a bicycle", CONTROLLER_ID,
         r"\[P2P Word Swap #3 › target\] the embedding 'embedding:nosuchemb' in 'a photo of a embedding:nosuchemb riding a bicycle' was not found"),
    ],
)
def test_errors_name_the_chained_node_and_quote_its_target(host, captured, second_target, failing_node, match):
    """A wrong word count stops at the Word Swap that has it; a missing embedding is found when the
    controller tokenizes, and named for the node whose target has it."""
    with pytest.raises(comfy_host.ExecutionError) as error:
        host.execute(chained_swaps_prompt(second_target))
    assert error.value.details["node_id"] == failing_node
    assert re.search(match, error.value.message), error.value.message


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda h: swap(h, "  ", TARGET), r"\[P2P Word Swap › source\] the prompt is empty"),
        (lambda h: reweight(h, "cat", 2.0), r"\[P2P Reweight › prompt\] the prompt is empty"),
        (lambda h: reweight(h, " , ", 2.0, prompt=PROMPT), r"\[P2P Reweight › words\] no word given"),
        (lambda h: reweight(h, "cat: lots", 2.0, prompt=PROMPT), r"'lots' in 'cat: lots' is not a number"),
        (lambda h: reweight(h, "cat", 2.0, previous=swap(h, PROMPT, TARGET), prompt=PROMPT), r"\[P2P Reweight › prompt\]"),
        (lambda h: swap(h, "a different source", TARGET, previous=swap(h, PROMPT, TARGET)), r"\[P2P Word Swap › source\]"),
    ],
)
def test_edit_nodes_reject_bad_input(host, make, match):
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=match):
        make(host)


def test_controller_rejects_bad_input(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    controller = host.pack.NODE_CLASS_MAPPINGS["P2PController"]()
    P2PError = host.pack.p2p_attention.errors.P2PError
    edit = swap(host, PROMPT, TARGET)
    batch2 = host.nodes.EmptyLatentImage().generate(64, 64, 2)[0]
    with pytest.raises(P2PError, match=r"\[P2P Controller › latent\] the latent has a batch of 2"):
        controller.apply(model, clip, edit, batch2, 0.8, 0.4)
    latent = host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with pytest.raises(P2PError, match=r"\[P2P Controller › cross_replace_words\] 'zebra' is in no target"):
        controller.apply(model, clip, edit, latent, 0.8, 0.4, "zebra: 0.3")
    with pytest.raises(P2PError, match=r"cross_replace_words\].*outside 0..1"):
        controller.apply(model, clip, edit, latent, 0.8, 0.4, "dog: 3")
    with pytest.raises(P2PError, match=r"\[P2P Controller › cross_replace_words\] it gives 'cat' a window of 0.*would do nothing"):
        controller.apply(model, clip, reweight(host, "cat", 2.0, prompt=PROMPT), latent, 0.8, 0.4, "cat: 0")


def test_sampling_a_different_batch_is_reported(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    patched, positive, _ = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    wrong = host.nodes.EmptyLatentImage().generate(64, 64, 3)[0]
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=r"\[P2P Controller › latent\].*unchanged"):
        sample(host, patched, clip, positive, wrong)


def test_model_without_cross_attention_is_rejected(host, load_tiny):
    """A real ComfyUI UNet built without transformer blocks: nothing to edit, so a clear error."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models_base

    config = comfy.supported_models_base.BASE(
        {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
         "transformer_depth": [0, 0], "transformer_depth_output": [0, 0, 0, 0],
         "transformer_depth_middle": -2, "context_dim": None, "use_spatial_transformer": False, "num_heads": 1,
         "num_head_channels": -1, "adm_in_channels": None, "use_linear_in_transformer": False}
    )
    unet = comfy.model_base.BaseModel(config)
    model = comfy.model_patcher.ModelPatcher(unet, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=r"\[P2P Controller › model\] this model has no cross-attention"):
        p2p(host, model, load_tiny("sd15")[1], swap(host, PROMPT, TARGET))


@pytest.mark.parametrize("resolution, replaced", [("1/4 and coarser", {4, 8}), ("1/2 and coarser", {2, 4, 8})])
def test_self_attention_is_replaced_at_the_chosen_resolutions(host, load_tiny, resolution, replaced):
    """Inside the window a target attends with the source's queries and keys exactly at the layers
    whose maps are the chosen size relative to the latent, or coarser."""
    model, clip, _ = load_tiny("sd15")
    latent = host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    with torch.inference_mode():
        patched = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(
            model, clip, swap(host, "a cat", "a dog"), latent, 0.8, 0.4, "", resolution)[0]
    controller = controller_of(host, patched)
    q, k, v = torch.randn(3, 2, 1, 16, 8).unbind(0)  # [images, heads, tokens, dim]
    for downscale in (1, 2, 4, 8):
        call = host.pack.p2p_attention.controller.AttentionCall(
            heads=1, sigma=1e6, chunks=(True,), downscale=downscale, map_size=(4, 4), queries=slice(0, 16), text=None, image_keys=slice(0, 16))
        seen = []
        controller.attention(q, k, v, call, lambda q_, k_, v_, mask, rows: seen.append((q_, k_)) or v_)
        took_source = torch.equal(seen[0][0][1], q[0]) and torch.equal(seen[0][1][1], k[0])
        assert took_source == (downscale in replaced), downscale


def test_a_sampler_wired_to_other_inputs_is_reported(host, load_tiny):
    """The controller knows what it made: a sampler given another positive or another latent would
    silently give the source (or differently noised images), so the first step stops with the socket."""
    model, clip, _ = load_tiny("sd15")
    P2PError = host.pack.p2p_attention.errors.P2PError
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    with torch.inference_mode():
        plain_positive = host.nodes.CLIPTextEncode().encode(clip, TARGET)[0]
        other_latent = host.nodes.EmptyLatentImage().generate(64, 64, 2)[0]
    with pytest.raises(P2PError, match=r"\[P2P Controller › positive\] .*plain CLIP Text Encode.* Fix: connect the P2P Controller's positive"):
        sample(host, patched, clip, plain_positive, latent)
    with pytest.raises(P2PError, match=r"\[P2P Controller › latent\] .*one noise.* Fix: connect the P2P Controller's latent output"):
        sample(host, patched, clip, positive, other_latent)
    # Stock nodes that copy the conditioning (a timestep range, a ControlNet) keep it the controller's.
    with torch.inference_mode():
        ranged = host.nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 1.0)[0]
    assert torch.isfinite(sample(host, patched, clip, ranged, latent)).all()


def test_an_inverted_latent_needs_the_invert_nodes_model(host, load_tiny):
    model, clip, vae = load_tiny("sd15")
    with torch.inference_mode():
        image = host.nodes.VAEEncode().encode(vae, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))[0]
        cond = host.nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        inverted, inverting_model, _ = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]().invert(
            model, cond, cond, image, 2, 1.0, "normal", "ddim", 1, 0.0)
        controller = host.pack.NODE_CLASS_MAPPINGS["P2PController"]()
        controller.apply(inverting_model, clip, swap(host, PROMPT, TARGET), inverted, 0.8, 0.4)  # as wired by the workflow
        with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=r"\[P2P Controller › model\] the latent comes from P2P DDIM Invert"):
            controller.apply(model, clip, swap(host, PROMPT, TARGET), inverted, 0.8, 0.4)
