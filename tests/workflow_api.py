"""Convert a saved (UI format) workflow to the API format the executor runs, as the frontend does.

ComfyUI has no server-side converter; this follows the frontend's ``graphToPrompt``: muted nodes
(mode 2) are dropped, bypassed ones (mode 4) pass their matching input through, Reroute and
PrimitiveNode are resolved, Notes are skipped, and every widget input takes the next
``widgets_values`` entry in INPUT_TYPES order (a link wins but the entry is still consumed),
skipping the extra ``control_after_generate`` value after seed inputs and LoadImage's "upload".
"""
from __future__ import annotations

from typing import Any

MUTED, BYPASSED = 2, 4
VIRTUAL = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # COMBO: a V3 node's combo, its options in the spec
SEED_INPUTS = {"seed", "noise_seed"}


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_specs(node_class: type) -> list[tuple[str, tuple]]:
    types = node_class.INPUT_TYPES()
    return [(name, spec) for group in ("required", "optional") for name, spec in types.get(group, {}).items()]


def to_api(workflow: dict, node_classes: dict[str, type]) -> dict[str, dict]:
    """The API-format prompt ``{id: {"class_type", "inputs"}}`` of a UI-format workflow."""
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(link_id: int, kind: str | None = None) -> Any:
        """Follow a link back through reroutes and bypassed nodes to a real output or a value."""
        _, from_id, from_slot, _, _, link_type = links[link_id][:6]
        node = nodes[str(from_id)]
        if node["type"] == "Reroute":
            return source_of(node["inputs"][0]["link"], kind)
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        if node.get("mode") == BYPASSED:
            for node_input in node.get("inputs", []):
                if node_input.get("link") is not None and node_input["type"] == link_type:
                    return source_of(node_input["link"], kind)
            return None
        if node.get("mode") == MUTED:
            return None
        return [str(from_id), from_slot]

    prompt = {}
    for node_id, node in nodes.items():
        if node["type"] in VIRTUAL or node.get("mode") in (MUTED, BYPASSED):
            continue
        node_class = node_classes[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, spec in _input_specs(node_class):
            if _is_widget(spec):
                value = values.pop(0) if values else None
                if name in SEED_INPUTS or (len(spec) > 1 and spec[1].get("control_after_generate")):
                    values.pop(0) if values and isinstance(values[0], str) else None
                if node["type"] == "LoadImage" and name == "image" and values:
                    values.pop(0)  # the "upload" button's value
                if name not in linked:
                    if value is not None:
                        inputs[name] = value
                    continue
            if name in linked:
                source = source_of(linked[name])
                if isinstance(source, tuple):
                    inputs[name] = source[1]
                elif source is not None:
                    inputs[name] = source
        prompt[node_id] = {"class_type": node["type"], "inputs": inputs}
    return prompt
