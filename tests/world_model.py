"""The tiny world model: a text-to-image model in ComfyUI's real SD1.x architecture, trained on the
synthetic world of ``world_scenes`` by ``scripts/train_world.py``.

Like ``tiny_models``, it is a test-only subclass of ComfyUI's real ``SD15`` model config with small
widths, put first in ``comfy.supported_models.models`` so that the stock CheckpointLoaderSimple
loads its checkpoint (``FAMILIES["sd15"].checkpoint``). Everything else is ComfyUI's: ``UNetModel``,
the CLIP text model (``SDClipModel``, CLIP-L's last layer after the final layer norm, as SD1.x) with
the real CLIP tokenizer, SD1.x's noise schedule (predicting v, as SD2.x-v models do: ``_sd15_loss``),
and TAESD as the VAE. (The stock loader builds a KL autoencoder only at its full width of 128
channels, ~80M parameters; a TAESD found in a checkpoint's ``first_stage_model.`` keys it loads as
it is.)

The layout mirrors SD1.5's at 1/4 of its latent size and 1/10 of its width, for 128 px images
(16x16 latents): four levels (1/1, 1/2, 1/4, 1/8 of the latent), cross-attention at the first three
and in the middle block, as SD1.5 has at 64/32/16 (and 8 in the middle). So the maps P2P reads
exist at every resolution SD1.5 has them, relative to the latent: Local Blend's 1/4 (4x4 here,
16x16 in SD1.5) and the two choices of self-attention replacement (1/2 and coarser, or 1/4 and
coarser).

A model family names how a family's checkpoint is built, trained and saved. ``flux`` is the same
world in ComfyUI's real Flux.1-schnell architecture (``comfy.ldm.flux``, configs shared with
``tiny_dit_models``): no guidance embedding, so it is sampled with real CFG and learns the
unconditional branch from dropped captions as ``sd15`` does; 128 wide (4 heads of 32), 3 double and
3 single blocks over 8x8 image tokens (16x16 latents, patch 2); flow matching as ComfyUI's CONST
model sampling defines it; TAESD with Flux's 16 latent channels. Its text encoders are Flux's
(``FluxClipModel`` with the real tokenizers, T5's padded to 64 tokens, not 256): T5 gives the tokens the image attends to and learns
with the DiT; CLIP-L gives the pooled vector and stays fixed at its (deterministic) initialisation,
as Flux.1 was trained on frozen encoders: the caption reaches the image through the T5 tokens'
attention, which is what P2P controls, and a jointly trained pooled vector (which the P2P
controller gives each prompt its own of) would be a second path for it, one that P2P cannot steer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

import tiny_dit_models
import tiny_models

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

TEXT_WIDTH = 48
TEXT_CONFIG = tiny_models.text_config(TEXT_WIDTH, "quick_gelu", layers=4, heads=4)

UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "adm_in_channels": None,
    "num_res_blocks": [1, 1, 1, 1],
    "channel_mult": [1, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": TEXT_WIDTH,
}
HEADS = 4
V_PREDICTION_KEY = "v_pred"  # the key ComfyUI's BaseModel.state_dict_for_saving adds for v-prediction models
MATCH_KEYS = ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels", "use_temporal_attention",
              "transformer_depth", "channel_mult", "num_res_blocks")

# Flux.1-schnell's layout (tiny_dit_models' Flux configs) at the world's sizes; T5-XXL's layout at
# 48 wide (as sd15's text encoder); tiny_dit_models' CLIP-L (32 wide) for the pooled vector.
FLUX_T5 = {"d_model": 48, "d_kv": 12, "num_heads": 4, "d_ff": 96, "num_layers": 3}
# T5's tokens are padded to 64 (Flux pads to 256): as many as the 8x8 image tokens, so the text keeps
# the minor share of the joint attention it has in Flux at real sizes (256 of 4352 tokens at
# 1024 px), instead of 256 of 320; a training step is ~3.5x faster on the CPU. The longest world
# caption has 37 T5 tokens.
FLUX_T5_MIN_LENGTH = 64
FLUX_DETECTED: dict[str, Any] = {
    **tiny_dit_models.DETECTED["flux_schnell"], "hidden_size": 128, "context_in_dim": FLUX_T5["d_model"],
    "vec_in_dim": tiny_dit_models.CLIP_L["hidden_size"], "depth": 3, "depth_single_blocks": 3,
}

_REGISTERED: dict[str, type] = {}


def _world_sd15_class() -> type:
    import comfy.model_base
    import comfy.supported_models as supported
    import comfy.supported_models_base as base

    encoder = tiny_models.text_encoder_class("world_l", "clip_l", TEXT_CONFIG, projected_pooled=False)

    class WorldSD15(supported.SD15):
        """SD15 with the world model's widths: matched only by its own UNet. A checkpoint with the
        ``v_pred`` key that ComfyUI writes into v-prediction models is one (SDXL's config reads that
        key too; SD15's leaves such models to a Model Sampling Discrete node)."""

        unet_config = {k: UNET_CONFIG[k] for k in MATCH_KEYS}
        unet_extra_config = {**supported.SD15.unet_extra_config, "num_heads": HEADS, "num_head_channels": -1}

        def model_type(self, state_dict: dict, prefix: str = "") -> Any:
            return comfy.model_base.ModelType.V_PREDICTION if V_PREDICTION_KEY in state_dict else super().model_type(state_dict, prefix)

        def clip_target(self, state_dict: Any = None) -> Any:
            return base.ClipTarget(tiny_models.single_tokenizer_class("l", TEXT_WIDTH, True), tiny_models.single_clip_class("l", encoder))

    return WorldSD15


def _world_flux_class() -> type:
    target = tiny_dit_models.flux_clip_target(tiny_dit_models.CLIP_L, FLUX_T5, "WorldFluxTextEncoders", FLUX_T5_MIN_LENGTH)
    # The matched keys are tiny_dit_models' own: its flux_schnell differs in depth and widths.
    return tiny_dit_models.sized_config_class("FluxSchnell", FLUX_DETECTED, tiny_dit_models._MATCHED["flux_schnell"],
                                              tiny_dit_models.EXTRA["flux_schnell"], target, "WorldFlux")


def register_world_architecture(family: str = "sd15") -> type:
    """Put ``family``'s world model config first in ComfyUI's model registry and return it
    (idempotent; after boot). One family at a time: the 2024 host has no Flux to build on."""
    import comfy.supported_models as supported

    if family not in _REGISTERED:
        _REGISTERED[family] = {"sd15": _world_sd15_class, "flux": _world_flux_class}[family]()
    cls = _REGISTERED[family]
    if cls not in supported.models:
        supported.models.insert(0, cls)
    return cls


# --- model families: what the training script needs of one --------------------------------------

@dataclass
class Parts:
    """A family's trainable modules: the denoiser, the text encoders and the VAE, as ComfyUI builds them."""

    config: Any  # the registered model config (supported_models_base.BASE)
    model: Any  # comfy.model_base.BaseModel: .diffusion_model, .model_sampling
    clip: Any  # comfy.sd.CLIP: .tokenizer, .cond_stage_model
    vae: torch.nn.Module  # comfy.taesd.taesd.TAESD
    encoders: dict[str, str]  # tokenizer key -> the cond_stage_model's SDClipModel attribute ("l" -> "clip_l")
    trained: dict[str, torch.nn.Module]  # what learns (and is saved as the EMA), by name

    def encoder(self, key: str) -> torch.nn.Module:
        """The ``SDClipModel`` CLIPTextEncode runs on the tokens of ``key`` (``forward(token lists) -> (cond, pooled)``)."""
        return getattr(self.clip.cond_stage_model, self.encoders[key])

    def token_ids(self, text: str) -> list[int]:
        """The token ids ComfyUI's CLIPTextEncode gives the text encoders for a short prompt, the
        encoders' rows side by side (one tensor row per caption keeps the dataset and the caption
        dropout the same for every family); ``split_tokens`` takes them apart."""
        tokens = self.clip.tokenize(text)
        ids = []
        for key, width in self.token_widths.items():
            chunks = tokens[key]
            if len(chunks) != 1 or len(chunks[0]) != width:
                raise ValueError(f"caption is not one {width}-token chunk for {key}: {text!r}")
            ids += [int(token) for token, _ in chunks[0]]
        return ids

    @cached_property
    def token_widths(self) -> dict[str, int]:
        """Tokens per encoder of a short prompt (CLIP's 77, T5 padded to its minimum length);
        kept, since every training step splits its tokens by them."""
        empty = self.clip.tokenize("")
        return {key: len(empty[key][0]) for key in self.encoders}

    def split_tokens(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows of ``token_ids`` -> each encoder's token ids."""
        keys, widths = zip(*self.token_widths.items())
        return dict(zip(keys, tokens.split(widths, dim=1)))

    def encode_tokens(self, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """(hidden states, pooled vector) of every encoder for rows of ``token_ids``, as one batched
        call each (``SDClipModel.forward`` walks every token of every row in Python, the bulk of a
        GPU training step). v0.3.75's ``SDClipModel``; ``check_encode_tokens`` compares them."""
        return {key: _encode_batch(self.encoder(key), ids) for key, ids in self.split_tokens(tokens).items()}

    def check_encode_tokens(self, tokens: torch.Tensor) -> None:
        """``encode_tokens`` must give what the stock ``SDClipModel.forward`` gives."""
        batched = self.encode_tokens(tokens)
        for key, ids in self.split_tokens(tokens).items():
            stock = self.encoder(key)(ids.tolist())[:2]
            for ours, theirs in zip(batched[key], stock):
                if theirs is not None:
                    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    def trainable(self) -> dict[str, torch.nn.Module]:
        return self.trained


def _encode_batch(encoder: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``SDClipModel.forward`` for a batch of token id rows (no textual-inversion embeddings, no
    attention mask: neither world encoder has one)."""
    before_end = (tokens == encoder.special_tokens["end"]).int().cumsum(1) == 0
    num_tokens = (before_end.sum(1) + 1).tolist()  # up to and including the first end token (on the CPU: no wait for the GPU)
    device = encoder.transformer.get_input_embeddings().weight.device
    embeds = encoder.transformer.get_input_embeddings()(tokens.to(device), out_dtype=torch.float32)
    outputs = encoder.transformer(None, None, embeds=embeds, num_tokens=num_tokens, intermediate_output=encoder.layer_idx,
                                  final_layer_norm_intermediate=encoder.layer_norm_hidden_state, dtype=torch.float32)
    hidden = outputs[0].float() if encoder.layer == "last" else outputs[1].float()
    pooled = None  # SDClipModel's choice: the unprojected pooled output where asked and present
    if len(outputs) >= 4 and not encoder.return_projected_pooled and outputs[3] is not None:
        pooled = outputs[3].float()
    elif len(outputs) >= 3 and outputs[2] is not None:
        pooled = outputs[2].float()
    return hidden, pooled


Encoded = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # Parts.encode_tokens: key -> (hidden, pooled)


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[], Parts]
    # (parts, latents, encoded captions, generator, noise-band shares) -> (each row's loss, the
    # schedule step its noise level was drawn at)
    loss: Callable[[Parts, torch.Tensor, Encoded, torch.Generator, tuple[float, float]], tuple[torch.Tensor, torch.Tensor]]
    state_dict: Callable[[Parts], dict[str, torch.Tensor]]  # the checkpoint, as ComfyUI saves one
    check_detection: Callable[[dict[str, torch.Tensor]], None]  # raises unless ComfyUI detects the checkpoint as this family
    checkpoint: Path  # where the committed checkpoint lives
    # Whether the denoiser adds residuals in place (Flux's blocks: ``x += ...``), so that training
    # must copy what autograd saves (``scripts/train_world.py``, ``copying_saved_tensors``). SD1.x's
    # UNet does not: copying there cost 5% of a CPU step.
    adds_in_place: bool


def _reset(module: torch.nn.Module) -> None:
    """Default PyTorch initialisation for every layer (ComfyUI's layers skip it: they expect weights
    to be loaded); normalisations 1 / 0, embeddings N(0, 1).

    Embeddings at N(0, 1), not CLIP's N(0, 0.02): AdamW moves each coordinate by up to about the
    learning rate a step, so from CLIP's start the words' own differences are soon outweighed and
    words that the denoiser cannot yet tell apart get one embedding and keep it (an hour from scratch
    gave "circle" and "square" states 0.04 apart and drew them alike); from N(0, 1) they stay apart,
    and the same hour placed two and three objects better (docs/world_training.md)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.modules.conv._ConvNd):
                torch.nn.modules.conv._ConvNd.reset_parameters(sub)
            elif isinstance(sub, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(sub)
            elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if sub.weight is not None:
                    sub.weight.fill_(1.0)
                    sub.bias.zero_()
            elif isinstance(sub, torch.nn.Embedding):
                torch.nn.Embedding.reset_parameters(sub)


def _build_sd15() -> Parts:
    import comfy.sd
    import comfy.taesd.taesd

    cls = register_world_architecture()
    config = cls(json.loads(json.dumps(UNET_CONFIG)))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({V_PREDICTION_KEY: torch.tensor([])}, "", device=torch.device("cpu"))
    clip = comfy.sd.CLIP(config.clip_target())
    vae = comfy.taesd.taesd.TAESD()
    for module in (model.diffusion_model, clip.cond_stage_model, vae):
        _reset(module)
    # ComfyUI builds text encoders frozen (SDClipModel.freeze) and in float16 (where AdamW's moments
    # underflow to inf at the first step): this one learns, in float32 like the UNet.
    clip.cond_stage_model.requires_grad_(True).to(torch.float32)
    with torch.no_grad():
        vae.vae_scale.fill_(config.latent_format.scale_factor)
        clip.cond_stage_model.clip_l.logit_scale.fill_(4.6055)
    return Parts(config, model, clip, vae, {"l": "clip_l"}, {"unet": model.diffusion_model, "text": clip.cond_stage_model.clip_l})


# Bands of the schedule's steps (fractions of its length) that training draws a share of its noise
# levels from (``_noised``; ``scripts/train_world.py --high-noise-share / --mid-noise-share``):
HIGH_NOISE = (0.6, 1.0)  # sigma 2.3 and up on SD1.x's (0.6 and up on Flux.1-schnell's): where the caption decides the layout
MID_NOISE = (0.2, 0.7)  # sigma 0.57 to 3.3 on SD1.x's: where it decides the objects' outlines (circle or square)


def _noised(parts: Parts, latents: torch.Tensor, generator: torch.Generator, shares: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma, noise, noisy latents, schedule steps): a draw from the model's own table of noise levels, from
    ``HIGH_NOISE`` and ``MID_NOISE`` for ``shares`` of the rows and uniform for the others, and the
    latents noised at it as the model's sampling noises them (``noise_scaling``).

    The middle is for going on from a model that has learnt everything but the shapes: 10 minutes
    from an hour model that drew circles and squares alike taught it them on the middle band (shapes
    0.77; its error inside the objects at sigma 1.6: 0.055 with the right word, 0.082 with circle and
    square swapped), not on uniform draws (0.64; 0.065 and 0.071), nor with half from the top and a
    third from sigma 0.57 to 2.3 (0.067 and 0.069): the top's errors are the largest (the picture is
    still undecided there) and drown the outlines', and at the lowest levels the noisy picture shows
    them."""
    sampling = parts.model.model_sampling
    count, levels = latents.shape[0], len(sampling.sigmas)
    high_share, mid_share = shares
    steps = torch.randint(0, levels, (count,), generator=generator)
    high = torch.randint(int(HIGH_NOISE[0] * levels), int(HIGH_NOISE[1] * levels), (count,), generator=generator)
    choice = torch.rand(count, generator=generator)
    steps = torch.where(choice < high_share, high, steps)
    if mid_share:  # drawn only when asked: without it, a seed draws what it drew before the middle band existed
        mid = torch.randint(int(MID_NOISE[0] * levels), int(MID_NOISE[1] * levels), (count,), generator=generator)
        steps = torch.where((choice >= high_share) & (choice < high_share + mid_share), mid, steps)
    sigma = sampling.sigmas[steps].to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    return sigma, noise, sampling.noise_scaling(sigma, noise, latents), steps


def _sd15_loss(parts: Parts, latents: torch.Tensor, encoded: Encoded, generator: torch.Generator, shares: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD2.x-v's training objective on SD1.x's schedule: v prediction at a discrete timestep (``_noised``),
    through ComfyUI's V_PREDICTION model sampling (x = x0 + sigma * eps; the v loss is the denoised
    error weighted (sigma^2 + 1) / sigma^2).

    Not SD1.x's eps prediction: its loss weighs the denoised error by 1 / sigma^2, nearly nothing at
    the noise levels where the caption has to decide the background and the layout, and the first
    world model, trained on eps, drew them from the starting noise (its denoised error at the
    schedule's top, 1.7, was above the latents' own variance, 1; any background word gave the
    same picture)."""
    sampling = parts.model.model_sampling
    sigma, _, noisy, steps = _noised(parts, latents, generator, shares)
    prediction = parts.model.diffusion_model(sampling.calculate_input(sigma, noisy), timesteps=sampling.timestep(sigma), context=encoded["l"][0])
    denoised = sampling.calculate_denoised(sigma, prediction, noisy)
    weight = (sigma**2 + 1) / sigma**2
    return weight * (denoised - latents).pow(2).flatten(1).mean(1), steps


def _sd15_state_dict(parts: Parts) -> dict[str, torch.Tensor]:
    vae_sd = dict(parts.vae.state_dict())
    vae_sd.setdefault("vae_shift", torch.tensor(0.0))
    return parts.model.state_dict_for_saving(parts.clip.get_sd(), vae_sd, None)


def _check_sd15_detection(state: dict[str, torch.Tensor]) -> None:
    """A written checkpoint must be detected as the world model's config, with its exact layout."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    diff = {k: (detected.get(k), v) for k, v in UNET_CONFIG.items() if detected.get(k) != v}
    if diff:
        raise RuntimeError(f"world model UNet is detected with a different layout: {diff}")
    config = comfy.model_detection.model_config_from_unet(dict(state), "model.diffusion_model.")
    if type(config) is not register_world_architecture():
        raise RuntimeError(f"world model checkpoint is detected as {type(config).__name__}")


def _build_flux() -> Parts:
    import comfy.sd
    import comfy.taesd.taesd

    cls = register_world_architecture("flux")
    config = cls(json.loads(json.dumps(FLUX_DETECTED)))  # a deep copy, as detection returns it
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    clip = comfy.sd.CLIP(config.clip_target())
    vae = comfy.taesd.taesd.TAESD(latent_channels=config.latent_format.latent_channels)
    # tiny_dit_models' initialisation: it knows the RMS norms (Flux's q/k norms, T5's layer norms)
    # that _reset does not; the usual variance-preserving one, without its attention gains.
    tiny_dit_models.initialise("dit", model.diffusion_model, 0)
    tiny_dit_models.initialise("text", clip.cond_stage_model, 0)
    _reset(vae)
    clip.cond_stage_model.to(torch.float32)
    t5 = clip.cond_stage_model.t5xxl.requires_grad_(True)  # CLIP-L stays frozen (the module docstring says why)
    with torch.no_grad():
        vae.vae_scale.fill_(config.latent_format.scale_factor)
        vae.vae_shift.fill_(config.latent_format.shift_factor)  # the model sees (latent - shift) * scale
    return Parts(config, model, clip, vae, {"l": "clip_l", "t5xxl": "t5xxl"}, {"dit": model.diffusion_model, "t5": t5})


def _flux_loss(parts: Parts, latents: torch.Tensor, encoded: Encoded, generator: torch.Generator, shares: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow as ComfyUI's CONST model sampling defines it: x = (1 - sigma) x0 + sigma * noise,
    the model predicts noise - x0 (its denoised is x - sigma * output), at a sigma drawn from the
    model's own table by ``_noised`` (Flux.1-schnell's: shift 1, so t / 1000 for t = 1..1000)."""
    sampling = parts.model.model_sampling
    sigma, noise, noisy, steps = _noised(parts, latents, generator, shares)
    prediction = parts.model.diffusion_model(noisy, sampling.timestep(sigma), context=encoded["t5xxl"][0], y=encoded["l"][1])
    return (prediction - (noise - latents)).pow(2).flatten(1).mean(1), steps


def _flux_state_dict(parts: Parts) -> dict[str, torch.Tensor]:
    return parts.model.state_dict_for_saving(parts.clip.get_sd(), dict(parts.vae.state_dict()), None)


def _check_flux_detection(state: dict[str, torch.Tensor]) -> None:
    tiny_dit_models.check_detected(state, FLUX_DETECTED, register_world_architecture("flux"), "world model (flux)")


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", _build_sd15, _sd15_loss, _sd15_state_dict, _check_sd15_detection, DATA / "world_sd15.safetensors", adds_in_place=False),
    "flux": Family("flux", _build_flux, _flux_loss, _flux_state_dict, _check_flux_detection, DATA / "world_flux.safetensors", adds_in_place=True),
}


def install_world_checkpoint(checkpoints_dir: Path, family: str = "sd15", checkpoint: Path | None = None) -> str:
    """Link a family's checkpoint (the committed one unless ``checkpoint`` is given) into a ComfyUI
    checkpoints folder; returns its file name there."""
    source = Path(checkpoint or FAMILIES[family].checkpoint).resolve()
    link = Path(checkpoints_dir) / source.name
    if link.is_symlink() and link.resolve() != source:
        link.unlink()
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return source.name
