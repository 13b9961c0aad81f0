"""Every shipped workflow runs unchanged (but for the checkpoint file) through ComfyUI's executor."""
from __future__ import annotations

import json
import shutil

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
    "p2p_real_image.json": 2,  # the reconstructed image, the edit
    "p2p_flux_real_image.json": 2,  # the same on Flux.1 dev (FireFlow; skipped on hosts without Flux)
    "p2p_coexistence.json": 2,  # Self-Attention Guidance and P2P on one model
}


def fewer_steps(prompt: dict) -> None:
    """The real-image workflows ship 50 steps of null-text (SD) and 8 of FireFlow (Flux); 3 steps and
    1 iteration run the same graphs in seconds (the sampler must match the inversion: both change)."""
    for node in prompt.values():
        if node["class_type"] in ("P2PDDIMInvert", "KSamplerAdvanced", "BasicScheduler"):
            node["inputs"]["steps"] = 3
        if node["class_type"] == "P2PDDIMInvert":
            node["inputs"]["null_text_iterations"] = 1


EDITS = {"p2p_real_image.json": fewer_steps, "p2p_flux_real_image.json": fewer_steps}


def test_every_workflow_is_listed():
    assert {p.name for p in WORKFLOWS.glob("*.json")} == set(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_workflow_runs_through_the_executor(host, run_workflow, name):
    workflow = json.loads((WORKFLOWS / name).read_text())
    types = {n["type"] for n in workflow["nodes"]}
    assert types >= {"P2PController", "SaveImage"} and types & {"KSampler", "KSamplerAdvanced", "SamplerCustom"}
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":  # images a workflow loads ship beside it
            shutil.copy(WORKFLOWS / node["widgets_values"][0], host.folder_paths.get_input_directory())
    files = saved_images(host, run_workflow(name, edit=EDITS.get(name)))
    assert len(files) == IMAGES[name]
    for path in files:
        with Image.open(path) as image:
            if path.name.startswith("p2p_attention_maps"):
                assert image.width > 512  # a grid of token tiles
            else:
                assert image.size == (512, 512)
