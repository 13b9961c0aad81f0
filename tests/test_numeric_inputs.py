"""Every number a node reads, from a widget or typed in text, is checked on the real host: a NaN,
an infinity or a value outside the widget's range is a P2PError that names the node and the input,
never a black image, a silently unedited one or an exception from deep inside sampling."""
from __future__ import annotations

import math
import re

import pytest
import torch

import comfy_host
from p2p_helpers import CONTROLLER_ID, controller_prompt, swap

PROMPT = "a photo of a cat riding a bicycle"
TARGET = "a photo of a dog riding a bicycle"
NUMERIC = ("INT", "FLOAT")


def numeric_inputs(node_class: type) -> dict[str, dict]:
    """A node's INT / FLOAT inputs (required and optional) and their widget options."""
    found = {}
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            if isinstance(spec[0], str) and spec[0] in NUMERIC:
                found[name] = spec[1] if len(spec) > 1 else {}
    return found


def bad_values(options: dict) -> list[float]:
    values = [math.nan, math.inf, -math.inf, 1e30, -1e30]
    if "min" in options:
        values.append(options["min"] - 1)
    if "max" in options:
        values.append(options["max"] + 1)
    return values


@pytest.fixture(scope="module")
def valid_calls(host, load_tiny):
    """Per node type with numeric inputs: a call that succeeds, as keyword arguments."""
    model, clip, _ = load_tiny("sd15")
    with torch.inference_mode():
        latent = host.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        positive = host.nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = host.nodes.CLIPTextEncode().encode(clip, "")[0]
    edit = swap(host, PROMPT, TARGET)
    return {
        "P2PController": dict(model=model, clip=clip, p2p_edit=edit, latent=latent, cross_replace_steps=0.8, self_replace_steps=0.4),
        "P2PReweight": dict(words="cat", scale=2.0, prompt=PROMPT),
        "P2PLocalBlend": dict(p2p_edit=edit, source_words="cat", target_words="dog", subtract_words="", threshold=0.3, start_blend=0.2),
        "P2PDDIMInvert": dict(model=model, positive=positive, negative=negative, latent=latent, steps=2, cfg=7.5, scheduler="normal",
                              method="ddim", null_text_iterations=2, early_stop=1e-5),
    }


def call(host, node_type: str, kwargs: dict):
    node = host.pack.NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        return getattr(node(), node.FUNCTION)(**kwargs)


def numeric_cases(host) -> list[tuple[str, str, float]]:
    return [
        (node_type, name, value)
        for node_type, node_class in host.pack.NODE_CLASS_MAPPINGS.items()
        for name, options in numeric_inputs(node_class).items()
        for value in bad_values(options)
    ]


def test_every_numeric_input_of_every_node_rejects_non_finite_and_out_of_range_values(host, valid_calls):
    P2PError = host.pack.p2p_attention.errors.P2PError
    cases = numeric_cases(host)
    # A node type that gains a numeric input must be given a valid call here.
    assert {node_type for node_type, _, _ in cases} == set(valid_calls)
    for node_type, kwargs in valid_calls.items():
        call(host, node_type, kwargs)  # the valid call works: each error below is the bad value's
    for node_type, name, value in cases:
        label = re.escape(host.pack.NODE_DISPLAY_NAME_MAPPINGS[node_type])
        with pytest.raises(P2PError, match=rf"^\[{label} › {name}\] .* Fix: use a (whole )?number from "):
            call(host, node_type, {**valid_calls[node_type], name: value})


@pytest.mark.parametrize("node_type, input_name, text", [
    ("P2PReweight", "words", "cat: nan"),
    ("P2PReweight", "words", "cat: inf"),
    ("P2PReweight", "words", "cat: 1e30"),
    ("P2PReweight", "words", "riding, cat: -11"),
    ("P2PController", "cross_replace_words", "dog: nan"),
    ("P2PController", "cross_replace_words", "dog: -inf"),
    ("P2PController", "cross_replace_words", "dog: 1.5"),
])
def test_numbers_typed_in_text_are_checked_like_the_widget(host, valid_calls, node_type, input_name, text):
    """Per-word values skip the widget's range: 'cat: nan' gave a black image."""
    label = re.escape(host.pack.NODE_DISPLAY_NAME_MAPPINGS[node_type])
    item = re.escape(repr(text.split(",")[-1].strip()))
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=rf"^\[{label} › {input_name}\] {item}: .* Fix: use a number from "):
        call(host, node_type, {**valid_calls[node_type], input_name: text})


@pytest.mark.parametrize("node_type, input_name, kwargs", [
    ("P2PWordSwap", "target", dict(source=PROMPT, target="a photo of a (dog:nan) riding a bicycle")),
    ("P2PRefine", "source", dict(source="a photo of a (cat:1e30) riding a bicycle", target=TARGET)),
    ("P2PReweight", "prompt", dict(words="cat", scale=2.0, prompt="a photo of a ((cat:inf)) riding a bicycle")),
])
def test_prompt_weights_are_finite(host, node_type, input_name, kwargs):
    """ComfyUI reads '(dog:nan)' as a NaN weight: a NaN conditioning and a black image."""
    label = re.escape(host.pack.NODE_DISPLAY_NAME_MAPPINGS[node_type])
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=rf"^\[{label} › {input_name}\] the weight of '(dog|cat)': "):
        call(host, node_type, kwargs)


def test_a_nan_mask_is_rejected(host, valid_calls):
    mask = torch.full((1, 64, 64), math.nan)
    with pytest.raises(host.pack.p2p_attention.errors.P2PError, match=r"^\[P2P Local Blend › mask\] .* not finite"):
        call(host, "P2PLocalBlend", {**valid_calls["P2PLocalBlend"], "mask": mask})


@pytest.mark.parametrize("node, input_name", [("2", "scale"), (CONTROLLER_ID, "cross_replace_steps"), (CONTROLLER_ID, "self_replace_steps")])
def test_nan_passes_comfyui_validation_and_stops_at_the_node(host, node, input_name):
    """Over the API ComfyUI's min / max check lets NaN through; the node names it, before sampling."""
    prompt = controller_prompt([{"class_type": "P2PReweight", "inputs": {"words": "cat", "scale": 2.0, "prompt": PROMPT}}], steps=2)
    prompt[node]["inputs"][input_name] = math.nan
    with pytest.raises(comfy_host.ExecutionError) as error:
        host.execute(prompt)
    assert error.value.details["node_id"] == node
    assert re.search(rf"› {input_name}\] nan is not a finite number", error.value.message), error.value.message
