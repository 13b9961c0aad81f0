"""Every shipped workflow runs unchanged (but for the checkpoint file) through ComfyUI's executor."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import WORKFLOWS, saved_images

IMAGES = {
    "p2p_word_swap.json": 2,
    "p2p_refine.json": 2,
    "p2p_reweight.json": 2,
    "p2p_swap_reweight.json": 2,
    "p2p_several_targets.json": 3,
    "p2p_local_blend.json": 3,  # source, edit, the edit's blend mask
    "p2p_attention_maps.json": 4,  # source, edit, a maps grid for each
}


def test_every_workflow_is_listed():
    assert {p.name for p in WORKFLOWS.glob("*.json")} == set(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_workflow_runs_through_the_executor(host, run_workflow, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    assert {n["type"] for n in workflow["nodes"]} >= {"P2PController", "KSampler", "SaveImage"}
    files = saved_images(host, run_workflow(name))
    assert len(files) == IMAGES[name]
    for path in files:
        with Image.open(path) as image:
            if path.name.startswith("p2p_attention_maps"):
                assert image.width > 512  # a grid of token tiles
            else:
                assert image.size == (512, 512)
