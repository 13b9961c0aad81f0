"""Prompt-to-Prompt on DiT models with joint attention (v0.3.75): tiny Flux.1 dev and schnell, Chroma,
SD3.5 (MMDiT-X), Qwen-Image and Flux.2 in ComfyUI's real architectures, with their real tokenizers.

The same controller as for UNets: the edit reaches the joint attention through the attention override;
these tests check the mechanism exactly, as test_p2p_sampling does for UNets.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tiny_dit_models
from p2p_helpers import MapRecorder, assert_same, controller_of, edits, p2p, plain, refine, reweight, sample, swap

KINDS = ("flux_dev", "flux_schnell", "chroma", "sd35", "qwen_image", "flux2")
PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
LONG = "a photo of a hippopotamus riding a bicycle"  # more tokens than "cat" in every tokenizer
SIZE = 64


def guidance(kind: str) -> dict:
    """Flux.1 dev and Flux.2 are guidance-distilled: cfg 1, no unconditional branch; the others use cfg 3."""
    return {"cfg": 1.0 if kind in tiny_dit_models.DISTILLED else 3.0}


@pytest.fixture(params=KINDS)
def dit(request: Any, load_tiny_dit: Any) -> tuple[str, Any, Any]:
    model, clip, _ = load_tiny_dit(request.param)
    return request.param, model, clip


def run(host: Any, kind: str, model: Any, clip: Any, edit: Any, cross: float, self_: float, steps: int = 3) -> tuple[Any, torch.Tensor]:
    patched, positive, latent = p2p(host, model, clip, edit, cross=cross, self_=self_, size=SIZE)
    return patched, sample(host, patched, clip, positive, latent, steps=steps, **guidance(kind))


def test_identity_edit_reproduces_the_source_and_a_plain_run(host, dit):
    kind, model, clip = dit
    _, out = run(host, kind, model, clip, reweight(host, "cat", 1.0, previous=swap(host, PROMPT, PROMPT)), 1.0, 1.0)
    assert_same(out[1], out[0])
    assert_same(out[0], plain(host, model, clip, PROMPT, size=SIZE, steps=3, **guidance(kind))[0])


def test_zero_windows_are_plain_generations_of_each_prompt(host, dit):
    """Also for prompts of different token counts: the shorter prompt's padding is masked out (Flux.2:
    it is the zeros the model pads the text with, before the prompt)."""
    kind, model, clip = dit
    _, out = run(host, kind, model, clip, swap(host, PROMPT, LONG), 0.0, 0.0)
    assert_same(out[0], plain(host, model, clip, PROMPT, size=SIZE, steps=3, **guidance(kind))[0])
    assert_same(out[1], plain(host, model, clip, LONG, size=SIZE, steps=3, **guidance(kind))[0])


def test_flux2_prompts_past_its_512_tokens_are_plain_generations_of_each_prompt(host, load_tiny_dit):
    """Flux.2 pads the text on the left to 512 tokens only where it is shorter: beside a prompt past
    that, a short prompt keeps the model's zeros and positions it has alone, and the rest is masked."""
    model, clip, _ = load_tiny_dit("flux2")
    longest = PROMPT + " in a town" + ", and a red house" * 130  # with the template, past 512 tokens
    patched, out = run(host, "flux2", model, clip, refine(host, PROMPT, longest), 0.0, 0.0)
    assert [len(p) > 512 for p in controller_of(host, patched).plan.prompts] == [False, True]
    assert_same(out[0], plain(host, model, clip, PROMPT, size=SIZE, steps=3, **guidance("flux2"))[0])
    assert_same(out[1], plain(host, model, clip, longest, size=SIZE, steps=3, **guidance("flux2"))[0])


def test_a_swap_changes_the_target_and_keeps_its_composition(host, dit):
    kind, model, clip = dit
    _, out = run(host, kind, model, clip, swap(host, PROMPT, TARGET), 0.8, 0.4)
    assert_same(out[0], plain(host, model, clip, PROMPT, size=SIZE, steps=3, **guidance(kind))[0])  # the source is untouched
    assert not torch.allclose(out[1], out[0], atol=1e-4)
    plain_target = plain(host, model, clip, TARGET, size=SIZE, steps=3, **guidance(kind))[0]
    assert (out[1] - out[0]).abs().mean() < (plain_target - out[0]).abs().mean()


def test_reweight_by_one_is_a_no_op(host, dit):
    kind, model, clip = dit
    _, out = run(host, kind, model, clip, reweight(host, "cat, bicycle", 1.0, prompt=PROMPT), 1.0, 0.0)
    assert_same(out[1], out[0])
    _, scaled = run(host, kind, model, clip, reweight(host, "cat", 4.0, prompt=PROMPT), 1.0, 0.0)
    assert not torch.allclose(scaled[1], scaled[0], atol=1e-4)  # a real reweight does act


def test_maps_of_every_image_row_sum_to_one_over_its_tokens(host, dit):
    kind, model, clip = dit
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, LONG), cross=0.8, self_=0.4, size=SIZE)
    recorder = MapRecorderPerImage()
    controller_of(host, patched).recorders.append(recorder)
    sample(host, patched, clip, positive, latent, steps=2, **guidance(kind))
    assert recorder.calls, "the controller saw no joint attention call"
    sources = {call.site for call, _ in recorder.calls}
    assert len(sources) > 1  # every block reports
    for call, maps in recorder.calls:
        assert call.transformer and call.map_size == (SIZE // 16, SIZE // 16)
        for image_maps, prompt in zip(maps, controller_of(host, patched).plan.prompts):
            assert image_maps.shape == (call.map_size[0] * call.map_size[1], len(prompt))
            torch.testing.assert_close(image_maps.sum(dim=-1), torch.ones(image_maps.shape[0]), atol=1e-4, rtol=0)


def test_full_replacement_maps_equal_the_mapped_source_maps(host, dit):
    """With a map that keeps every token's attention (equal token counts) the target's maps are the
    source's, mapped; the test_maps one checks unequal counts."""
    kind, model, clip = dit
    patched, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET), cross=1.0, self_=0.0, size=SIZE)
    controller = controller_of(host, patched)
    recorder = MapRecorderPerImage()
    controller.recorders.append(recorder)
    sample(host, patched, clip, positive, latent, steps=2, **guidance(kind))
    matrix = controller.plan.targets[0].token_map.matrix
    assert torch.equal(matrix.sum(dim=1), torch.ones(matrix.shape[0]))
    for _, (source, target) in recorder.calls:
        torch.testing.assert_close(target, source @ matrix, atol=1e-5, rtol=1e-4)


def test_refine_keeps_the_new_words_own_maps(host, load_tiny_dit):
    model, clip, _ = load_tiny_dit("flux_schnell")
    patched, positive, latent = p2p(host, model, clip, refine(host, "a castle", "a gothic castle at night"), cross=1.0, self_=0.0, size=SIZE)
    controller = controller_of(host, patched)
    recorder = MapRecorderPerImage()
    controller.recorders.append(recorder)
    out = sample(host, patched, clip, positive, latent, steps=2, cfg=3.0)
    new = ~controller.plan.targets[0].token_map.from_source
    assert int(new.sum()) >= 3  # gothic, at, night (T5 may split them)
    for _, (_, target) in recorder.calls:
        assert bool((target[:, new] > 0).all())
    assert not torch.allclose(out[1], out[0], atol=1e-4)


@pytest.mark.parametrize("kind", ("flux_dev", "flux2"))
def test_blend_keeps_the_outside_exactly(host, load_tiny_dit, kind):
    model, clip, _ = load_tiny_dit(kind)
    edit = edits(host).local_blend(swap(host, PROMPT, TARGET), "cat", "dog", "", 0.5, 0.0, None, "union", "P2P Local Blend")
    patched, out = run(host, kind, model, clip, edit, 0.8, 0.4, steps=4)
    masks = controller_of(host, patched).maps.runs[-1].blend_mask
    assert bool((masks == 0).any()) and bool((masks > 0).any())
    outside = (masks[0] == 0)[None].expand_as(out[1])
    assert_same(out[1][outside], out[0][outside])
    assert not torch.allclose(out[1][~outside], out[0][~outside], atol=1e-4)


def test_flux2_maps_show_the_prompt_and_not_its_system_prompt(host, load_tiny_dit):
    """Flux.2 attends to its whole template; P2P Attention Maps shows its first token, the prompt's
    words and the end of the instruction, not the 28 tokens of the system prompt."""
    model, clip, _ = load_tiny_dit("flux2")
    patched, _ = run(host, "flux2", model, clip, swap(host, PROMPT, TARGET), 0.8, 0.4, steps=2)
    controller = controller_of(host, patched)
    source = controller.plan.source
    assert sum(t.role == "start" for t in source.tokens) == 32  # <s>, [SYSTEM_PROMPT], 28 tokens, [/SYSTEM_PROMPT], [INST]
    maps = controller.maps.runs[-1].mean(1)[0]
    labels = [label for label, _ in host.pack.nodes.maps_node.token_maps(maps, source, [])]
    assert labels == ["<s>", *PROMPT.split(), "[/INST]"]


class TemperatureOverride:
    """Another pack's attention override (as SageAttention nodes set one): sharper attention."""

    def __init__(self) -> None:
        self.calls = 0

    def __deepcopy__(self, memo: dict) -> "TemperatureOverride":  # model clones share it, as a function
        return self

    def __call__(self, func: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return func(q * 1.5, k, v, heads, *args, **kwargs)


def test_chains_to_another_attention_override(host, load_tiny_dit):
    model, clip, _ = load_tiny_dit("flux_schnell")
    other = TemperatureOverride()
    with_other = model.clone()
    with_other.model_options["transformer_options"]["optimized_attention_override"] = other
    _, out = run(host, "flux_schnell", with_other, clip, swap(host, PROMPT, PROMPT), 0.8, 0.4)
    assert other.calls > 0
    assert_same(out[1], out[0])  # P2P's identity still holds with the other override underneath
    assert_same(out[0], plain(host, with_other, clip, PROMPT, size=SIZE, steps=3, cfg=3.0)[0])  # and the other one acts
    assert not torch.allclose(out[0], plain(host, model, clip, PROMPT, size=SIZE, steps=3, cfg=3.0)[0], atol=1e-4)


def test_the_text_is_aligned_per_encoder_in_sd3(host, load_tiny_dit):
    """SD3 attends to the CLIP tokens, then the T5 tokens: a word is swapped in both, each within its own."""
    _, clip, _ = load_tiny_dit("sd35")
    tokens = host.pack.nodes.tokenize.prompt_tokens
    source, target = tokens(clip, PROMPT), tokens(clip, LONG)
    assert [s.length for s in source.segments] == [77, 77]
    m = host.pack.p2p_attention.alignment.word_swap_map(source, target)
    clip_part, t5_part = slice(0, 77), slice(77, 154)
    assert float(m.matrix[clip_part, t5_part].abs().sum()) == 0 and float(m.matrix[t5_part, clip_part].abs().sum()) == 0
    cat, hippo = source.find("cat"), target.find("hippopotamus")
    assert len(cat) == 2 and len(hippo) > 2  # once per encoder
    assert {p // 77 for p in hippo} == {0, 1}


@pytest.mark.parametrize("kind", ("flux_dev", "qwen_image", "chroma", "flux2"))
def test_words_are_typed_words_in_every_tokenizer(host, load_tiny_dit, kind):
    _, clip, _ = load_tiny_dit(kind)
    prompt = host.pack.nodes.tokenize.prompt_tokens(clip, "A T-Rex, at 5pm on a mat")
    assert prompt.words == ("A", "T-Rex,", "at", "5pm", "on", "a", "mat")
    words = [{prompt.tokens[p].word for p in prompt.find(w)} for w in ("t-rex", "5pm", "mat")]
    assert words == [{1}, {3}, {6}]
    assert all(t.word >= 0 for t in prompt.tokens if t.role == "word")


class LargestTensor(TorchDispatchMode):
    """Watches every tensor that ATen operations return (observing, not replacing them): the largest,
    in elements, outside ``paused`` blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.recording = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.recording:
            self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


class FusedKernel:
    """An attention override under P2P's (as another pack's): the model's own fused attention runs
    inside it, unwatched; it keeps the shapes of the queries and keys it is given."""

    def __init__(self, watch: LargestTensor) -> None:
        self.watch = watch
        self.shapes: list[tuple] = []

    def __deepcopy__(self, memo: dict) -> "FusedKernel":
        return self

    def __call__(self, func: Any, q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.shapes.append((tuple(q.shape), tuple(k.shape)))
        with self.watch.paused():
            return func(q, k, *args, **kwargs)


def test_the_joint_attention_matrix_is_never_formed(host, load_tiny_dit):
    """A Flux double block's joint attention at 1024x1024 (a 64x64 token grid after the text), called
    as the block calls it, with a swap inside both replace windows. Apart from the model's fused
    kernel, no tensor the edit builds holds every head's image-to-text probabilities at once (they
    are formed a block of queries at a time), let alone one head's image-query x joint-key matrix;
    the text's share of the joint softmax comes from the fused call over the whole joint sequence."""
    from comfy.ldm.modules.attention import optimized_attention

    model, clip, _ = load_tiny_dit("flux_dev")
    watch = LargestTensor()
    kernel = FusedKernel(watch)
    underneath = model.clone()
    underneath.model_options["transformer_options"]["optimized_attention_override"] = kernel
    patched, _, _ = p2p(host, underneath, clip, swap(host, PROMPT, TARGET), cross=0.8, self_=0.4, size=1024)
    controller = controller_of(host, patched)
    patch = host.pack.nodes.patch
    text, grid, heads, dim = controller.columns_width, (64, 64), 4, 16
    image = grid[0] * grid[1]
    options = {
        **patched.model_options["transformer_options"],
        patch.LAYOUT_KEY: patch.TokenLayout(grid=grid, patch=2, text=text),
        "cond_or_uncond": [0],  # Flux.1 dev: the conditional branch alone
        "sigmas": torch.tensor([1.0]),  # the first step: inside every window
        "block_type": "double",
        "block_index": 0,
    }
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(controller.images, heads, text + image, dim, generator=generator) for _ in range(3))
    with watch:
        out = optimized_attention(q, k, v, heads, skip_reshape=True, transformer_options=options)
    every_head_to_text, one_head_joint = heads * image * text, image * (text + image)
    assert one_head_joint > every_head_to_text
    assert 0 < watch.largest < every_head_to_text, f"the edit built a tensor of {watch.largest} elements"
    assert kernel.shapes and all(qs[2] == ks[2] == text + image for qs, ks in kernel.shapes)  # the fused calls see the whole joint sequence
    plain_out = optimized_attention(q, k, v, heads, skip_reshape=True)
    assert not torch.allclose(out[1:, text:], plain_out[1:, text:], atol=1e-4)  # the edit acted on the targets' image queries
    with watch:  # the watch does see a joint matrix when one is formed
        (q[0, 0, text:] @ k[0, 0].T).softmax(dim=-1)
    assert watch.largest == one_head_joint


# Tiny configs of real families this pack does not edit, by ComfyUI config class: Lumina 2 (a DiT,
# v0.3.75) and Stable Cascade's stage C (no UNet blocks; present in both hosts).
UNSUPPORTED = {
    "Lumina2": {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32, "n_layers": 1,
                "n_heads": 2, "n_kv_heads": 2, "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "qk_norm": True, "rope_theta": 10000.0},
    "Stable_Cascade_C": {"stable_cascade_stage": "c", "c_r": 8, "c_cond": 32, "c_hidden": [32, 32], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
                         "block_repeat": [[1, 1], [1, 1]], "c_clip_text": 32, "c_clip_text_pooled": 32, "c_clip_img": 32},
}


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_families_are_named(host, load_tiny, family):
    """A real (tiny) model of a family this pack does not edit: the error names its model class and the supported families."""
    import comfy.model_patcher
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, family, None)
    if config_class is None:
        pytest.skip(f"this ComfyUI ({host.version}) has no {family} models")
    model = config_class(UNSUPPORTED[family]).get_model({})
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    named = rf"\[P2P Controller › model\] {type(model).__name__} models are not supported.*SDXL.*Flux\.1.*Qwen-Image"
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=named):
        p2p(host, patcher, load_tiny("sd15")[1], swap(host, PROMPT, TARGET))


class MapRecorderPerImage(MapRecorder):
    """The controller's per-image maps as they come (prompts of different token counts)."""

    def record(self, call: Any, rows: slice, maps: list[torch.Tensor]) -> None:
        if rows.start == 0:
            self.calls.append((call, [m.clone() for m in maps]))
        else:  # the call's next block of queries
            self.calls[-1] = (call, [torch.cat([kept, m]) for kept, m in zip(self.calls[-1][1], maps)])
