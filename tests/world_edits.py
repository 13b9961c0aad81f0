"""Prompt-to-Prompt edits of the tiny world model, run through the pack's real nodes, and scored.

Each case makes a source scene from a seed, an edit of its caption, and the scene a perfect edit
would show. ``run_case`` runs the P2P edit (edit nodes -> P2P Controller -> stock KSampler -> VAE
Decode) and the baseline a user would try instead: the target prompt generated plainly from the
same seed. Real-image cases render the scene, encode it (stock VAE Encode), invert it (P2P DDIM
Invert) and edit it; their baseline is the target prompt from the seed. Scores come from
``world_scenes``: the edited object's mask against the source's (structure IoU), the asked
colour / shape / background read back (edit success), PSNR outside the edited object (background),
and for inversions the reconstruction's PSNR against the rendered picture.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import world_model
import world_scenes as ws

NEGATIVE = ""  # the model learnt the unconditional branch from empty captions

CASES = ("colour swap", "shape swap", "background refine", "reweight", "local blend", "real image: null-text", "real image: direct")


@dataclass(frozen=True)
class Settings:
    """Sampling and P2P settings of a run (the controller's and local blend's inputs)."""

    steps: int = 10
    cfg: float = 5.0
    sampler: str = "ddim"
    scheduler: str = "ddim_uniform"
    cross_replace_steps: float = 0.6  # the controller's default
    self_replace_steps: float = 0.4
    self_replace_resolution: str = "1/2 and coarser"  # the controller's default
    threshold: float = 0.3
    start_blend: float = 0.2
    reweight_scale: float = -1.0
    null_text_iterations: int = 3  # the paper's 10 costs 50 s a picture on this project's CPU
    # Whether the edit prompts name each object's place, as half the SD1.x world's training captions
    # and all the Flux world's do. A place word pins the layout in this world, so from the same seed
    # the edited prompt alone keeps it too; without them the layout is left to the seed, as a user's
    # prompt leaves it (README, "Edit quality").
    places: bool = False


# Each family sampled as its kind is: SD1.x with DDIM; the flow (Flux) world with Euler on its own
# "simple" schedule, which starts at pure noise (DDIM's "ddim_uniform" would start at sigma 0.9).
# The Flux world was trained on captions with places only, and draws few objects without them.
FAMILY_SETTINGS = {"sd15": Settings(), "flux": Settings(sampler="euler", scheduler="simple", places=True)}


@dataclass(frozen=True)
class Edit:
    """One case on one seed: the source scene, the target scene and how the prompt is edited."""

    case: str
    source: ws.Scene
    target: ws.Scene
    edited: int | None  # index of the edited object (None: the background is edited)


@dataclass
class Score:
    structure_iou: float
    edit_success: float
    background_psnr: float | None  # None where the background is what the edit changes
    reconstruction_psnr: float | None = None


@dataclass
class CaseResult:
    edit: Edit
    valid: bool  # the source shows its object(s): an edit of it can be scored
    p2p: Score | None
    plain: Score | None
    images: dict[str, np.ndarray]  # "source", "p2p", "plain": uint8 [H, W, 3]


def make_edit(case: str, seed: int) -> Edit:
    """The case's source and target scenes for ``seed`` (scenes from their own generator)."""
    rng = np.random.default_rng([seed, CASES.index(case)])
    objects = 2 if case == "local blend" else 1
    source = ws.sample_scene(rng, objects=objects)
    if case in ("background refine",):
        source = replace(source, pattern="plain")
    if case == "reweight":
        source = replace(source, pattern=str(rng.choice(["striped", "dotted"])))
    first = source.objects[0]
    if case in ("colour swap", "local blend") or case.startswith("real image"):
        unused = [c for c in ws.OBJECT_COLOURS if c not in {o.colour for o in source.objects}]
        changed = replace(first, colour=str(rng.choice(unused)))
        return Edit(case, source, replace(source, objects=(changed,) + source.objects[1:]), 0)
    if case == "shape swap":
        changed = replace(first, shape=str(rng.choice([s for s in ws.SHAPES if s != first.shape])))
        return Edit(case, source, replace(source, objects=(changed,) + source.objects[1:]), 0)
    if case == "background refine":
        return Edit(case, source, replace(source, pattern=str(rng.choice(["striped", "dotted"]))), None)
    if case == "reweight":
        return Edit(case, source, replace(source, pattern="plain"), None)
    raise ValueError(f"unknown case {case!r}")


def prompt(scene: ws.Scene, settings: Settings) -> str:
    """An edit's prompt for ``scene``: its caption, with or without the places (``settings.places``)."""
    return ws.caption(scene, settings.places)


def edit_nodes(host: Any, edit: Edit, settings: Settings) -> Any:
    """The P2P_EDIT the case's edit nodes make (as a user wires them)."""
    nodes = host.pack.NODE_CLASS_MAPPINGS
    source, target = prompt(edit.source, settings), prompt(edit.target, settings)
    if edit.case == "background refine":
        return nodes["P2PRefine"]().edit(source, target)[0]
    if edit.case == "reweight":
        return nodes["P2PReweight"]().edit(edit.source.pattern, settings.reweight_scale, None, source)[0]
    p2p_edit = nodes["P2PWordSwap"]().edit(source, target)[0]
    if edit.case == "local blend":
        before, after = edit.source.objects[0], edit.target.objects[0]
        words = lambda o: f"{o.colour}, {o.shape}"  # noqa: E731
        p2p_edit = nodes["P2PLocalBlend"]().edit(p2p_edit, words(before), words(after), "", settings.threshold, settings.start_blend)[0]
    return p2p_edit


# --- scoring ---------------------------------------------------------------------------------------

def source_masks(edit: Edit, source_image: np.ndarray, real: bool) -> list[np.ndarray] | None:
    """The source objects' masks: exact for a rendered (real) picture, read back from a generated
    one (None when an object's colour is missing from it: that source has nothing to edit)."""
    if real:
        return ws.render(edit.source)[1]
    found = ws.find_objects(source_image)
    matches = [ws.best_match(found, o) for o in edit.source.objects]
    if any(m is None for m in matches):
        return None
    return [m.mask for m in matches]


def score(edit: Edit, source_image: np.ndarray, masks: list[np.ndarray], image: np.ndarray) -> Score:
    """How well ``image`` shows ``edit.target`` while keeping the source's structure."""
    found = ws.find_objects(image)
    if edit.edited is None:  # the background changed: the objects must stay
        matches = [ws.best_match(found, o) for o in edit.target.objects]
        ious = [ws.iou(m.mask, mask) if m is not None else 0.0 for m, mask in zip(matches, masks)]
        background = ws.read_background(image)
        return Score(float(np.mean(ious)), float(background == (edit.target.background, edit.target.pattern)), None)
    wanted = edit.target.objects[edit.edited]
    match = ws.best_match(found, wanted)
    source_mask = masks[edit.edited]
    iou = ws.iou(match.mask, source_mask) if match is not None else 0.0
    # The asked change, whatever the structure: the asked colour is there (colour edits), or the
    # object of the source's colour has the asked shape (shape edits).
    if wanted.colour != edit.source.objects[edit.edited].colour:
        success = match is not None
    else:
        success = match is not None and match.shape == wanted.shape
    outside = ~(source_mask | (match.mask if match is not None else source_mask))
    return Score(iou, float(success), ws.psnr(image, source_image, outside))


# --- running ---------------------------------------------------------------------------------------

def load_world(host: Any, family: str = "sd15", checkpoint: Path | None = None) -> tuple[Any, Any, Any]:
    """(model, clip, vae) of a family's world checkpoint (the committed one unless ``checkpoint`` is
    given), through the stock CheckpointLoaderSimple."""
    world_model.register_world_architecture(family)
    name = world_model.install_world_checkpoint(host.work_dir / "models" / "checkpoints", family, checkpoint)
    with torch.inference_mode():
        return host.nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


def to_pixels(images: torch.Tensor) -> list[np.ndarray]:
    return [(i.clamp(0, 1) * 255).round().byte().cpu().numpy() for i in images]


def encode(host: Any, clip: Any, text: str) -> Any:
    return host.nodes.CLIPTextEncode().encode(clip, text)[0]


def generate(host: Any, world: tuple, prompt: str, seed: int, settings: Settings) -> np.ndarray:
    """A plain generation (stock KSampler) of ``prompt``."""
    model, clip, vae = world
    latent = host.nodes.EmptyLatentImage().generate(ws.IMAGE_SIZE, ws.IMAGE_SIZE, 1)[0]
    samples = host.nodes.KSampler().sample(model, seed, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                           encode(host, clip, prompt), encode(host, clip, NEGATIVE), latent)[0]
    return to_pixels(host.nodes.VAEDecode().decode(vae, samples)[0])[0]


def follow_caption(host: Any, world: tuple, seed: int, settings: Settings) -> tuple[int, dict[str, float]]:
    """A random scene's caption (the scene drawn from ``seed``) generated plainly from ``seed``:
    (its objects, how well the picture shows the caption, ``world_scenes.caption_following``)."""
    scene = ws.sample_scene(np.random.default_rng([seed, 99]))
    with torch.inference_mode():
        picture = generate(host, world, ws.caption(scene), seed, settings)
    return len(scene.objects), ws.caption_following(picture, scene)


# Schedule steps (of 1000) at which ``shape_word_use`` measures; on SD1.x's schedule sigma 5.1, 2.3,
# 1.6, 1.2 and 0.57: the middle, where the caption decides the objects' outlines.
WORD_USE_STEPS = (800, 600, 500, 400, 200)


def shape_word_use(host: Any, world: tuple, count: int = 48, seed: int = 123) -> list[tuple[float, float, float]]:
    """Does the denoiser draw an object's shape from its word? Per step of ``WORD_USE_STEPS``:
    (sigma, its denoised error with the right caption, with circle and square swapped), over
    ``count`` single circles and squares (captions without places, the same noise for both
    captions), inside the latent cells each object touches. A model that reads the shape from the
    word errs more with the wrong one (the committed model: 0.049 against 0.094 at sigma 1.6); one
    that draws circles and squares alike errs the same (an hour from scratch: 0.070 and 0.071).
    SD1.x world models (``apply_model`` without a pooled vector)."""
    model, clip, vae = world
    rng = np.random.default_rng(seed)
    scenes: list[ws.Scene] = []
    while len(scenes) < count:
        scene = ws.sample_scene(rng, objects=1)
        if scene.objects[0].shape in ("circle", "square"):
            scenes.append(scene)
    rendered = [ws.render(scene) for scene in scenes]
    pixels = torch.from_numpy(np.stack([picture for picture, _ in rendered])).float() / 255  # [N, H, W, 3], as VAE Encode takes
    masks = torch.from_numpy(np.stack([masks[0] for _, masks in rendered])).float()[:, None]
    cells = torch.nn.functional.max_pool2d(masks, 8)  # the latent cells (8 px) each object touches
    swapped = {"circle": "square", "square": "circle"}
    captions = [ws.caption(scene, places=False) for scene in scenes]
    wrong = [" ".join(swapped.get(word, word) for word in caption.split(" ")) for caption in captions]
    sampling = model.model.model_sampling
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with torch.inference_mode():
        latents = model.model.process_latent_in(host.nodes.VAEEncode().encode(vae, pixels)[0]["samples"].float())
        conds = [torch.cat([encode(host, clip, text)[0][0] for text in texts]).float() for texts in (captions, wrong)]
        for step in WORD_USE_STEPS:
            sigma = sampling.sigmas[step].expand(count)
            noisy = sampling.noise_scaling(sigma, torch.randn(latents.shape, generator=generator), latents)
            errors = []
            for cond in conds:
                denoised = model.model.apply_model(noisy, sigma, c_crossattn=cond)
                errors.append(float(((denoised - latents) ** 2 * cells).sum() / (cells.sum() * latents.shape[1])))
            rows.append((float(sigma[0]), *errors))
    return rows


def p2p_generate(host: Any, world: tuple, p2p_edit: Any, seed: int, settings: Settings) -> tuple[list[np.ndarray], Any, dict]:
    """The P2P run from noise: [source, target] pictures, the patched model and the sampled latent."""
    model, clip, vae = world
    latent = host.nodes.EmptyLatentImage().generate(ws.IMAGE_SIZE, ws.IMAGE_SIZE, 1)[0]
    patched, positive, batch = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(
        model, clip, p2p_edit, latent, settings.cross_replace_steps, settings.self_replace_steps, "", settings.self_replace_resolution)
    samples = host.nodes.KSampler().sample(patched, seed, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                           positive, encode(host, clip, NEGATIVE), batch)[0]
    return to_pixels(host.nodes.VAEDecode().decode(vae, samples)[0]), patched, samples


def p2p_real(host: Any, world: tuple, edit: Edit, p2p_edit: Any, picture: np.ndarray, method: str, settings: Settings) -> list[np.ndarray]:
    """A rendered picture encoded (VAE Encode), inverted (P2P DDIM Invert) and edited: [reconstruction, target]."""
    model, clip, vae = world
    pixels = torch.from_numpy(picture).float()[None] / 255.0
    latent = host.nodes.VAEEncode().encode(vae, pixels)[0]
    negative = encode(host, clip, NEGATIVE)
    inverted, inverted_model, _ = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]().invert(
        model, encode(host, clip, prompt(edit.source, settings)), negative, latent, settings.steps, settings.cfg, settings.scheduler,
        method, settings.null_text_iterations)
    patched, positive, batch = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(
        inverted_model, clip, p2p_edit, inverted, settings.cross_replace_steps, settings.self_replace_steps, "", settings.self_replace_resolution)
    samples = host.nodes.KSamplerAdvanced().sample(patched, "disable", 0, settings.steps, settings.cfg, settings.sampler, settings.scheduler,
                                                   positive, negative, batch, 0, 10000, "disable")[0]
    return to_pixels(host.nodes.VAEDecode().decode(vae, samples)[0])


def run_case(host: Any, world: tuple, case: str, seed: int, settings: Settings, baseline: bool = True) -> CaseResult:
    """One case on one seed: the P2P edit and (``baseline``) the plain generation of its target."""
    edit = make_edit(case, seed)
    with torch.inference_mode():
        p2p_edit = edit_nodes(host, edit, settings)
        real = case.startswith("real image")
        if real:
            picture = ws.render(edit.source)[0]
            method = case.split(": ")[1]
            source_image, p2p_image = p2p_real(host, world, edit, p2p_edit, picture, method, settings)
        else:
            (source_image, p2p_image), _, _ = p2p_generate(host, world, p2p_edit, seed, settings)
        plain_image = generate(host, world, prompt(edit.target, settings), seed, settings) if baseline else None
    reference = picture if real else source_image
    images = {"source": source_image, "p2p": p2p_image, **({"plain": plain_image} if baseline else {})}
    masks = source_masks(edit, reference, real)
    if masks is None:
        return CaseResult(edit, False, None, None, images)
    p2p = score(edit, source_image if not real else reference, masks, p2p_image)
    if real:
        p2p.reconstruction_psnr = ws.psnr(source_image, picture)
    plain = score(edit, reference, masks, plain_image) if baseline else None
    return CaseResult(edit, True, p2p, plain, images)
