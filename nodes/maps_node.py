"""P2P Attention Maps: each token's cross-attention map of a finished run, as a labelled grid."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..p2p_attention.edits import word_list
from ..p2p_attention.errors import P2PError
from ..p2p_attention.tokens import PAD, START
from .blend_nodes import RUN_INPUTS, find_run

NODE_NAME = "P2P Attention Maps"
RESOLUTIONS = {"1/4": 4, "1/2": 2, "1/8": 8, "1/1": 1}
TILE, LABEL, COLUMNS = 192, 22, 8
# A perceptual dark-to-bright colour ramp (black, purple, red, orange, pale yellow) for the overlay.
RAMP = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32) / 255


def token_maps(maps: torch.Tensor, tokens: Any, words: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(label, map ``[h, w]``) per tile: every token but padding and a template's run of start tokens
    after its first (Flux.2's system prompt: 31 tokens that spell no word), or each chosen word (its
    tokens summed)."""
    if not words:
        previous = [None] + [t.role for t in tokens.tokens[:-1]]
        return [(t.text or "<emb>", maps[i]) for i, (t, before) in enumerate(zip(tokens.tokens, previous))
                if t.role != PAD and not (t.role == START and before == START)]
    tiles = []
    for word in words:
        positions = tokens.find(word)
        if positions:
            tiles.append((word, maps[positions].sum(dim=0)))
    return tiles


def colorize(heat: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
    """``heat`` ``[H, W]`` in 0..1 -> RGB ``[H, W, 3]``: grey, or a colour ramp over the image."""
    if image is None:
        return heat[..., None].expand(-1, -1, 3)
    position = heat * (len(RAMP) - 1)
    low = position.floor().long().clamp(max=len(RAMP) - 2)
    fraction = (position - low)[..., None]
    colour = RAMP[low] * (1 - fraction) + RAMP[low + 1] * fraction
    return 0.4 * image + 0.6 * colour


def text_layout(text: str, width: float, measure: Callable[[str], float]) -> list[tuple[float, int, str]]:
    """(x, line, word) of each word of ``text``, wrapped to ``width`` pixels.

    Words are placed one by one with a gap of an "n"'s width: Pillow's default font draws a space
    about 2 px wide at its size, so 'a photo of' read 'a photoof'. A word wider than a line gets a
    line of its own (and is cut by the sheet's edge).
    """
    gap = measure("n")
    placed, x, line = [], 0.0, 0
    for word in text.split():
        length = measure(word)
        if x > 0 and x + length > width:
            x, line = 0.0, line + 1
        placed.append((x, line, word))
        x += length + gap
    return placed


def _draw_words(draw: ImageDraw.ImageDraw, origin: tuple[int, int], placed: list[tuple[float, int, str]], font: Any) -> None:
    for x, line, word in placed:
        draw.text((origin[0] + x, origin[1] + line * LABEL), word, fill="black", font=font)


def grid(title: str, tiles: list[tuple[str, torch.Tensor]], image: torch.Tensor | None, columns: int) -> Image.Image:
    """The paper's figure layout: one tile per token, normalised to its own maximum, text below;
    the title (the prompt) wrapped to the sheet's width above."""
    font = ImageFont.load_default()
    measure = partial(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength, font=font)  # the sheet's size depends on it
    heading = text_layout(title, columns * TILE - 8, measure)
    top = LABEL * (1 + max((line for _, line, _ in heading), default=0))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * TILE, top + rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    _draw_words(draw, (4, 4), heading, font)
    backdrop = None
    if image is not None:
        backdrop = F.interpolate(image.permute(2, 0, 1)[None].float(), size=(TILE, TILE), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    for index, (label, heat) in enumerate(tiles):
        heat = F.interpolate(heat[None, None].float(), size=(TILE, TILE), mode="bilinear", align_corners=False)[0, 0]
        heat = (heat / heat.max().clamp_min(1e-12)).clamp(0, 1)
        pixels = (colorize(heat, backdrop).clamp(0, 1) * 255).round().byte().numpy()
        x, y = (index % columns) * TILE, top + (index // columns) * (TILE + LABEL)
        sheet.paste(Image.fromarray(pixels), (x, y))
        first_line = [word for word in text_layout(label, TILE - 8, measure) if word[1] == 0]
        _draw_words(draw, (x + 4, y + TILE + 4), first_line, font)
    return sheet


class P2PAttentionMaps:
    DESCRIPTION = (
        "Shows where each word attends: for the source and every edited image, each token's cross-attention "
        "map (averaged over heads, the layers of one resolution and all steps of the run) as a labelled grid, "
        "as in the paper's figures. Connect the model the sampler used and the sampler's output latent; plug "
        "the decoded images in to overlay the maps on them. Maps are collected during sampling at no extra "
        "sampling pass, so changing words or resolution here re-renders without sampling again."
    )
    CATEGORY = "P2P"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("maps",)
    OUTPUT_TOOLTIPS = ("One grid per image of the run (source first), for Preview Image or Save Image.",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                **RUN_INPUTS,
                "words": (
                    "STRING",
                    {"multiline": False, "default": "", "tooltip": "Words to show, comma separated (a word's tokens summed); empty shows every token but padding (of a template, its first token only)."},
                ),
                "resolution": (
                    list(RESOLUTIONS),
                    {"default": "1/4", "tooltip": "Which layers: map size relative to the latent. 1/4 is the paper's 16x16 for a 512x512 image; finer maps are sharper but noisier."},
                ),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Optional: the decoded images of the run (VAE Decode), to overlay the maps on."}),
            },
        }

    def render(self, model: Any, samples: dict, words: str, resolution: str, images: torch.Tensor | None = None) -> tuple:
        controller, run = find_run(model, samples, NODE_NAME)
        downscale = RESOLUTIONS[resolution]
        if downscale not in run.sums:
            have = ", ".join(f"1/{d}" for d in sorted(run.sums)) or "none"
            raise P2PError(NODE_NAME, "resolution", f"this model has no cross-attention layers at {resolution} of the latent size.", f"choose one it has: {have}.")
        prompts = [controller.plan.source] + [t.tokens for t in controller.plan.targets]
        if images is not None and images.shape[0] != len(prompts):
            raise P2PError(
                NODE_NAME, "images", f"{images.shape[0]} images for a run of {len(prompts)} prompts.", "connect the VAE Decode of this sampler's output."
            )
        chosen = word_list(words)
        sheets = []
        for index, (tokens, maps) in enumerate(zip(prompts, run.mean(downscale))):
            tiles = token_maps(maps.cpu(), tokens, chosen)
            sheets.append((tokens.text, tiles, None if images is None else images[index].cpu()))
        found = {label for _, tiles, _ in sheets for label, _ in tiles}
        missing = [w for w in chosen if w not in found]
        if missing:
            raise P2PError(NODE_NAME, "words", f"{', '.join(map(repr, missing))} is in none of the run's prompts.", "name words exactly as they appear in the prompts.")
        columns = min(COLUMNS, max(len(tiles) for _, tiles, _ in sheets))
        rendered = [grid(title, tiles, image, columns) for title, tiles, image in sheets]
        height = max(r.height for r in rendered)
        batch = [numpy.asarray(_pad(r, height), dtype=numpy.float32) / 255 for r in rendered]
        return (torch.from_numpy(numpy.stack(batch)),)


def _pad(sheet: Image.Image, height: int) -> Image.Image:
    """Prompts have different token counts; an IMAGE batch needs one size."""
    padded = Image.new("RGB", (sheet.width, height), "white")
    padded.paste(sheet, (0, 0))
    return padded
