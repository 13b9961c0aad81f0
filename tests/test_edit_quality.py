"""Edit quality on the tiny world model: P2P must keep the source's structure and make the edit.

A few seeds of the benchmark's cases (benchmarks/bench_edit_quality.py, tests/world_edits.py),
through the pack's real nodes and the stock sampler. The floors sit an honest margin below what the
benchmark measured over 50 seeds per case (README, "Edit quality"); turning the replacement off
(cross and self windows 0) must fall below them, so the test can fail.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import world_edits
import world_model
import world_scenes

SEEDS = range(6)
CASES = ("colour swap", "shape swap", "local blend")
# Floors on the means over CASES x SEEDS (P2P), below the benchmark's figures for these cases.
MIN_STRUCTURE_IOU = 0.70
MIN_EDIT_SUCCESS = 0.60


@pytest.fixture(scope="module")
def world(host):
    return world_edits.load_world(host)


def edit_quality(host, world, settings: world_edits.Settings) -> tuple[float, float, int]:
    """(mean structure IoU, mean edit success, scored runs) of P2P over CASES x SEEDS."""
    results = [world_edits.run_case(host, world, case, seed, settings, baseline=False) for case in CASES for seed in SEEDS]
    scored = [r.p2p for r in results if r.valid]
    return float(np.mean([s.structure_iou for s in scored])), float(np.mean([s.edit_success for s in scored])), len(scored)


def test_the_stock_loader_loads_the_world_model_and_clip_text_encode_is_the_trained_encoder(host, world):
    model, clip, vae = world
    assert type(model.model.model_config) is world_model.register_world_architecture()
    assert type(vae.first_stage_model).__name__ == "TAESD"
    tokens = clip.tokenize("a small red circle at the top left on a striped gray background")
    with torch.inference_mode():
        stock = host.nodes.CLIPTextEncode().encode(clip, "a small red circle at the top left on a striped gray background")[0][0][0]
        direct = clip.cond_stage_model.clip_l([[t for t, _ in tokens["l"][0]]])[0]
    torch.testing.assert_close(stock.float(), direct.float(), rtol=1e-4, atol=1e-4)


def test_the_world_model_draws_what_its_caption_says(host, world):
    """A plain generation of a one-object scene shows its colour and background."""
    scene = world_scenes.sample_scene(np.random.default_rng(7), objects=1)
    with torch.inference_mode():
        picture = world_edits.generate(host, world, world_scenes.caption(scene), 0, world_edits.Settings())
    following = world_scenes.caption_following(picture, scene)
    assert following["colour"] == 1.0 and following["background"] == 1.0, (world_scenes.caption(scene), following)


def test_p2p_keeps_the_structure_and_makes_the_edit(host, world):
    iou, success, scored = edit_quality(host, world, world_edits.Settings())
    assert scored >= len(CASES) * len(SEEDS) // 2, f"only {scored} sources showed their objects"
    assert iou >= MIN_STRUCTURE_IOU and success >= MIN_EDIT_SUCCESS, f"structure IoU {iou:.2f}, edit success {success:.2f}"


def test_without_attention_replacement_the_structure_floor_fails(host, world):
    """The floors are not met by plain regeneration in a P2P batch: the test above can fail."""
    off = replace(world_edits.Settings(), cross_replace_steps=0.0, self_replace_steps=0.0)
    iou, success, _ = edit_quality(host, world, off)
    assert iou < MIN_STRUCTURE_IOU, f"structure IoU {iou:.2f} without attention replacement"
