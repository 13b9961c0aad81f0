"""P2P Attention Maps on the real host: what is collected, how it is rendered, which run it shows."""
from __future__ import annotations

import pytest
import torch

from p2p_helpers import MapRecorder, controller_of, p2p, sample, steer_attention, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
CAT = 5
SIZE = 256


def render(host, model, samples, words="", resolution="1/4", images=None):
    with torch.inference_mode():
        return host.pack.NODE_CLASS_MAPPINGS["P2PAttentionMaps"]().render(model, {"samples": samples}, words, resolution, images)[0]


@pytest.fixture(scope="module")
def edited_run(host, load_tiny):
    """A swap on the steered tiny SD1.x model, with every map the controller reports kept aside."""
    model, clip, _ = load_tiny("sd15")
    steered = steer_attention(host, model, CAT)
    patched, positive, latent = p2p(host, steered, clip, swap(host, PROMPT, TARGET), size=SIZE)
    recorder = MapRecorder()
    controller_of(host, patched).recorders.append(recorder)
    out = sample(host, patched, clip, positive, latent, steps=4)
    return patched, clip, positive, latent, out, recorder


def test_maps_are_the_average_over_heads_layers_and_steps(host, edited_run):
    patched, _, _, _, out, recorder = edited_run
    run = controller_of(host, patched).maps.runs[-1]
    assert set(run.sums) == {2, 4}  # the tiny SD1.x model's cross-attention resolutions
    for downscale, maps in ((d, run.mean(d)) for d in run.sums):
        calls = [probs for call, probs in recorder.calls if call.downscale == downscale]
        expected = torch.stack(calls).mean(dim=0)
        h, w = SIZE // 8 // downscale, SIZE // 8 // downscale
        for image, image_maps in enumerate(maps):
            assert image_maps.shape == (77, h, w)
            torch.testing.assert_close(image_maps, expected[image].T.reshape(77, h, w), atol=1e-6, rtol=1e-5)
            # Softmax over the tokens, averaged: every pixel's attention sums to one.
            torch.testing.assert_close(image_maps.sum(dim=0), torch.ones(h, w), atol=1e-5, rtol=0)


def test_the_grid_shows_each_token_normalised(host, edited_run):
    patched, _, _, _, out, _ = edited_run
    grids = render(host, patched, out)
    maps_node = host.pack.nodes.maps_node
    tokens = controller_of(host, patched).plan.source
    shown = [t for t in tokens.tokens if t.role != "pad"]
    assert len(shown) == 10  # start, 8 words, end
    assert [t.text for t in shown] == ["<|startoftext|>", *PROMPT.split(), "<|endoftext|>"]
    columns = min(maps_node.COLUMNS, len(shown))
    rows = -(-len(shown) // columns)
    assert grids.shape == (2, maps_node.LABEL + rows * (maps_node.TILE + maps_node.LABEL), columns * maps_node.TILE, 3)
    assert 0 <= float(grids.min()) and float(grids.max()) <= 1
    # The steered "cat" tile: the normalised map, bright in the top-left quarter only.
    run = controller_of(host, patched).maps.runs[-1]
    cat = run.mean(4)[0][CAT]
    expected = torch.nn.functional.interpolate(cat[None, None], size=(maps_node.TILE,) * 2, mode="bilinear", align_corners=False)[0, 0]
    expected = expected / expected.max()
    x, y = (CAT % columns) * maps_node.TILE, maps_node.LABEL + (CAT // columns) * (maps_node.TILE + maps_node.LABEL)
    tile = grids[0, y : y + maps_node.TILE, x : x + maps_node.TILE, 0]
    torch.testing.assert_close(tile, expected, atol=1 / 255, rtol=0)
    quarter = maps_node.TILE // 2 - 16
    assert float(tile[:quarter, :quarter].min()) > 0.8 and float(tile[-quarter:, -quarter:].max()) < 0.3


def test_chosen_words_overlay_and_resolution(host, edited_run):
    patched, _, _, _, out, _ = edited_run
    grey = render(host, patched, out, words="cat, dog, riding a bicycle", resolution="1/2")
    # Each image shows the chosen words it has: cat (or dog) and the phrase.
    assert grey.shape[2] == 2 * host.pack.nodes.maps_node.TILE
    images = torch.rand(2, SIZE, SIZE, 3)
    overlaid = render(host, patched, out, words="cat, dog, riding a bicycle", resolution="1/2", images=images)
    assert overlaid.shape == grey.shape and not torch.allclose(overlaid, grey)


def test_maps_come_from_the_run_that_made_the_samples(host, edited_run):
    patched, clip, positive, latent, first, _ = edited_run
    first_maps = controller_of(host, patched).maps.run_of(patched.model.process_latent_in(first)).mean(4)
    second = sample(host, patched, clip, positive, latent, steps=4, seed=11)
    runs = controller_of(host, patched).maps.runs
    assert len(runs) >= 2
    assert not torch.allclose(runs[-1].mean(4)[0], first_maps[0])
    # Rendering the first run's samples after a second run still shows the first run's maps.
    assert controller_of(host, patched).maps.run_of(patched.model.process_latent_in(first)).mean(4)[0].equal(first_maps[0])
    assert not torch.equal(render(host, patched, first), render(host, patched, second))


@pytest.mark.parametrize(
    "kwargs, input_name",
    [
        ({"words": "horse"}, "words"),
        ({"resolution": "1/1"}, "resolution"),
        ({"samples": torch.zeros(2, 4, 8, 8)}, "samples"),
        ({"images": torch.zeros(3, 8, 8, 3)}, "images"),
    ],
)
def test_clear_errors(host, edited_run, kwargs, input_name):
    patched, _, _, _, out, _ = edited_run
    samples = kwargs.pop("samples", out)
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=rf"\[P2P Attention Maps › {input_name}\]"):
        render(host, patched, samples, **kwargs)


def test_a_model_without_an_edit_is_refused(host, load_tiny):
    model, _, _ = load_tiny("sd15")
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=r"\[P2P Attention Maps › model\]"):
        render(host, model, torch.zeros(2, 4, 8, 8))


def blank_runs(ink_columns) -> list[int]:
    """Widths of the runs of inkless columns between the first and the last inked column."""
    inked = [i for i, any_ink in enumerate(ink_columns) if any_ink]
    runs, width = [], 0
    for any_ink in ink_columns[inked[0] : inked[-1] + 1]:
        if any_ink:
            runs, width = runs + [width] if width else runs, 0
        else:
            width += 1
    return runs


def test_sheet_titles_keep_their_spaces_and_wrap_to_one_column(host):
    """'a photo of' rendered as 'a photoof' (a 2 px space), and a one-column sheet cut the title."""
    import numpy

    maps_node = host.pack.nodes.maps_node
    title = "a photo of a cat riding a bicycle along the sea at sunset"
    sheet = maps_node.grid(title, [("cat", torch.rand(4, 4))], None, 1)
    ink = numpy.asarray(sheet.convert("L")) < 128
    header = sheet.height - maps_node.TILE - maps_node.LABEL
    assert header >= 2 * maps_node.LABEL  # wrapped: the title does not fit 192 px
    assert not ink[:header, -3:].any()  # nothing cut at the sheet's edge
    first_line = ink[: maps_node.LABEL].any(axis=0).tolist()
    assert sum(width >= 5 for width in blank_runs(first_line)) >= 3  # 'a photo of a': a clear gap between words
