"""P2P on a model that already carries another attention patch: stock Self-Attention Guidance.

SelfAttentionGuidance (comfy_extras/nodes_sag.py, in the 2024 host and in current ComfyUI) puts an
attn1 replace patch on ("middle", 0, 0), one of the slots P2P patches, and a post-CFG function that
runs the UNet once more per step. Its post-CFG function fails without the attention it records in
that patch, so a P2P patch that dropped it would not even run; these tests also check that both
patches change the result and that P2P's guarantees (the source row is untouched) still hold.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from p2p_helpers import assert_same, p2p, plain, sample, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
MIDDLE = ("middle", 0, 0)


def self_attention_guidance(host: Any, model: Any) -> Any:
    """The stock node's output: a classic node in the 2024 host, a V3 node (classmethod ``execute``
    returning a NodeOutput) in current ComfyUI."""
    node = host.nodes.NODE_CLASS_MAPPINGS["SelfAttentionGuidance"]
    arguments = {"model": model, "scale": 1.0, "blur_sigma": 2.0}
    if hasattr(node, "execute"):
        return node.execute(**arguments).result[0]
    return node().patch(**arguments)[0]


def attn1_replace(model: Any) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn1"]


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-3 * max(1.0, float(b.abs().max())))


def p2p_run(host: Any, model: Any, clip: Any, target: str) -> tuple:
    """(model, clip, positive, latent) for ``sample``: a word swap from PROMPT to ``target``."""
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, target))
    return patched, clip, positive, latent


def test_p2p_chains_to_the_self_attention_guidance_patch(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    sag = self_attention_guidance(host, model)
    patched, _, _ = p2p(host, sag, clip, swap(host, PROMPT, TARGET))
    assert attn1_replace(patched)[MIDDLE].previous is attn1_replace(sag)[MIDDLE]


def test_both_patches_act_and_the_source_row_is_kept(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    sag = self_attention_guidance(host, model)
    both = sample(host, *p2p_run(host, sag, clip, TARGET))
    p2p_only = sample(host, *p2p_run(host, model, clip, TARGET))
    sag_source = plain(host, sag, clip, PROMPT)[0]
    assert_same(both[0], sag_source)  # P2P leaves the source image alone; guidance still shapes it
    assert differs(both[0], p2p_only[0])  # guidance acts under P2P
    assert differs(both[1], p2p_only[1])
    assert differs(both[1], plain(host, sag, clip, TARGET)[0])  # the edit acts under guidance


def test_identity_edit_still_reproduces_the_source_under_guidance(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    sag = self_attention_guidance(host, model)
    patched, positive, latent = p2p(host, sag, clip, swap(host, PROMPT, PROMPT), cross=1.0, self_=1.0)
    out = sample(host, patched, clip, positive, latent)
    assert_same(out[1], out[0])


def stock_patch(host: Any, name: str, model: Any, **arguments: Any) -> Any:
    """A stock model patch node's output: classic in the 2024 host, V3 (``execute``) in current ComfyUI."""
    node = host.nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(node, "execute"):
        output = node.execute(model=model, **arguments)
        return getattr(output, "result", output)[0]
    return getattr(node(), node.FUNCTION)(model=model, **arguments)[0]


@pytest.mark.parametrize("name, arguments", [
    ("TomePatchModel", {"ratio": 0.5}),
    ("TomePatchModel", {"ratio": 1.0}),  # a quarter of the queries left: the size of the next coarser map
    ("HyperTile", {"tile_size": 32, "swap_size": 1, "max_depth": 0, "scale_depth": False}),
])
def test_token_merging_and_hypertile_leave_full_size_self_attention_to_their_patch(host, load_tiny, name, arguments):
    """The tiny SD2 model has attention at the latent's full size, where these patches merge or tile
    the self-attention's tokens: P2P leaves those layers to them and still edits."""
    model, clip, _ = load_tiny("sd2v")
    patched_model = stock_patch(host, name, model, **arguments)
    patched, positive, latent = p2p(host, patched_model, clip, swap(host, PROMPT, PROMPT), cross=1.0, self_=1.0)
    out = sample(host, patched, clip, positive, latent)
    assert torch.isfinite(out).all()
    assert_same(out[1], out[0])  # an identity edit still reproduces the source under the patch
    assert_same(out[0], plain(host, patched_model, clip, PROMPT)[0])  # P2P leaves the (patched) source alone
    assert differs(out[0], plain(host, model, clip, PROMPT)[0])  # and the patch acts
    edited = sample(host, *p2p_run(host, patched_model, clip, TARGET))
    assert differs(edited[1], edited[0])
