"""Installing the controller on a ComfyUI model through the model patcher's supported hooks.

Where the hook sits is the only difference between the families:

- UNets (SD1.x, SD2.x, SDXL; both hosts): the attention replace patches of every transformer block,
  ``attn1`` (self-attention) and ``attn2`` (cross-attention), which receive ``[b, n, heads * dim]``.
- DiTs with joint attention (Flux.1, Chroma, SD3.x, Qwen-Image, Flux.2; v0.3.75): the
  ``optimized_attention_override`` of ``transformer_options`` (one slot: the override already there
  is chained underneath), which sees every attention call of the blocks, and an ``APPLY_MODEL``
  wrapper that tells it, per model call, the latent's token grid and the text's length. Text comes
  first in every supported family's joint sequence: ``[text, image tokens, reference tokens]``.

Both end in ``P2PController.attention``; the post-CFG hook (local blend, the run's result) is shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import comfy.model_base
from comfy.ldm.modules.attention import optimized_attention

from ..p2p_attention.attention import heads_first, merge_heads
from ..p2p_attention.controller import CONTROLLER, PADDED, TILED, AttentionCall, P2PController
from ..p2p_attention.errors import P2PError
from .host import model_sampling

Site = tuple[str, int, int]  # (block name, block number, transformer index): ComfyUI's patch key
UNET, DIT = "unet", "dit"
# Joint-attention families, by ComfyUI model class; subclasses of a different kind are named first.
UNSUPPORTED_SUBCLASSES = ("ChromaRadiance",)
DIT_CLASSES = ("Flux", "Chroma", "SD3", "QwenImage", "Flux2")  # Chroma and Flux2 are Flux subclasses; listed for messages
SUPPORTED = "SD1.x, SD2.x, SDXL, Flux.1 (dev, schnell), Chroma, SD3/SD3.5, Qwen-Image or Flux.2"
# model_base.Flux2.extra_conds pads a text shorter than 512 tokens on the left with zeros, which the
# model attends to (v0.3.75; a literal there, not an attribute).
FLUX2_TEXT_LENGTH = 512
LAYOUT_KEY = "p2p_token_layout"  # transformer_options entry the wrapper sets for the override


def _is_one_of(model: Any, names: tuple[str, ...]) -> bool:
    """Whether the model is an instance of one of these ``comfy.model_base`` classes (a host without
    one has none of its models)."""
    classes = [getattr(comfy.model_base, n, None) for n in names]
    return any(c is not None and isinstance(model.model, c) for c in classes)


def model_family(model: Any) -> str:
    """UNET or DIT; an error naming the model and the supported families otherwise."""
    unet = getattr(model.model, "diffusion_model", None)
    if hasattr(unet, "input_blocks") and hasattr(unet, "output_blocks"):
        return UNET
    name = type(model.model).__name__
    if _is_one_of(model, UNSUPPORTED_SUBCLASSES) or not _is_one_of(model, DIT_CLASSES):
        raise P2PError(
            CONTROLLER,
            "model",
            f"{name} models are not supported: Prompt-to-Prompt edits their text attention, and this pack knows where "
            "that sits only in SD-style UNets and in the joint attention of Flux.1, Chroma, SD3.x, Qwen-Image and Flux.2.",
            f"load an {SUPPORTED} model.",
        )
    return DIT


def layout_of(model: Any) -> tuple[str, int]:
    """How the prompts of one batch share columns, and the length to which the model pads a shorter
    text itself (0: it does not; see p2p_attention/columns.py)."""
    if model_family(model) == UNET:
        return TILED, 0
    return PADDED, FLUX2_TEXT_LENGTH if _is_one_of(model, ("Flux2",)) else 0


def transformer_blocks(model: Any) -> dict[Site, Any]:
    """Every transformer block of the UNet, by its patch key."""
    unet = model.model.diffusion_model
    groups = [("input", unet.input_blocks), ("middle", [getattr(unet, "middle_block", None) or ()]), ("output", unet.output_blocks)]
    found = {}
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", ())):
                    found[(name, number, index)] = transformer
    return found


def attention_sites(model: Any) -> list[Site]:
    """Every transformer block with cross-attention in the UNet (16 in SD1.5, 70 in SDXL)."""
    sites = [site for site, block in transformer_blocks(model).items() if getattr(block, "attn2", None) is not None]
    if not sites:
        raise P2PError(
            CONTROLLER,
            "model",
            "this model has no cross-attention layers, so there is no text attention to edit.",
            f"load an {SUPPORTED} model.",
        )
    return sites


def percent_to_sigma(model: Any) -> Callable[[float], float]:
    """ComfyUI's schedule fraction -> sigma (as start/end percent in ControlNet and conditioning)."""
    return model_sampling(model).percent_to_sigma


def map_geometry(extra_options: dict, queries: int) -> tuple[int, tuple[int, int]] | None:
    """How much smaller than the latent this layer's attention map is (1, 2, 4, ...), and its size;
    None when the queries are not the layer's cells, one each: a patch before this one merged them
    (Token Merging) or cut them into tiles (HyperTile). Current ComfyUI gives the layer's size
    (``activations_shape``); the 2024 host only the latent's, from which the size is inferred."""
    layer = extra_options.get("activations_shape")
    if layer is not None and layer[-2] * layer[-1] != queries:
        return None
    height, width = extra_options["original_shape"][-2:]
    for downscale in (1, 2, 4, 8, 16, 32, 64):
        size = (math.ceil(height / downscale), math.ceil(width / downscale))
        if size[0] * size[1] == queries:
            return downscale, size
    return None


class NoiseLevel:
    """The noise level of the running model call, read off its ``sigmas`` tensor once.

    Every attention call of one model evaluation, and the post-CFG hook after it, get the same
    ``sigmas`` tensor (on the GPU); reading it waits until the GPU has run everything queued, so read
    at every attention call it would expose every kernel launch. Samplers pass a new tensor per model
    call; the one read last is held, so that its identity cannot pass to a new tensor. (Its version
    counter cannot tell writes into it: ComfyUI samples in inference mode, where tensors have none.)
    """

    def __init__(self) -> None:
        self._sigmas: torch.Tensor | None = None
        self._value = 0.0

    def __call__(self, sigmas: torch.Tensor) -> float:
        if sigmas is not self._sigmas:
            self._sigmas, self._value = sigmas, float(sigmas.max())
        return self._value


class AttentionPatch:
    """One UNet replace patch (``attn1`` or ``attn2`` of a site), over the patch it replaces (if any).

    ComfyUI deep-copies ``model_options`` on every clone; ``__deepcopy__`` returns ``self`` so the
    clones downstream (LoRA loaders, other patch nodes) share this patch instead of copying it.
    """

    def __init__(self, controller: P2PController, level: NoiseLevel, kind: str, previous: Callable | None, site: tuple) -> None:
        self.controller = controller
        self.level = level
        self.kind = kind
        self.previous = previous
        self.site = site

    def __deepcopy__(self, memo: dict) -> "AttentionPatch":
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        geometry = map_geometry(extra_options, q.shape[1])
        chunks = tuple(c == 0 for c in extra_options["cond_or_uncond"])
        cross = self.kind == "attn2"

        def through(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if self.previous is not None:
                return self.previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, heads)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
            # Always the whole batch: a UNet's calls have no joint attention, the only one split by rows.
            return through(merge_heads(q), merge_heads(k), merge_heads(v))  # free for the unedited views

        if not cross and (geometry is None or q.shape[1] != k.shape[1] or q.shape[0] != len(chunks) * self.controller.images):
            # Merged or tiled self-attention (Token Merging merges the queries, HyperTile cuts the
            # images into tiles of the batch) is left to its patch: its rows are no longer the
            # images' cells, so the source's layout cannot be copied there.
            return through(q, k, v)
        if geometry is None:
            height, width = extra_options["original_shape"][-2:]
            raise P2PError(
                CONTROLLER,
                "model",
                f"a patch on this model changes the tokens of its cross-attention ({q.shape[1]} queries fit no map of the "
                f"{height}x{width} latent), so the words' maps cannot be placed.",
                "remove that patch from the model given to the P2P Controller.",
            )
        downscale, map_size = geometry
        queries = slice(0, q.shape[1])
        call = AttentionCall(
            heads=heads,
            sigma=self.level(extra_options["sigmas"]),
            chunks=chunks,
            downscale=downscale,
            map_size=map_size,
            queries=queries,
            text=slice(0, k.shape[1]) if cross else None,
            image_keys=None if cross else slice(0, k.shape[1]),
            site=self.site,
        )
        return self.controller.attention(heads_first(q, heads), heads_first(k, heads), heads_first(v, heads), call, attend)


@dataclass(frozen=True)
class TokenLayout:
    """A DiT model call: its latent's token grid and how many text tokens precede the image's."""

    grid: tuple[int, int]
    patch: int
    text: int


class TokenGrid:
    """The ``APPLY_MODEL`` wrapper that tells the attention override the call's ``TokenLayout``."""

    def __init__(self, patch: int, registers: int) -> None:
        self.patch = patch
        self.registers = registers  # SD3's register tokens, in front of the text

    def __deepcopy__(self, memo: dict) -> "TokenGrid":
        return self

    def __call__(self, executor: Any, x: torch.Tensor, t: Any, c_concat: Any, c_crossattn: torch.Tensor, control: Any, transformer_options: dict, **kwargs: Any) -> Any:
        grid = (math.ceil(x.shape[-2] / self.patch), math.ceil(x.shape[-1] / self.patch))
        transformer_options[LAYOUT_KEY] = TokenLayout(grid=grid, patch=self.patch, text=c_crossattn.shape[1] + self.registers)
        transformer_options.pop("p2p_calls", None)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class JointAttention:
    """The ``optimized_attention_override``: the controller on every joint (or image-only) attention
    call of a DiT's blocks, over the override that was there (SageAttention nodes and the like)."""

    def __init__(self, controller: P2PController, level: NoiseLevel, previous: Callable | None) -> None:
        self.controller = controller
        self.level = level
        self.previous = previous

    def __deepcopy__(self, memo: dict) -> "JointAttention":
        return self

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.pop("heads")
        mask = args[4] if len(args) > 4 else kwargs.pop("mask", None)

        def through(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, **options)
            return func(q, k, v, heads, **options)

        layout: TokenLayout | None = options.get(LAYOUT_KEY)
        split = not kwargs.get("skip_reshape", False)
        length = q.shape[1] if split else q.shape[2]
        call = None if layout is None else self._call(layout, length, k.shape[1] if split else k.shape[2], heads, options)
        if call is None:
            return through(q, k, v, mask=mask, **kwargs)
        if split:
            q, k, v = heads_first(q, heads), heads_first(k, heads), heads_first(v, heads)
        batch = q.shape[0]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
            # The call's own mask is per row when it has a batch dimension ([b, queries, keys] or [b, h, queries, keys]).
            own = mask[rows] if mask is not None and mask.dim() >= 3 and mask.shape[0] == batch else mask
            merged = _with_key_mask(own, key_mask)
            return through(q, k, v, **{**kwargs, "mask": merged, "skip_reshape": True, "skip_output_reshape": False})

        out = self.controller.attention(q, k, v, call, attend)
        return heads_first(out, heads) if kwargs.get("skip_output_reshape", False) else out

    def _call(self, layout: TokenLayout, queries: int, keys: int, heads: int, options: dict) -> AttentionCall | None:
        """The call's ``AttentionCall``; None for attention that is not over this latent's tokens."""
        image = layout.grid[0] * layout.grid[1]
        count = options["p2p_calls"] = options.get("p2p_calls", -1) + 1
        chunks = tuple(c == 0 for c in options["cond_or_uncond"])
        if not any(chunks):  # the negative prompt alone: nothing to edit, whatever its length
            return None
        common = dict(
            heads=heads,
            sigma=self.level(options["sigmas"]),
            chunks=chunks,
            downscale=layout.patch,
            map_size=layout.grid,
            transformer=True,
            site=(options.get("block_type", "joint"), options.get("block_index", count)),
        )
        if queries == keys == image:  # image-only attention (SD3.5's MMDiT-X second attention)
            return AttentionCall(queries=slice(0, image), text=None, image_keys=slice(0, image), **common)
        if queries == keys and queries >= layout.text + image:
            width = self.controller.columns_width or layout.text
            if width > layout.text:
                raise P2PError(
                    CONTROLLER,
                    "clip",
                    f"the model attends to {layout.text} text tokens, fewer than this edit's {width}.",
                    "plug the controller's CONDITIONING output into the sampler's positive input unchanged.",
                )
            image_tokens = slice(layout.text, layout.text + image)
            # The prompt's columns are the text's last ones: SD3 puts register tokens in front, Flux.2 left-pads.
            return AttentionCall(queries=image_tokens, text=slice(layout.text - width, layout.text), image_keys=image_tokens, **common)
        return None


def _with_key_mask(mask: torch.Tensor | None, key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The call's own attention mask and the controller's padding mask ``[b, 1, 1, keys]``, added."""
    if key_mask is None or mask is None:
        return key_mask if mask is None else mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=key_mask.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0 if mask.dim() == 2 else 1)
    return mask.to(key_mask.dtype) + key_mask


CONDITIONING_KEY = "p2p_controller"  # entry of the controller's CONDITIONING: the controller's key


def made_by(controller: P2PController, conds: list[dict] | None) -> bool:
    """Whether every entry of a sampler's (processed) conditioning came from ``controller``'s
    positive output; ComfyUI copies the entries' dicts, keeping their keys, on the way."""
    return bool(conds) and all(c.get(CONDITIONING_KEY) == controller.key for c in conds)


class AfterCFG:
    """The controller's post-CFG hook (wiring checks, local blend, the run's result); shared by
    clones like the patches."""

    def __init__(self, controller: P2PController, level: NoiseLevel) -> None:
        self.controller = controller
        self.level = level

    def __deepcopy__(self, memo: dict) -> "AfterCFG":
        return self

    def __call__(self, args: dict) -> torch.Tensor:
        if not made_by(self.controller, args.get("cond")):
            raise P2PError(
                CONTROLLER,
                "positive",
                "the sampler's positive is not this controller's positive output (e.g. a plain CLIP Text Encode), "
                "so every image would be the source prompt's and the edit would do nothing.",
                "connect the P2P Controller's positive output to the sampler's positive input (any negative prompt).",
            )
        return self.controller.after_cfg(args["denoised"], self.level(args["sigma"]), args.get("input"))


def find_controller(model: Any) -> P2PController | None:
    """The controller that ``install`` put on ``model`` (or on the model it was cloned from), if any."""
    for hook in reversed(getattr(model, "model_options", {}).get("sampler_post_cfg_function", [])):
        if isinstance(hook, AfterCFG):
            return hook.controller
    return None


def installed_controller(model: Any, node: str) -> P2PController:
    """The controller on ``model``; an error naming ``node`` when there is none."""
    controller = find_controller(model)
    if controller is not None:
        return controller
    raise P2PError(node, "model", "this model carries no Prompt-to-Prompt edit.", "connect the P2P Controller's model output, the one the sampler used.")


def install(model: Any, controller: P2PController) -> Any:
    """A clone of ``model`` whose every text attention runs through ``controller``."""
    patched = model.clone()
    level = NoiseLevel()  # one per model: its attention calls and post-CFG hook share the model call's
    if model_family(model) == UNET:
        _install_unet(patched, controller, level)
    else:
        _install_dit(patched, controller, level)
    patched.set_model_sampler_post_cfg_function(AfterCFG(controller, level))
    return patched


def _install_unet(patched: Any, controller: P2PController, level: NoiseLevel) -> None:
    sites = attention_sites(patched)
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {})
    for kind, setter in (("attn1", patched.set_model_attn1_replace), ("attn2", patched.set_model_attn2_replace)):
        existing = replace.get(kind, {})
        for site in sites:
            previous = existing.get(site, existing.get(site[:2]))
            setter(AttentionPatch(controller, level, kind, previous, site), site[0], site[1], site[2])


def _install_dit(patched: Any, controller: P2PController, level: NoiseLevel) -> None:
    import comfy.patcher_extension  # current ComfyUI only, like the DiT models

    dit = patched.model.diffusion_model
    options = patched.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = JointAttention(controller, level, options.get("optimized_attention_override"))
    grid = TokenGrid(patch=int(dit.patch_size), registers=int(getattr(dit, "register_length", 0) or 0))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "p2p_attention", grid)
