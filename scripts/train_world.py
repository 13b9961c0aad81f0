"""Train the tiny world model (tests/world_model.py) on the synthetic world (tests/world_scenes.py).

    .venv/bin/python scripts/train_world.py --images 8000 --vae-steps 400 --steps 7000 --coarse-share 0.85 --batch 16 --lr 5e-4 --balance-noise-levels --placeless-share 0.25 --adam-beta2 0.99 --out w.safetensors
        # from scratch in about 32 minutes on 2 CPU cores, most steps on half-size latents: colours, backgrounds, most places (README)
    .venv/bin/python scripts/train_world.py --init w.safetensors --images 8000 --batch 16 --lr 6e-4 --steps 2100 --mid-noise-share 1 --placeless-share 0.25 --adam-beta2 0.99 --out w2.safetensors
        # then this three times, each --init the one before (10 minutes each), on the middle noise levels: patterns, then shapes (README)
    python scripts/train_world.py --family flux --device cuda --images 100000 --workers 4 --vae-steps 3000 --vae-batch 64 --steps 40000 --batch 512 --lr 5e-4 --minutes 5.3
    .venv/bin/python scripts/train_world.py --out /tmp/w.safetensors --images 64 --vae-steps 5 --steps 5   # a smoke run
    .venv/bin/python scripts/train_world.py --init tests/data/world_sd15.safetensors --minutes 40   # go on from a checkpoint

Three phases, each resumable from the state folder (``--state``, outside git): the VAE (TAESD,
encoder and decoder, on crops of world pictures), the dataset (scenes rendered, pictures encoded once
by the trained encoder and kept under its weights, so that going on from a checkpoint finds them;
their captions tokenized with the family's ComfyUI tokenizers), and the
denoiser with its text encoder, trained jointly (the family's loss: v prediction on SD1.x's schedule
for ``sd15``, flow matching for ``flux``; 10% of the captions dropped for classifier-free guidance;
the caption kept out of the end and padding tokens, so that it reaches the denoiser through its
words, as Prompt-to-Prompt edits them (``content_free_padding``; from scratch, after the model has
learnt the world with it there: ``content_free_share``); from scratch, half the noise levels drawn
from the top of the schedule (``world_model._noised``), where the layout is decided; an EMA of the
weights is what gets saved). The state is saved every minute; stopping the denoiser (Ctrl-C, or
``--minutes`` running out) saves it and writes the checkpoint of the steps so far, and running the
same command again goes on from there. Everything is drawn from ``--seed`` (on the CPU, so a GPU
run draws the same batches and noise). The result is one checkpoint that the stock
CheckpointLoaderSimple loads once the world architecture is registered. ``--init`` starts the
denoiser, the text encoders and the VAE from a checkpoint the script wrote (the VAE is then kept as
it is), e.g. to go on training a committed model, or to train it for another objective.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_host  # noqa: E402
import world_model  # noqa: E402
import world_scenes  # noqa: E402

CAPTION_DROPOUT = 0.1  # the share of empty captions, for classifier-free guidance
# The share of captions that leave the objects' places out, as a user's prompt mostly does: the
# model then learns to put objects where the seed leads as well as where the words say.
PLACELESS_SHARE = 0.5
VAE_CROP = 48  # pixels: the VAE is convolutional, so it trains on crops (a 6x6 latent) for speed
# How strongly the text encoder is taught to keep the caption out of its end-of-text and padding
# tokens (``content_free_padding``); their hidden states are of unit scale (a final layer norm).
PADDING_WEIGHT = 1.0
LATENT_PENALTY = 1e-3  # keeps the VAE's latents small (its decoder squashes them beyond about +-3)
SAVE_EVERY_S = 60.0


def render_picture(scene: world_scenes.Scene) -> np.ndarray:
    return world_scenes.render(scene)[0]


def render_dataset(count: int, seed: int, workers: int, placeless_share: float = PLACELESS_SHARE) -> tuple[np.ndarray, list[str]]:
    """``count`` scenes drawn in order from ``seed`` (so the dataset does not depend on ``workers``),
    rendered by ``workers`` processes, and their captions (``placeless_share`` of them without places)."""
    rng = np.random.default_rng(seed)
    scenes = [world_scenes.sample_scene(rng) for _ in range(count)]
    with_places = rng.random(count) >= placeless_share
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            pictures = list(pool.map(render_picture, scenes, chunksize=256))
    else:
        pictures = [render_picture(s) for s in tqdm(scenes, desc="render", dynamic_ncols=True)]
    return np.stack(pictures), [world_scenes.caption(s, bool(p)) for s, p in zip(scenes, with_places)]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in 0..1 (TAESD's encoder input, its decoder's output)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


class State:
    """One file per phase in the state folder, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def load(self, name: str) -> dict | None:
        path = self.folder / f"{name}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save(self, name: str, value: dict) -> None:
        partial = self.folder / f".{name}.pt.partial"
        torch.save(value, partial)
        partial.replace(self.folder / f"{name}.pt")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


LATENT_RANGE = 1.0  # the block-average start's latents: colour 0..1 -> -1..1 (TAESD's decoder squashes beyond about 3)


def start_as_block_average(vae: torch.nn.Module) -> None:
    """Start TAESD as an autoencoder that already works: the encoder averages each 8x8 block's colour
    into three latent channels, the others zero (its stride-2 convs as 2x2 means), the decoder repeats it (nearest
    upsampling, its convs as identities), so pictures come back as 8 px mosaics. Each residual block
    starts as the identity (its last conv zero, the others at their default initialisation, so that
    training reaches them). Fine-tuning (``--vae-steps``) then adds the detail inside the blocks."""
    encoder, decoder = vae.taesd_encoder, vae.taesd_decoder
    colours = torch.arange(3)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.zero_()
            if hasattr(module, "conv") and isinstance(module.conv, torch.nn.Sequential):  # a residual Block
                module.conv[-1].weight.zero_()
        for conv in (encoder[0], decoder[-1]):  # picture -> features, features -> picture
            conv.weight.zero_()
            conv.weight[colours, colours, 1, 1] = 1.0
        for conv in (m for m in encoder if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)):
            conv.weight.zero_()
            conv.weight[colours, colours, 1:, 1:] = 0.25  # the mean of the 2x2 block under each output
        for conv in (m for m in decoder if isinstance(m, torch.nn.Conv2d) and m.in_channels == m.out_channels == 64):
            conv.weight.zero_()
            conv.weight[colours, colours, 1, 1] = 1.0
        latent_out, latent_in = encoder[-1], decoder[1]
        latent_out.weight.zero_()
        latent_out.weight[colours, colours, 1, 1] = 2 * LATENT_RANGE
        latent_out.bias[:3] = -LATENT_RANGE
        # The decoder reads the spare latent channels (zero at the start, so the start is exact) with
        # its default weights: zeroed on both sides, they would get no gradient and never learn.
        latent_in.weight[:, colours].zero_()
        latent_in.weight[colours, colours, 1, 1] = 0.5 / LATENT_RANGE
        latent_in.bias[:3] = 0.5


def block_average_latents(images: np.ndarray, channels: int) -> torch.Tensor:
    """What the block-average start of TAESD's encoder computes, without running it: the colour
    means, then zeros in the latent channels beyond them (1 for sd15, 13 for flux)."""
    x = to_tensor(images)
    means = torch.nn.functional.avg_pool2d(x, 8)
    return torch.nn.functional.pad((2 * means - 1) * LATENT_RANGE, (0, 0, 0, 0, 0, channels - 3))


def train_vae(parts, images: np.ndarray, state: State, args: argparse.Namespace) -> None:
    vae = parts.vae.to(args.device)
    saved = state.load("vae")
    optimizer = torch.optim.Adam([p for n, p in vae.named_parameters() if n.startswith("taesd_")], lr=args.vae_lr)
    step = 0
    if saved is None:
        start_as_block_average(vae)
    else:
        check_same_run(saved.get("settings"), args, state.folder, VAE_SETTINGS)
        vae.load_state_dict(saved["vae"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
    generator = np.random.default_rng([args.seed, 1, step])
    last_save = time.monotonic()
    with tqdm(total=args.vae_steps, initial=step, desc="vae", dynamic_ncols=True) as bar:
        while step < args.vae_steps:
            picks = generator.integers(0, len(images), args.vae_batch)
            corners = generator.integers(0, world_scenes.IMAGE_SIZE - VAE_CROP + 1, (args.vae_batch, 2))
            crops = np.stack([images[i, y:y + VAE_CROP, x:x + VAE_CROP] for i, (y, x) in zip(picks, corners)])
            x = to_tensor(crops).to(args.device)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr, 20)
            latents = vae.taesd_encoder(x)
            loss = torch.nn.functional.mse_loss(vae.taesd_decoder(latents), x) + LATENT_PENALTY * latents.pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.5f}")
            if time.monotonic() - last_save > SAVE_EVERY_S or step == args.vae_steps:
                state.save("vae", {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                   "settings": run_settings(args, VAE_SETTINGS)})
                last_save = time.monotonic()
                generator = np.random.default_rng([args.seed, 1, step])


def start_from(parts, family, path: Path) -> None:
    """``--init``: every weight of a world checkpoint of ``family`` (the fp16 of the file, in float32)."""
    import comfy.utils

    saved = comfy.utils.load_torch_file(str(path))
    with torch.no_grad():
        for name, tensor in family.state_dict(parts).items():
            if tensor.numel():  # not a marker key such as v_pred
                tensor.copy_(saved[name])


def dataset_name(parts, args: argparse.Namespace) -> str:
    """The encoded dataset's name in the state's ``datasets`` folder: the encoder's weights as a
    checkpoint keeps them (float16), hashed. So a run going on from a checkpoint (``--init``) finds
    the dataset of the run that wrote it, rather than encoding the pictures again (4.5 minutes of
    the hour on 2 CPU cores), and a changed encoder encodes them anew."""
    digest = hashlib.sha256()
    for tensor in parts.vae.taesd_encoder.state_dict().values():
        digest.update(tensor.detach().cpu().to(torch.float16).numpy().tobytes())
    return f"{args.family}-seed{args.seed}-{args.images}-placeless{args.placeless_share:g}-{digest.hexdigest()[:16]}"


def has_fast_bfloat16(device: str) -> bool:
    """Whether ``device`` computes convolutions in bfloat16 natively (a CPU with AVX512-BF16 or AMX,
    as oneDNN reports; a GPU from Ampere on). The dataset is then encoded in it: twice as fast on
    this 2-core CPU (33 pictures a second against 15, channels-last both), its latents within 0.4%
    of float32's (the std of the difference against theirs), well under the schedule's lowest noise
    level (3%)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.device(device).type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def encode_dataset(parts, images: np.ndarray, captions: list[str], datasets: State, args: argparse.Namespace) -> dict:
    """Latents of every picture (by the trained encoder, channels-last and in bfloat16 where that is
    fast, divided by their std; kept in ``datasets`` under ``dataset_name``) and its caption's tokens."""
    name = dataset_name(parts, args)
    saved = datasets.load(name)
    if saved is None or saved["captions"] != captions:  # none yet, or one of an older world
        with torch.no_grad():
            if args.vae_steps == 0 and args.init is None:  # the untouched block-average start: its latents are block means
                latents = block_average_latents(images, parts.vae.taesd_encoder[-1].out_channels)
                exact = parts.vae.taesd_encoder(to_tensor(images[:16]).to(args.device)).cpu()
                torch.testing.assert_close(latents[:16], exact, atol=1e-4, rtol=1e-4)
            else:
                encoder = parts.vae.taesd_encoder.to(args.device, memory_format=torch.channels_last)
                with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=has_fast_bfloat16(args.device)):
                    latents = torch.cat([encoder(to_tensor(images[i:i + 256]).to(args.device, memory_format=torch.channels_last)).float().cpu()
                                         for i in tqdm(range(0, len(images), 256), desc="encode", dynamic_ncols=True)])
                encoder.to(memory_format=torch.contiguous_format)
        std = float(latents.std())
        saved = {"latents": (latents / std).to(torch.float16), "latent_std": std, "captions": captions}
        datasets.save(name, saved)
    return {
        "latents": saved["latents"],
        "latent_std": saved["latent_std"],
        "tokens": torch.tensor([parts.token_ids(c) for c in captions]),
        "empty": torch.tensor(parts.token_ids("")),
    }


def copying_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """Within it, what autograd saves for backward is copied, where later in-place ops could change
    it: ComfyUI's CLIP and Flux blocks add their residuals in place (``x += ...``). Only around
    those (``Family.adds_in_place``): SD1.x's UNet needs no copies, and without them its step is
    5% faster on 2 CPU cores (3.64 steps a second against 3.46; ``allow_mutation_on_saved_tensors``
    does the same through a Python dispatch mode on every op: a third of a CPU step went to it)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor if tensor.is_leaf else tensor.clone(), lambda tensor: tensor)


def content_free_padding(parts, tokens: torch.Tensor, empty: torch.Tensor, free: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """(what the denoiser sees, the padding loss) for the rows of ``tokens``, encoded in one batch
    with ``empty`` (the empty caption's tokens); ``free`` (bool, per row) picks the rows whose padding
    is made content-free (``content_free_share``).

    A causal text encoder hands its end-of-text and padding tokens the whole caption, and a denoiser
    trained jointly with it learns to read everything there: the world model trained before this gave
    those tokens 55% to 81% of its cross-attention, each word 4% or 5%, so no word's attention changed
    the picture (a reweight of -10 left it as it was). Here, in every trained encoder, each token from the first
    end token on of the ``free`` rows is taught (the returned MSE) to be what it is in the empty caption, and the denoiser
    sees the empty caption's states there: the caption reaches it through its words' tokens only, as
    Prompt-to-Prompt assumes. (Only tokens whose id is the empty caption's at
    the same place: SD1.x pads with end tokens, so that is all of them; T5 pads with another id, so
    its end token itself is left as it is.)"""
    encoded = parts.encode_tokens(torch.cat([tokens, empty[None]]))
    cond, loss = {}, torch.zeros(())
    for key, ids in parts.split_tokens(tokens).items():
        hidden, pooled = encoded[key]
        hidden, empty_hidden = hidden[:-1], hidden[-1:]
        pooled = pooled[:-1] if pooled is not None else None
        if any(parts.encoder(key) is module for module in parts.trainable().values()):
            empty_ids = parts.split_tokens(empty[None])[key]
            after_end = (ids == parts.encoder(key).special_tokens["end"]).int().cumsum(1) > 0
            tail = (after_end & (ids == empty_ids) & free[:, None]).to(hidden.device)[..., None]
            error = ((hidden - empty_hidden.detach()) ** 2 * tail).sum() / (tail.sum() * hidden.shape[-1]).clamp(min=1)
            loss = loss.to(error) + error
            hidden = torch.where(tail, empty_hidden, hidden)
        cond[key] = (hidden, pooled)
    return cond, loss


def content_free_share(step: int, planned: int, ramp: tuple[float, float]) -> float:
    """The share of captions whose padding is made content-free at ``step``: none before ``ramp[0]``
    of the planned steps, all from ``ramp[1]`` on, rising linearly between.

    From scratch, a denoiser that may read the caption from its words only learns slowly: on 2 CPU
    cores the background colour was still at chance (0.27) after 20 minutes, where one reading the
    causal encoder's padding, which carries the whole caption, followed it (1.00) after 14. So a
    model from scratch first learns the world with the caption in the padding, and then the share of
    captions that keep it only in their words rises to all."""
    start, end = ramp
    if end <= start:
        return float(step >= start * planned)
    return min(1.0, max(0.0, (step / planned - start) / (end - start)))


class NoiseLevelBalance:
    """Weighs each row's loss by its noise level's running mean loss to the power ``-power``
    (``--balance-noise-levels``), with the total unchanged (the mean over levels): at power 1 every
    level pulls alike, as EDM2's uncertainty weighting makes them (Karras et al. 2024); at 0 nothing
    changes.

    The v loss is U-shaped over the schedule: on the hour model, 0.22 at its top, 0.036 at sigma
    1.6 and 0.20 near its bottom (128 pictures, ad hoc). So the middle, where the caption decides
    the objects' outlines, gets a small share of the gradient from every batch that also holds the
    top (the ``_noised`` docstring in tests/world_model.py: the top drowns the outlines). At power 1,
    10,000 steps from scratch were then ready for the 10 minutes on the middle band (shapes 0.76),
    but the top's smaller share placed the objects worse (0.70; docs/world_training.md). Levels are
    grouped in ``bands`` of the schedule's steps; each band's mean is an average that forgets at
    ``decay`` per row (about 100 steps at batch 16). Tensor ops only: no wait for a GPU."""

    def __init__(self, levels: int, power: float = 1.0, bands: int = 20, decay: float = 0.99) -> None:
        self.levels, self.power, self.bands, self.decay = levels, power, bands, decay
        self.means = torch.zeros(bands)  # 0 until a band has rows (a mean loss is positive)

    def __call__(self, losses: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        bands = (steps * self.bands // self.levels).to(losses.device)
        self.means = self.means.to(losses.device)
        counts = torch.bincount(bands, minlength=self.bands)
        batch_means = torch.zeros_like(self.means).index_add_(0, bands, losses.detach()) / counts.clamp(min=1)
        kept = torch.where(self.means > 0, self.decay ** counts, 0.0)  # a band's first rows set its mean
        self.means = torch.where(counts > 0, kept * self.means + (1 - kept) * batch_means, self.means)
        seen = self.means[self.means > 0]
        weights = self.means.clamp(min=1e-12) ** -self.power
        total = seen.mean() / (seen * seen ** -self.power).mean()  # the weighted mean over levels is the plain one
        return (losses * weights[bands] * total).mean()

    def state_dict(self) -> dict:
        return {"means": self.means.cpu()}

    def load_state_dict(self, saved: dict) -> None:
        self.means = saved["means"]


# What a state was trained with, the VAE's and the denoiser's. Going on from it with other values
# would mix two recipes without a word, or, once it is done, use the earlier run's VAE or write the
# earlier run's model under the new --out (a state keeps the plan of steps it was given: more
# steps than that are a run from its checkpoint, --init).
VAE_SETTINGS = ("images", "vae_steps", "vae_batch", "vae_lr")
RUN_SETTINGS = ("images", "placeless_share", "steps", "batch", "lr", "adam_beta2", "ema", "content_free_ramp", "high_noise_share",
                "mid_noise_share", "balance_noise_levels", "coarse_share", "coarse_batch")


def run_settings(args: argparse.Namespace, names: tuple[str, ...] = RUN_SETTINGS) -> dict:
    return {name: getattr(args, name) for name in names}


def check_same_run(saved: dict | None, args: argparse.Namespace, folder: Path, names: tuple[str, ...] = RUN_SETTINGS) -> None:
    """Refuses to go on from a state trained with other settings (``saved``: its ``run_settings`` of
    ``names``; None in states written before they were kept). The state folder is named by the
    family, the seed and the ``--init`` checkpoint only, so two recipes from one checkpoint, or two
    from scratch, would share it."""
    if saved is None:
        return
    now = run_settings(args, names)
    # A setting added since the state was written (--adam-beta2) had its default then.
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {now[name]})" for name in names if name in saved and saved[name] != now[name]]
    if changed:
        raise SystemExit(f"train_world.py: the state in {folder} was trained with {', '.join(changed)}: run with "
                         "those to go on from it, or give another --state (or remove that folder) to start anew")


def coarse(latents: torch.Tensor) -> torch.Tensor:
    """The latents at half their size (each 2x2 block's mean), for ``--coarse-share``: the pictures'
    layout, colours and background at 64 px. The UNet (convolutions and attention over any size)
    and the DiT (patches of any grid) take them as they are, and a step on them costs a fraction of
    one at the full size: on 2 CPU cores 4.5 steps a second at batch 32 against 3.0 at batch 16
    (three times the samples a second; four timings gave 2.6 to 3.1 times). So from scratch the model can learn the world on them
    first, and its details on the full latents after."""
    return torch.nn.functional.avg_pool2d(latents.float(), 2).to(latents.dtype)


def train_denoiser(parts, family, dataset: dict, state: State, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """Trains until ``--steps`` or until ``--minutes`` of this session are spent (the state is saved
    either way); returns the EMA of the weights. With ``--minutes``, the learning-rate schedule is
    fitted to the time: after its first 100 timed steps and at every save, it is set to end at the
    step the rest of the time allows at the speed so far."""
    parts.clip.cond_stage_model.to(args.device)  # with the text encoders that stay fixed (flux's CLIP-L)
    modules = {name: m.to(args.device) for name, m in parts.trainable().items()}
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.adam_beta2), weight_decay=0.0, fused=True)  # one kernel per step: about 9% of a CPU step
    step, planned = 0, args.steps
    balance = NoiseLevelBalance(len(parts.model.model_sampling.sigmas), args.balance_noise_levels) if args.balance_noise_levels else None
    saved = state.load("denoiser")
    if saved is not None:
        check_same_run(saved.get("settings"), args, state.folder)
        for name in modules:
            modules[name].load_state_dict(saved["modules"][name])
            ema[name].load_state_dict(saved["ema"][name])
        optimizer.load_state_dict(saved["optimizer"])
        step, planned = saved["step"], saved.get("planned", args.steps)
        if balance is not None and "balance" in saved:
            balance.load_state_dict(saved["balance"])
    latents = dataset["latents"].to(args.device)
    coarse_latents = coarse(latents) if args.coarse_share else None
    tokens, empty = dataset["tokens"], dataset["empty"]  # on the CPU: the text encoder reads their lengths there
    with torch.no_grad():
        parts.check_encode_tokens(tokens[:4])
    skipped = 0
    deadline = time.monotonic() + 60 * args.minutes
    last_save = time.monotonic()
    timed_from_step = step + 20  # the speed is measured from here (after warm-up)
    interrupted = []  # Ctrl-C (SIGINT) ends the loop after the step under way, as --minutes does
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    with tqdm(total=planned, initial=step, desc=family.name, dynamic_ncols=True) as bar:
        while step < planned:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            on_coarse = step < args.coarse_share * planned
            batch, source = (args.coarse_batch, coarse_latents) if on_coarse else (args.batch, latents)
            picks = torch.randint(0, len(latents), (batch,), generator=generator)
            batch_tokens = tokens[picks].clone()
            batch_tokens[torch.rand(batch, generator=generator) < CAPTION_DROPOUT] = empty
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, planned, args.lr, 200)
            optimizer.zero_grad(set_to_none=True)
            share = content_free_share(step, planned, args.content_free_ramp)
            free = torch.rand(batch, generator=generator) < share
            with copying_saved_tensors():
                cond, padding_loss = content_free_padding(parts, batch_tokens, empty, free)
            with copying_saved_tensors() if family.adds_in_place else contextlib.nullcontext():
                losses, levels = family.loss(parts, source[picks.to(args.device)].float(), cond, generator, (args.high_noise_share, args.mid_noise_share))
            loss = balance(losses, levels) if balance is not None else losses.mean()
            (loss + PADDING_WEIGHT * padding_loss).backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
                optimizer.step()
            else:  # a rare overflow must not turn every weight into NaN
                skipped += 1
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, module in modules.items():
                    torch._foreach_lerp_(list(ema[name].parameters()), list(module.parameters()), 1 - decay)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", padding=f"{padding_loss.item():.4f}", words_only=f"{share:.2f}", skipped=skipped)
            if step == timed_from_step:
                timed_from = time.monotonic()
            # Fitted after 100 timed steps, and again at every save: the speed changes when other
            # jobs share the machine.
            fitting = step == timed_from_step + 100 or (step > timed_from_step + 100 and time.monotonic() - last_save > SAVE_EVERY_S)
            if fitting and math.isfinite(args.minutes):
                rate = (step - timed_from_step) / (time.monotonic() - timed_from)
                planned = max(step + 1, min(args.steps, step + int(rate * (deadline - time.monotonic()))))
                bar.total = planned
                print(f"\n{rate:.1f} steps/s: the schedule ends at step {planned}")
            stop = bool(interrupted) or time.monotonic() > deadline
            if time.monotonic() - last_save > SAVE_EVERY_S or step == planned or stop:
                state.save("denoiser", {
                    "modules": {n: m.state_dict() for n, m in modules.items()},
                    "ema": {n: m.state_dict() for n, m in ema.items()},
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "planned": planned,
                    "settings": run_settings(args),
                    **({"balance": balance.state_dict()} if balance is not None else {}),
                })
                last_save = time.monotonic()
            if stop:
                print(f"stopped at step {step} of {planned}: the same command goes on from here")
                break
    signal.signal(signal.SIGINT, previous_handler)
    return ema


def write_checkpoint(parts, family, ema: dict[str, torch.nn.Module], latent_std: float, path: Path) -> None:
    """The EMA weights, the VAE scaled so that the model sees latents of unit std, in float16."""
    import comfy.utils

    for name, module in parts.trainable().items():
        module.cpu().load_state_dict(ema[name].state_dict())
    parts.clip.cond_stage_model.cpu()
    parts.vae.cpu()
    with torch.no_grad():
        # ComfyUI hands the model (encoder output / vae_scale) * the latent format's scale_factor.
        parts.vae.vae_scale.fill_(parts.config.latent_format.scale_factor * latent_std)
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in family.state_dict(parts).items()}
    family.check_detection(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    comfy.utils.save_torch_file(state, str(partial))
    partial.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd15", choices=sorted(world_model.FAMILIES))
    parser.add_argument("--state", type=Path, default=REPO / ".world_train", help="resumable state (outside git)")
    parser.add_argument("--out", type=Path, help="the checkpoint to write (default: the family's committed one)")
    parser.add_argument("--init", type=Path, help="start from this checkpoint of the family (its VAE kept, no VAE phase)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=3000, help="pictures in the dataset (each encoded once)")
    parser.add_argument("--placeless-share", type=float, default=PLACELESS_SHARE, metavar="SHARE",
                        help="share of the captions that leave the objects' places out (default %(default)s)")
    parser.add_argument("--vae-steps", type=int, default=0, help="VAE fine-tuning steps (0: the block-average start)")
    parser.add_argument("--vae-batch", type=int, default=12)
    parser.add_argument("--vae-lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=1500, help="denoiser steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--adam-beta2", type=float, default=0.999,
                        help="AdamW's second-moment decay (0.99 in the README's 78-minute recipe, which favours shapes over "
                             "places; docs/world_training.md)")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--content-free-ramp", type=float, nargs=2, metavar=("START", "END"),
                        help="fractions of the steps between which the share of captions read from their words only "
                             "rises from 0 to 1 (default: 0.25 0.65 from scratch; with --init, all from the first step)")
    parser.add_argument("--high-noise-share", type=float, metavar="SHARE",
                        help="share of the rows whose noise level is drawn from the top 40%% of the schedule, where the "
                             "caption decides the layout; the others uniformly (default: 0.5 from scratch; with --init, 0)")
    parser.add_argument("--mid-noise-share", type=float, default=0.0, metavar="SHARE",
                        help="share of the rows whose noise level is drawn from the middle of the schedule, where the caption "
                             "decides the objects' outlines: 1 to go on from an hour model that draws circles and squares "
                             "alike (README, docs/world_training.md); the others uniformly")
    parser.add_argument("--balance-noise-levels", type=float, nargs="?", const=1.0, default=0.0, metavar="POWER",
                        help="weigh each row's loss by its noise level's running mean loss to the power -POWER (bare: 1, "
                             "every level pulls alike; then the middle band teaches shapes after 10,000 steps, but places "
                             "suffer: docs/world_training.md); default 0, off")
    parser.add_argument("--coarse-share", type=float, default=0.0, metavar="SHARE",
                        help="train the first SHARE of the steps on the latents at half their size (2x2 means), --coarse-batch rows a step: "
                             "2.6 to 3.1 times the samples a second on 2 CPU cores in four timings (README, 'How long training takes')")
    parser.add_argument("--coarse-batch", type=int, default=32, help="rows a step on the half-size latents (--coarse-share)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="processes that render the dataset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train (a GPU when there is one)")
    parser.add_argument("--minutes", type=float, default=math.inf, help="stop the denoiser after this long, save, and write the checkpoint")
    args = parser.parse_args()
    args.content_free_ramp = tuple(args.content_free_ramp or ((0.0, 0.0) if args.init else (0.25, 0.65)))
    if args.high_noise_share is None:
        args.high_noise_share = 0.0 if args.init else 0.5
    if not 0 <= args.placeless_share <= 1:
        parser.error("--placeless-share is a share of the captions: 0 to 1")
    if args.balance_noise_levels < 0:
        parser.error("--balance-noise-levels is a power of the levels' mean losses: at least 0")
    if not 0 <= args.coarse_share <= 1:
        parser.error("--coarse-share is a share of the steps: 0 to 1")
    if args.coarse_share and math.isfinite(args.minutes):  # the rate of its first steps is not the rate of its last
        parser.error("--coarse-share trains at two speeds, so --minutes cannot fit its schedule to the time: give --steps "
                     "(Ctrl-C still saves, and the same command goes on from there)")
    if min(args.high_noise_share, args.mid_noise_share) < 0 or args.high_noise_share + args.mid_noise_share > 1:
        parser.error("--high-noise-share and --mid-noise-share are shares of the rows: at least 0, together at most 1")

    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a GPU's fast float32 matmuls

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    comfy_host.import_comfy()
    family = world_model.FAMILIES[args.family]
    parts = family.build()
    state = State(args.state / (f"{args.family}-seed{args.seed}" + (f"-from-{args.init.stem}" if args.init else "")))
    images, captions = render_dataset(args.images, args.seed, args.workers, args.placeless_share)
    if args.init is None:
        train_vae(parts, images, state, args)
    else:
        start_from(parts, family, args.init)
    dataset = encode_dataset(parts, images, captions, State(args.state / "datasets"), args)
    del images
    ema = train_denoiser(parts, family, dataset, state, args)
    write_checkpoint(parts, family, {n: m.cpu() for n, m in ema.items()}, dataset["latent_std"], args.out or family.checkpoint)
    print(f"training session: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
