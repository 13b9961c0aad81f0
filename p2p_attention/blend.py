"""Local Blend: outside the edited region, the targets follow the source.

As in the paper's implementation, the region is where chosen words attend: their cross-attention
maps at the 16x16 layers of a 64x64 latent (downscale 4), averaged over heads, layers and the steps
so far, max-pooled, normalised to their maximum and thresholded (0.3); the source's region joins
each target's, and the region of "subtract" words is cut out. A user's mask can replace or join it.

The paper blends the noisy latents after each step; here each target's denoised prediction is
blended with the source's (ComfyUI's post-CFG hook, so every stock sampler works). Wherever the
mask is 0 at the last step the target's final latent is the source's for every sampler whose last
step to sigma 0 returns the denoised prediction (euler, ddim, heun, dpmpp_2m, the ancestral and
SDE samplers, ...); multistep samplers that mix in earlier predictions (lms, uni_pc) come close.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .edits import INTERSECT, LocalBlendEdit
from .maps import MapRun

BLEND_DOWNSCALE = 4  # the paper's 16x16 maps of a 512x512 image
POOL_RADIUS = 1  # the paper's 3x3 max-pool


@dataclass(frozen=True)
class BlendPlan:
    """The blend compiled against the prompts' tokens: one weight vector per image (source first)."""

    edit: LocalBlendEdit
    region: tuple[torch.Tensor, ...]  # [tokens of the image]: 1 on the region words
    subtract: tuple[torch.Tensor, ...]  # [tokens of the image]: 1 on the subtract words


def word_region(maps: torch.Tensor, weights: torch.Tensor, size: tuple[int, int], threshold: float, pool: bool) -> torch.Tensor:
    """Where the weighted words attend: ``maps`` ``[tokens, h, w]`` -> bool ``[H, W]``."""
    region = torch.einsum("thw,t->hw", maps, weights.to(maps))[None, None]
    if pool:
        region = F.max_pool2d(region, 2 * POOL_RADIUS + 1, stride=1, padding=POOL_RADIUS)
    region = F.interpolate(region, size=size, mode="nearest")[0, 0]
    return region / region.max().clamp_min(torch.finfo(region.dtype).tiny) > threshold


def user_mask(mask: torch.Tensor, targets: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A MASK ``[1 or targets, H', W']`` resized to the latent: ``[targets, H, W]`` in 0..1."""
    resized = F.interpolate(mask.to(device)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return resized.expand(targets, *size)


def blend_masks(plan: BlendPlan, run: MapRun, targets: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Each target's region ``[targets, H, W]`` in 0..1, from the maps of ``run`` so far."""
    edit = plan.edit
    mask = None
    if edit.source_words or edit.target_words or edit.subtract_words:
        maps = run.mean(run.nearest_downscale(BLEND_DOWNSCALE))
    if edit.source_words or edit.target_words:
        regions = [word_region(m, w, size, edit.threshold, pool=True) for m, w in zip(maps, plan.region)]
        mask = torch.stack([regions[0] | r for r in regions[1:]]).float()
    if edit.mask is not None:
        given = user_mask(edit.mask, targets, size, device)
        if mask is None:
            mask = given
        else:
            mask = torch.minimum(mask, given) if edit.combine == INTERSECT else torch.maximum(mask, given)
    if edit.subtract_words:
        cut = [word_region(m, w, size, edit.threshold, pool=False) for m, w in zip(maps, plan.subtract)]
        mask = mask * ~torch.stack([cut[0] | c for c in cut[1:]])
    return mask


def blend(denoised: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``denoised`` ``[1 + targets, C, (frames,) H, W]`` (source first): targets keep their own values
    only inside their mask ``[targets, H, W]``, the source's elsewhere."""
    source = denoised[:1]
    masks = masks.view(masks.shape[0], *([1] * (denoised.dim() - 3)), *masks.shape[-2:])
    targets = source + masks.to(denoised) * (denoised[1:] - source)
    return torch.cat([source, targets])
