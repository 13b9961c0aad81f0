"""The harness itself: the pack loads in the real host and sampling through the executor is exact."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import comfy_host
import tiny_models

PACK_NODES = {"P2PController", "P2PWordSwap", "P2PRefine", "P2PReweight", "P2PSampler"}


def test_pack_loads_through_comfyuis_loader(host):
    assert host.pack.__name__.endswith("comfyui-p2p-attention")
    assert PACK_NODES <= set(host.pack.NODE_CLASS_MAPPINGS)
    for name in PACK_NODES:
        assert host.nodes.NODE_CLASS_MAPPINGS[name] is host.pack.NODE_CLASS_MAPPINGS[name]
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("P2P ")


def test_core_imports_no_comfyui():
    core = os.path.join(os.path.dirname(__file__), "..", "p2p_attention")
    for name in os.listdir(core):
        if name.endswith(".py"):
            text = open(os.path.join(core, name)).read()
            assert "import comfy" not in text and "from comfy" not in text, name


def ksampler_prompt(seed: int) -> dict:
    ckpt = tiny_models.tiny_checkpoint_name("sd15")
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {"model": ["1", 0], "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                       "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0},
        },
        "6": {"class_type": "TestCaptureLatent", "inputs": {"value": ["5", 0], "key": "latent"}},
    }


def test_ksampler_through_the_executor_is_deterministic(host, captured):
    host.execute(ksampler_prompt(7))
    first = captured["latent"]["samples"].clone()
    host.execute(ksampler_prompt(7))
    assert first.shape == (1, 4, 8, 8)
    assert torch.equal(first, captured["latent"]["samples"])  # same seed, same bytes
    host.execute(ksampler_prompt(8))
    assert not torch.equal(first, captured["latent"]["samples"])


def test_a_missing_host_fails_loudly(tmp_path):
    code = "import sys; sys.path.insert(0, 'tests'); import comfy_host; comfy_host.comfyui_path()"
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(comfy_host.REPO_ROOT), env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "is not a ComfyUI checkout" in result.stderr

