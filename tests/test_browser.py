"""Every shipped workflow, in the real ComfyUI page, the way a person uses it.

One real server (``main.py`` of the host under test) and one headless Chromium for the module. For
each ``workflows/*.json``: open the file through the page's file input, check that no node is
missing and that every P2P node is drawn with its widgets holding the file's values, turn the step
counts down (as one would for a quick try on a CPU), click the queue button, wait for the prompt to
finish and for the output images to show in the page.

``P2P_WRITE_DOCS=1`` also writes pictures the repository ships: docs/screenshot.png (the README's
screenshot, after a run) and the same-name .jpg thumbnail (current ComfyUI shows it in its template
browser) of each DiT workflow, its P2P nodes as drawn: those have no world model to show a result
(the SD workflows' thumbnails are their results: scripts/make_doc_images.py --thumbnails). Run it on current ComfyUI, whose page is what users see now:
``P2P_WRITE_DOCS=1 COMFYUI_PATH=/path/to/ComfyUI .venv/bin/python -m pytest tests/test_browser.py``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from comfy_host import REPO_ROOT, THUMBNAIL_SIZE
from comfy_server import OPEN_DIALOGS, ComfyPage, ComfyServer, wait_for_prompt
from conftest import WORKFLOWS, dit_kind

WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
# A few steps show that the graph runs end to end in seconds; test_workflows runs the shipped counts.
QUICK_WIDGETS = {"steps": 3, "null_text_iterations": 1, "width": 256, "height": 256}
RUN_TIMEOUT_S = 300
WRITE_DOCS = os.environ.get("P2P_WRITE_DOCS") == "1"
SCREENSHOT_WORKFLOW = "p2p_swap_reweight.json"
VIEWPORT = (1600, 900)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MISSING = ("not found", "missing")  # words of both frontends' missing-node dialogs
BADGE_HEIGHT = 20  # the current page draws a custom node's pack name above its title bar


@pytest.fixture(scope="module")
def page(ui_server: ComfyServer):
    browser = ComfyPage(ui_server, *VIEWPORT)
    yield browser
    browser.close()


def widget_inputs(node_info: dict) -> list[str]:
    """The inputs the frontend draws as widgets, from the server's /object_info entry."""
    names = []
    for group in ("required", "optional"):
        for name, spec in node_info["input"].get(group, {}).items():
            options = spec[1] if len(spec) > 1 else {}
            if (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput"):
                names.append(name)
    return names


def overlapping(bounds: dict[int, list[float]], top: float = 0) -> list[tuple[int, int]]:
    """The pairs of nodes whose rectangles ``[x, y, width, height]``, each grown by ``top`` upwards,
    overlap."""
    grown = {i: [x, y - top, width, height + top] for i, (x, y, width, height) in bounds.items()}
    ids = sorted(grown)
    return [
        (a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
        if all(grown[a][d] < grown[b][d] + grown[b][d + 2] and grown[b][d] < grown[a][d] + grown[a][d + 2] for d in (0, 1))
    ]


def missing_node_dialogs(page: ComfyPage) -> list[str]:
    return [text for text in page.open_dialogs() if any(word in text.lower() for word in MISSING)]


def stage_input_images(workflow: dict, server: ComfyServer) -> None:
    """Images a workflow's LoadImage nodes name ship beside it: put them in the server's input folder."""
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":
            shutil.copy(WORKFLOWS / node["widgets_values"][0], server.input_dir)


def save_thumbnail(page: ComfyPage, p2p_nodes: list[dict], path: Path) -> None:
    """The workflow's P2P nodes up to its P2P Controller (the edit, not the outputs' nodes far to the
    right), drawn large, cropped and letterboxed into a small 4:3 JPEG."""
    controller_x = next(n["bounds"][0] for n in p2p_nodes if n["type"] == "P2PController")
    page.resize(1200, 900)
    x, y, width, height = page.fit_view(ids=[n["id"] for n in p2p_nodes if n["bounds"][0] <= controller_x])
    shot = Image.open(io.BytesIO(page.driver.get_screenshot_as_png())).convert("RGB")
    page.resize(*VIEWPORT)
    pad = BADGE_HEIGHT + 4  # the badges above the top nodes' titles stay in the picture
    crop = shot.crop((int(x) - pad, int(y) - pad, int(x + width) + pad, int(y + height) + pad))
    aspect = THUMBNAIL_SIZE[0] / THUMBNAIL_SIZE[1]
    frame = (max(crop.width, round(crop.height * aspect)), max(crop.height, round(crop.width / aspect)))
    canvas = Image.new("RGB", frame, crop.getpixel((1, 1)))  # the canvas background around the nodes
    canvas.paste(crop, ((frame[0] - crop.width) // 2, (frame[1] - crop.height) // 2))
    canvas.resize(THUMBNAIL_SIZE, Image.LANCZOS).save(path, quality=88)


def save_screenshot(page: ComfyPage, path: Path) -> None:
    """The whole page with the graph fitted into a wide view (the README's screenshot)."""
    page.resize(VIEWPORT[0], 640)
    page.fit_view()
    page.screenshot(path)
    page.resize(*VIEWPORT)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_loads_and_runs_in_the_page(ui_server: ComfyServer, page: ComfyPage, path: Path, tiny_dit_checkpoint: Any):
    workflow = json.loads(path.read_text())
    if dit_kind(workflow):
        tiny_dit_checkpoint(dit_kind(workflow))  # skips on a host without the DiT models (and their stock nodes)
    stage_input_images(workflow, ui_server)
    page.open_workflow(path)
    assert not missing_node_dialogs(page)

    nodes = page.graph_nodes()
    assert [n["type"] for n in nodes if not n["registered"] or n["has_errors"]] == []
    assert overlapping({n["id"]: n["bounds"] for n in nodes}, top=BADGE_HEIGHT) == [], "no node (or its badge) over another"
    info = ui_server.get_json("/object_info")
    saved = {n["id"]: n for n in workflow["nodes"]}
    p2p_nodes = [n for n in nodes if n["type"] in info and n["category"] and n["category"].startswith("P2P")]
    assert p2p_nodes, "a shipped workflow shows at least one P2P node"
    for node in p2p_nodes:
        spec = info[node["type"]]
        assert node["title"].startswith(spec["display_name"]) and node["title"].startswith("P2P ")
        if {"source", "target"} <= set(widget_inputs(spec)):  # the page labels neither text box
            assert "source" in node["title"] and "target" in node["title"]
        names = [w["name"] for w in node["widgets"]]
        assert names == widget_inputs(spec), f"{node['type']} is drawn with widgets {names}"
        assert [w["value"] for w in node["widgets"]] == saved[node["id"]]["widgets_values"]

    if WRITE_DOCS and dit_kind(workflow):
        save_thumbnail(page, p2p_nodes, path.with_suffix(".jpg"))
    for name, value in QUICK_WIDGETS.items():
        page.set_widgets(name, value)
    page.fit_view()
    prompt_id = page.queue()
    entry = wait_for_prompt(ui_server, prompt_id, RUN_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success", f"{entry['status']['messages']}\n{ui_server.log_tail()}"

    expected = {node_id: len(out["images"]) for node_id, out in entry["outputs"].items() if out.get("images")}
    assert sum(expected.values()) >= 2, "every shipped workflow saves the source and at least one edit"
    shown = page.wait_for(
        "const shown = {}; for (const n of app.graph._nodes) if (n.imgs) shown[n.id] = n.imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
        "return Object.entries(arguments[0]).every(([id, count]) => shown[id] === count) && shown;",
        30, "the output images to show in the page", expected,
    )
    assert {k: shown[k] for k in expected} == expected
    for out in entry["outputs"].values():
        for image in out.get("images", []):
            data = ui_server.get(f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}")
            with Image.open(io.BytesIO(data)) as picture:
                assert picture.format == "PNG" and min(picture.size) >= 64
    if WRITE_DOCS and path.name == SCREENSHOT_WORKFLOW:
        save_screenshot(page, REPO_ROOT / "docs" / "screenshot.png")


def test_a_missing_node_is_reported_by_the_page(page: ComfyPage, tmp_path: Path):
    """The missing-node check above is not vacuous: a workflow naming an unknown node type opens
    the frontend's missing-node dialog, which these helpers see."""
    workflow = json.loads((WORKFLOWS / "p2p_word_swap.json").read_text())
    swap = next(n for n in workflow["nodes"] if n["type"] == "P2PWordSwap")
    swap["type"] = "NotInstalledEditNode"
    path = tmp_path / "missing_node.json"
    path.write_text(json.dumps(workflow))
    page.open_workflow(path)
    dialogs = page.wait_for(
        f"return {OPEN_DIALOGS}.map(e => e.innerText).filter(text => text.includes('NotInstalledEditNode'));", 15, "the missing-node dialog"
    )
    assert any(word in dialogs[0].lower() for word in MISSING)
    page.close_dialogs()
