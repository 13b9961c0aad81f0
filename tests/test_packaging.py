"""What users see before running anything: node pages, the Registry entry, workflow templates.

Node help comes from the classic node API (DESCRIPTION, per-input "tooltip", OUTPUT_TOOLTIPS), which
both hosts load and current ComfyUI shows; the Comfy Registry reads pyproject.toml; current ComfyUI
lists ``custom_nodes/*/workflows/*.json`` as templates with a same-name .jpg as the thumbnail.
"""
from __future__ import annotations

import re
import tomllib

import pytest
from PIL import Image

from comfy_host import PACK_FOLDER, REPO_ROOT
from conftest import WORKFLOWS

WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
# The Registry's node id: lowercase letters, digits, '-' and '_', starting with a letter or digit.
NODE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def node_classes(host) -> dict[str, type]:
    return host.pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_every_node_is_under_the_p2p_category_with_a_p2p_display_name(host, node_classes):
    names = host.pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(names) == set(node_classes)
    for node_type, cls in node_classes.items():
        assert cls.CATEGORY == "P2P" or cls.CATEGORY.startswith("P2P/"), node_type
        assert names[node_type].startswith("P2P "), node_type
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_type] == names[node_type]  # the host took them


def test_every_node_describes_itself_its_inputs_and_its_outputs(node_classes):
    undocumented = []
    for node_type, cls in node_classes.items():
        if not isinstance(getattr(cls, "DESCRIPTION", None), str) or len(cls.DESCRIPTION) < 20:
            undocumented.append(f"{node_type}: DESCRIPTION")
        for group, inputs in cls.INPUT_TYPES().items():
            for name, spec in inputs.items():
                options = spec[1] if len(spec) > 1 else {}
                if group != "hidden" and not options.get("tooltip"):
                    undocumented.append(f"{node_type}.{name}: tooltip")
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", ())
        if len(tooltips) != len(cls.RETURN_TYPES) or not all(tooltips):
            undocumented.append(f"{node_type}: OUTPUT_TOOLTIPS")
    assert undocumented == []


def test_pyproject_is_a_valid_registry_entry(pyproject):
    project, comfy = pyproject["project"], pyproject["tool"]["comfy"]
    assert NODE_ID.match(project["name"]) and project["name"] == PACK_FOLDER
    assert SEMVER.match(project["version"])
    assert len(project["description"]) >= 20
    license_file = project["license"].get("file")
    assert (REPO_ROOT / license_file).is_file() if license_file else project["license"].get("text")
    assert re.match(r"^https://github\.com/[\w.-]+/[\w.-]+$", project["urls"]["Repository"])
    assert project["dependencies"] == []  # ComfyUI's own packages are all the pack needs
    assert NODE_ID.match(comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert isinstance(comfy["Icon"], str) and (comfy["Icon"] == "" or comfy["Icon"].startswith("https://"))
    assert isinstance(comfy["includes"], list)


def test_manager_installs_nothing(pyproject):
    """ComfyUI Manager runs ``pip install -r requirements.txt`` when a pack has one: this pack needs
    nothing beyond ComfyUI, so it ships none (the test-only pins live in requirements-dev.txt)."""
    assert not (REPO_ROOT / "requirements.txt").exists()


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_every_workflow_has_a_template_thumbnail(path):
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.width >= 256


def test_current_comfyui_lists_the_workflows_as_templates(host, request):
    if host.version != "current":
        pytest.skip("the 2024 host has no template route; its users open the files with Load")
    ui_server = request.getfixturevalue("ui_server")  # started only where it is needed
    listed = ui_server.get_json("/workflow_templates")
    assert sorted(listed[PACK_FOLDER]) == [p.stem for p in WORKFLOW_FILES]
    for path in WORKFLOW_FILES:
        for suffix in (".json", ".jpg"):
            assert ui_server.status(f"/api/workflow_templates/{PACK_FOLDER}/{path.stem}{suffix}") == 200
