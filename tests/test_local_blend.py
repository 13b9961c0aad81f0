"""Local Blend on the real host: the region follows the words' attention, and outside it the edited
images are the source."""
from __future__ import annotations

import pytest
import torch

from p2p_helpers import MapRecorder, assert_same, controller_of, edits, p2p, reweight, sample, steer_attention, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
# Samplers whose last step returns the (blended) denoised prediction: exact outside the mask.
EXACT = ("euler", "ddim", "heun", "dpmpp_2m", "dpm_2")
SIZE = 256  # 8x8 maps at the 1/4 layers: enough room for a region and an outside
CAT = 5  # the column of "cat" (and of "dog") after the start token: a photo of a cat


@pytest.fixture(scope="module")
def steered(host, load_tiny):
    """(model, clip) where "cat" / "dog" take the attention in the top-left quarter of every map."""
    cache = {}

    def load(kind: str = "sd15") -> tuple:
        if kind not in cache:
            model, clip, _ = load_tiny(kind)
            cache[kind] = steer_attention(host, model, CAT), clip
        return cache[kind]

    return load


def known_region(latent_size: tuple[int, int], downscale: int = 4) -> torch.Tensor:
    """The steered quarter of the maps the blend uses, grown by the 3x3 max-pool, at latent size."""
    h, w = -(-latent_size[0] // downscale), -(-latent_size[1] // downscale)
    cells = torch.zeros(h, w)
    cells[: h // 2 + 1, : w // 2 + 1] = 1
    return torch.nn.functional.interpolate(cells[None, None], size=latent_size, mode="nearest")[0, 0]


def blended(host, edit, source_words="cat", target_words="dog", subtract="", threshold=0.3, start=0.2, mask=None, combine="union"):
    return edits(host).local_blend(edit, source_words, target_words, subtract, threshold, start, mask, combine, "P2P Local Blend")


def final_mask(host, patched) -> torch.Tensor:
    run = controller_of(host, patched).maps.runs[-1]
    return run.blend_mask


def assert_outside_is_source(out: torch.Tensor, masks: torch.Tensor) -> None:
    """Every target equals the source wherever its final mask is 0, and differs inside it."""
    assert bool((masks == 0).any()) and bool((masks > 0).any()), "the test needs a mask with an inside and an outside"
    for target, mask in zip(out[1:], masks):
        outside = (mask == 0)[None].expand_as(target)
        if outside.any():
            assert_same(target[outside], out[0][outside])
        assert not torch.allclose(target[~outside], out[0][~outside], atol=1e-3)


@pytest.mark.parametrize("sampler", EXACT)
def test_outside_the_mask_the_target_is_the_source(host, steered, sampler):
    model, clip = steered()
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET)), size=SIZE)
    scheduler = "ddim_uniform" if sampler == "ddim" else "normal"
    out = sample(host, patched, clip, positive, latent, sampler=sampler, scheduler=scheduler, steps=5)
    assert_outside_is_source(out, final_mask(host, patched))


@pytest.mark.parametrize("kind, size", [("sd2v", (192, 256)), ("sdxl", (256, 192))])
def test_blend_for_every_architecture_and_aspect_ratio(host, steered, kind, size):
    model, clip = steered(kind)
    latent = host.nodes.EmptyLatentImage().generate(size[1], size[0], 1)[0]
    with torch.inference_mode():
        patched, positive, latent = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(
            model, clip, blended(host, swap(host, PROMPT, TARGET)), latent, 0.8, 0.4
        )
    out = sample(host, patched, clip, positive, latent, steps=5)
    masks = final_mask(host, patched)
    # The tiny SD2.x model has no 1/4 layers: the blend uses the nearest resolution it has.
    downscale = controller_of(host, patched).maps.runs[-1].nearest_downscale(4)
    assert downscale == {"sd2v": 2, "sdxl": 4}[kind]
    assert torch.equal(masks[0], known_region((size[0] // 8, size[1] // 8), downscale))
    assert_outside_is_source(out, masks)


def test_the_region_is_where_the_words_attend(host, steered):
    model, clip = steered()
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET)), size=SIZE)
    sample(host, patched, clip, positive, latent, steps=5)
    assert torch.equal(final_mask(host, patched)[0], known_region((SIZE // 8, SIZE // 8)))
    # Another word's region is elsewhere: the blend follows the words it is given.
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET), "bicycle", "bicycle"), size=SIZE)
    sample(host, patched, clip, positive, latent, steps=5)
    assert not torch.equal(final_mask(host, patched)[0], known_region((SIZE // 8, SIZE // 8)))


def test_several_targets_refine_and_reweight_each_get_their_own_region(host, steered):
    model, clip = steered()
    edit = swap(host, PROMPT, TARGET)
    edit = edits(host).add_target(edit, PROMPT, "a photo of a cat riding a red bicycle", edits(host).REFINE, "P2P Refine")
    edit = reweight(host, "red", 3.0, previous=edit)
    edit = blended(host, edit, source_words="cat", target_words="dog, red")
    patched, positive, latent = p2p(host, model, clip, edit, size=SIZE)
    out = sample(host, patched, clip, positive, latent, steps=5)
    masks = final_mask(host, patched)
    assert masks.shape == (2, SIZE // 8, SIZE // 8)
    assert not torch.equal(masks[0], masks[1])
    assert_outside_is_source(out, masks)


def test_mask_is_the_thresholded_pooled_map_of_the_words(host, load_tiny):
    """The blend region recomputed from every recorded map of the run: source 'cat' or target 'dog'
    attention above 0.3 of its maximum, at the 1/4 layers, after a 3x3 max-pool."""
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET)), size=SIZE)
    controller = controller_of(host, patched)
    recorder = MapRecorder()
    controller.recorders.append(recorder)
    sample(host, patched, clip, positive, latent, steps=4)
    coarse = [(call, maps) for call, maps in recorder.calls if call.downscale == 4]
    assert coarse, "the tiny SD1.x model has layers at 1/4 of the latent"
    h, w = coarse[0][0].map_size
    words = {"cat": (0, controller.plan.source), "dog": (1, controller.plan.targets[0].tokens)}
    regions = []
    for word, (image, tokens) in words.items():
        column = [t.text for t in tokens.tokens].index(word)
        average = torch.stack([maps[image, :, column] for _, maps in coarse]).mean(0).reshape(1, 1, h, w)
        pooled = torch.nn.functional.max_pool2d(average, 3, stride=1, padding=1)
        upsampled = torch.nn.functional.interpolate(pooled, size=(SIZE // 8, SIZE // 8), mode="nearest")[0, 0]
        regions.append(upsampled / upsampled.max() > 0.3)
    expected = (regions[0] | regions[1]).float()
    assert torch.equal(final_mask(host, patched)[0], expected)


def test_subtract_words_are_cut_out(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    plain_blend = blended(host, swap(host, PROMPT, TARGET), threshold=0.1)
    cut_blend = blended(host, swap(host, PROMPT, TARGET), threshold=0.1, subtract="bicycle")
    masks = []
    for edit in (plain_blend, cut_blend):
        patched, positive, latent = p2p(host, model, clip, edit, size=SIZE)
        sample(host, patched, clip, positive, latent, steps=4)
        masks.append(final_mask(host, patched))
    assert bool((masks[1] <= masks[0]).all()) and masks[1].sum() < masks[0].sum()


def test_a_user_mask_alone_and_combined(host, steered):
    model, clip = steered()
    painted = torch.zeros(1, SIZE, SIZE)
    painted[:, :, : SIZE // 2] = 1.0  # the left half of the image
    alone = blended(host, swap(host, PROMPT, TARGET), source_words="", target_words="", mask=painted)
    patched, positive, latent = p2p(host, model, clip, alone, size=SIZE)
    out = sample(host, patched, clip, positive, latent, steps=5)
    masks = final_mask(host, patched)
    assert torch.equal(masks[0], painted[0, ::8, ::8])
    assert_outside_is_source(out, masks)
    combined = {}
    for combine in ("union", "intersect", None):
        edit = blended(host, swap(host, PROMPT, TARGET), mask=painted if combine else None, combine=combine or "union")
        patched, positive, latent = p2p(host, model, clip, edit, size=SIZE)
        sample(host, patched, clip, positive, latent, steps=5)
        combined[combine] = final_mask(host, patched)[0]
    half = painted[0, ::8, ::8]
    assert torch.equal(combined["union"], torch.maximum(combined[None], half))
    assert torch.equal(combined["intersect"], torch.minimum(combined[None], half))


def test_blend_starts_at_start_blend(host, load_tiny):
    model, clip, _ = load_tiny("sd15")
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET), start=1.0))
    out = sample(host, patched, clip, positive, latent, steps=4)
    assert final_mask(host, patched) is None  # never started: a plain swap
    reference_model, positive, latent = p2p(host, model, clip, swap(host, PROMPT, TARGET))
    assert_same(out, sample(host, reference_model, clip, positive, latent, steps=4))


def test_blend_with_the_shared_noise_sampler(host, steered):
    model, clip = steered()
    patched, positive, latent = p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET)), size=SIZE)
    nodes = host.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        negative = host.nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        sampler = host.pack.NODE_CLASS_MAPPINGS["P2PSampler"]().wrap(nodes["KSamplerSelect"]().get_sampler("euler_ancestral")[0])[0]
        sigmas = nodes["BasicScheduler"]().get_sigmas(patched, "karras", 5, 1.0)[0]
        out = nodes["SamplerCustom"]().sample(patched, True, 5, 7.0, positive, negative, sampler, sigmas, latent)[0]["samples"]
    assert_outside_is_source(out, final_mask(host, patched))


@pytest.mark.parametrize(
    "kwargs, input_name",
    [
        ({"source_words": "", "target_words": ""}, "source_words"),
        ({"source_words": "horse"}, "source_words"),
        ({"target_words": "horse"}, "target_words"),
        ({"subtract": "horse"}, "subtract_words"),
    ],
)
def test_clear_errors(host, load_tiny, kwargs, input_name):
    model, clip, _ = load_tiny("sd15")
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=rf"\[P2P Local Blend › {input_name}\]"):
        p2p(host, model, clip, blended(host, swap(host, PROMPT, TARGET), **kwargs))


def test_one_blend_per_edit(host):
    edit = blended(host, swap(host, PROMPT, TARGET))
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match="already has a local blend"):
        blended(host, edit)
