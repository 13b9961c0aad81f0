"""Fixtures: one real ComfyUI host per test session, tiny real-architecture models, the executor."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import comfy_host
import tiny_dit_models
import tiny_models
import workflow_api

WORKFLOWS = comfy_host.REPO_ROOT / "workflows"
DIT_KINDS = {name: kind for kind, name in tiny_dit_models.REAL_FILE_NAMES.items()}  # real file name -> tiny DiT kind
CAPTURED: dict[str, Any] = {}


def _capture_node(kind: str) -> type:
    """A test-only output node that keeps what it receives, so tests can read executor outputs."""

    class Capture:
        CATEGORY = "testing"
        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "capture"

        @classmethod
        def INPUT_TYPES(cls) -> dict:
            return {"required": {"value": (kind,), "key": ("STRING", {"default": "out"})}}

        def capture(self, value: Any, key: str) -> dict:
            CAPTURED[key] = value
            return {}

    Capture.__name__ = f"TestCapture{kind.title()}"
    return Capture


CAPTURE_NODES = {f"TestCapture{k.title()}": _capture_node(k) for k in ("LATENT", "IMAGE", "MASK", "MODEL")}


def _host_line() -> str:
    try:
        path = comfy_host.comfyui_path()
    except comfy_host.HostError as error:
        return f"ComfyUI host: {error}"
    return f"ComfyUI host: comfyui_version {comfy_host.comfyui_version(path)} at {path}"


def pytest_report_header(config: pytest.Config) -> str:
    return _host_line()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(f"tested on {_host_line()}")


@pytest.fixture(scope="session")
def host(tmp_path_factory: pytest.TempPathFactory) -> comfy_host.Host:
    """ComfyUI booted in-process with this pack loaded, and tiny checkpoints in its models folder.

    A host that cannot be loaded raises: the suite fails loudly instead of skipping.
    """
    booted = comfy_host.boot(tmp_path_factory.mktemp("comfy"), extra_nodes=CAPTURE_NODES)
    tiny_models.register_tiny_architectures()
    checkpoints = booted.work_dir / "models" / "checkpoints"
    for kind in tiny_models.KINDS:
        tiny_models.write_tiny_checkpoint(kind, checkpoints / tiny_models.tiny_checkpoint_name(kind), seed=0)
    return booted


@pytest.fixture(scope="session")
def load_tiny(host: comfy_host.Host):
    """``load_tiny(kind) -> (model, clip, vae)`` through the stock CheckpointLoaderSimple."""
    cache: dict[str, tuple] = {}

    def load(kind: str) -> tuple:
        if kind not in cache:
            with torch.inference_mode():
                cache[kind] = host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.tiny_checkpoint_name(kind))[:3]
        return cache[kind]

    return load


@pytest.fixture(scope="session")
def tiny_dit_checkpoint(host: comfy_host.Host):
    """``tiny_dit_checkpoint(kind, peaked=True) -> Path`` of a tiny DiT checkpoint in the host's
    checkpoints folder, written on first use (so hosts and runs that do not use them do not pay for
    them). Skips on a ComfyUI without the DiT architectures (the 2024 host)."""

    def checkpoint(kind: str, peaked: bool = True) -> Path:
        reason = tiny_dit_models.unsupported_reason()
        if reason:
            pytest.skip(reason)
        tiny_dit_models.register_tiny_dit_architectures()
        path = host.work_dir / "models" / "checkpoints" / tiny_dit_models.tiny_dit_checkpoint_name(kind, peaked)
        if not path.is_file():
            tiny_dit_models.write_tiny_dit_checkpoint(kind, path, seed=0, peaked=peaked)
        return path

    return checkpoint


@pytest.fixture(scope="session")
def load_tiny_dit(host: comfy_host.Host, tiny_dit_checkpoint):
    """``load_tiny_dit(kind, peaked=True) -> (model, clip, vae)`` through the stock CheckpointLoaderSimple."""
    cache: dict[tuple[str, bool], tuple] = {}

    def load(kind: str, peaked: bool = True) -> tuple:
        if (kind, peaked) not in cache:
            name = tiny_dit_checkpoint(kind, peaked).name
            with torch.inference_mode():
                cache[kind, peaked] = host.nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        return cache[kind, peaked]

    return load


def dit_kind(workflow: dict) -> str | None:
    """The tiny DiT kind standing for the DiT checkpoint a workflow (UI format) loads; None for SD ones."""
    loaded = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    return next((DIT_KINDS[name] for name in loaded if name in DIT_KINDS), None)


@pytest.fixture(scope="session")
def run_workflow(host: comfy_host.Host, tiny_dit_checkpoint: Any):
    """Run a shipped workflow (UI format) unchanged but for the checkpoint file, through the executor:
    the tiny SD ``kind``, or the tiny DiT standing for the DiT checkpoint it loads (skipped on a host
    without DiT models)."""

    def run(name: str, kind: str = "sd15", edit: Any = None) -> dict[str, Any]:
        workflow = json.loads((WORKFLOWS / name).read_text())
        dit = dit_kind(workflow)
        checkpoint = tiny_dit_checkpoint(dit).name if dit else tiny_models.tiny_checkpoint_name(kind)
        prompt = workflow_api.to_api(workflow, host.nodes.NODE_CLASS_MAPPINGS)
        for node in prompt.values():
            if node["class_type"] in ("CheckpointLoaderSimple", "P2PCheckpointLoader"):
                node["inputs"]["ckpt_name"] = checkpoint
        if edit is not None:
            edit(prompt)
        result = host.execute(prompt)
        result["prompt"] = prompt
        return result

    return run


@pytest.fixture()
def captured() -> dict[str, Any]:
    CAPTURED.clear()
    return CAPTURED


def saved_images(host: comfy_host.Host, result: dict) -> list[Path]:
    """Files the SaveImage nodes of an executed prompt wrote."""
    files = []
    for ui in result["ui"].values():
        for image in (ui or {}).get("images", []):
            files.append(Path(host.folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"])
    return files


@pytest.fixture(scope="session")
def ui_server(host: comfy_host.Host, tmp_path_factory: pytest.TempPathFactory, tiny_dit_checkpoint: Any) -> Any:
    """The real ComfyUI server (main.py, the same checkout as ``host``) in a subprocess, with this
    pack and the tiny SD1.5 checkpoint under the shipped workflows' file name; on v0.3.75 also the
    tiny DiT checkpoints under the real file names that shipped workflows load."""
    import comfy_server

    checkpoint = host.work_dir / "models" / "checkpoints" / tiny_models.tiny_checkpoint_name("sd15")
    dit_links = {}
    if tiny_dit_models.unsupported_reason() is None:
        shipped = "".join(path.read_text() for path in WORKFLOWS.glob("*.json"))
        dit_links = {name: tiny_dit_checkpoint(kind) for kind, name in tiny_dit_models.REAL_FILE_NAMES.items() if name in shipped}
    server = comfy_server.start_server(host.path, tmp_path_factory.mktemp("server"), checkpoint, current=host.version == "current")
    comfy_server.link_checkpoints(server.work_dir, dit_links)
    yield server
    server.stop()
