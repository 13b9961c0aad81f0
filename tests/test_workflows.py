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
    "p2p_flux_word_swap_maps.json": 4,  # source, edit, a maps grid for each
    "p2p_sd35_refine.json": 2,
    "p2p_qwen_image_reweight_blend.json": 3,  # source, edit, the blend mask
}
DIT_SIZE = 256  # the DiT workflows ship 1024x1024 and 20-28 steps; a CPU runs the same graph at this size and 4 steps


def fewer_steps(prompt: dict) -> None:
    """The real-image workflows ship 50 steps of null-text (SD) and 8 of FireFlow (Flux); 3 steps and
    1 iteration run the same graphs in seconds (the sampler must match the inversion: both change)."""
    for node in prompt.values():
        if node["class_type"] in ("P2PDDIMInvert", "KSamplerAdvanced", "BasicScheduler"):
            node["inputs"]["steps"] = 3
        if node["class_type"] == "P2PDDIMInvert":
            node["inputs"]["null_text_iterations"] = 1


def smaller(prompt: dict) -> None:
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=DIT_SIZE, height=DIT_SIZE)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 4


DIT_WORKFLOWS = ("p2p_flux_word_swap_maps.json", "p2p_sd35_refine.json", "p2p_qwen_image_reweight_blend.json")
EDITS = {"p2p_real_image.json": fewer_steps, "p2p_flux_real_image.json": fewer_steps, **{name: smaller for name in DIT_WORKFLOWS}}


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
    size = DIT_SIZE if name in DIT_WORKFLOWS else 512
    for path in files:
        with Image.open(path) as image:
            if path.name.startswith("p2p_attention_maps"):
                assert image.width > size  # a grid of token tiles
            else:
                assert image.size == (size, size)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_workflows_read_left_to_right_with_a_note(name):
    """Every link leaves a node's right edge for a node further right (a wire never loops back
    behind a node); a Note says what to change. test_browser checks that no node is drawn over another."""
    workflow = json.loads((WORKFLOWS / name).read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert all(nodes[source]["pos"][0] + nodes[source]["size"][0] < nodes[target]["pos"][0]
               for _, source, _, target, _, _ in workflow["links"])
    assert any(n["type"] == "Note" and "Change:" in n["widgets_values"][0] for n in workflow["nodes"])
