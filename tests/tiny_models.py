"""Tiny random-weight checkpoints in ComfyUI's real SD1.5, SD2.x (v-prediction) and SDXL architectures.

ComfyUI detects a checkpoint's architecture from the shapes of its UNet weights and takes the first
model config in ``comfy.supported_models.models`` whose ``unet_config`` matches. The real configs
only match the real widths (SD1.5: 320 channels, 768-wide text), so ``register_tiny_architectures``
puts test-only subclasses of the real ``SD15`` / ``SD20`` / ``SDXL`` configs with tiny widths at the
front of that list. Everything else is ComfyUI's own: the model classes (``BaseModel`` / ``SDXL``),
``UNetModel``, the CLIP text model and ``SDClipModel`` / ``SDXLClipModel`` wrappers, the CLIP
tokenizer with its real 49408-token vocabulary, the checkpoint key layouts (``process_*_for_saving``)
and the loader (``CheckpointLoaderSimple`` / ``comfy.sd.load_checkpoint_guess_config``).

The VAE is ComfyUI's TAESD (8x downscale, 4 latent channels): the stock loader picks the KL
autoencoder's config from key names only, with a fixed width of 128 (about 80M parameters), while
it loads a TAESD found in a checkpoint's ``first_stage_model.`` keys as it is.

Every tensor is drawn from its own generator, seeded from ``seed`` and the tensor's name, so a
checkpoint is a pure function of ``(kind, seed)`` (byte-identical files, in both ComfyUI versions).
Weights are stored in float16 to keep the files small; ComfyUI loads them into its usual dtypes.

Usage, after ``comfy_host.boot()``::

    register_tiny_architectures()
    write_tiny_checkpoint("sd15", checkpoints_dir / tiny_checkpoint_name("sd15"), seed=0)
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

KINDS = ("sd15", "sd2v", "sdxl")

VOCAB_SIZE = 49408  # the real CLIP BPE vocabulary (ComfyUI's sd1_tokenizer)
START, END = 49406, 49407

# Text encoders: ComfyUI's CLIPTextModel with small widths. Three layers, because SD2 and SDXL read
# the penultimate layer and ComfyUI requires abs(layer_idx) < num_layers.
TEXT_ENCODERS: dict[str, dict[str, Any]] = {
    # name: hidden size, activation (OpenAI CLIP uses quick_gelu, OpenCLIP gelu)
    "sd15_l": {"hidden_size": 64, "hidden_act": "quick_gelu"},
    "sd2_h": {"hidden_size": 64, "hidden_act": "gelu"},
    "sdxl_l": {"hidden_size": 32, "hidden_act": "quick_gelu"},
    "sdxl_g": {"hidden_size": 64, "hidden_act": "gelu"},
}
TEXT_LAYERS = 3
TEXT_HEADS = 2

SD15_CONTEXT = TEXT_ENCODERS["sd15_l"]["hidden_size"]  # 64
SD2_CONTEXT = TEXT_ENCODERS["sd2_h"]["hidden_size"]  # 64
SDXL_CONTEXT = TEXT_ENCODERS["sdxl_l"]["hidden_size"] + TEXT_ENCODERS["sdxl_g"]["hidden_size"]  # 96
SDXL_POOLED = TEXT_ENCODERS["sdxl_g"]["hidden_size"]  # clip_g's text projection is square: 64
SDXL_ADM = SDXL_POOLED + 6 * 256  # pooled text + six 256-wide size/crop embeddings: 1600

MODEL_CHANNELS = 32  # GroupNorm(32) needs a multiple of 32

# Full UNet configs in the form ComfyUI's model_detection.detect_unet_config derives from weights
# (checked when a checkpoint is written). transformer_depth_output lists the output blocks from the
# last one to the first (UNetModel pops from its end).
_UNET_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": MODEL_CHANNELS,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1.5 layout at three levels with attention at half and quarter size (middle block included),
    # conv (1x1) proj_in/proj_out, 2 heads everywhere. Sites: in 3, 5; middle; out 0, 1, 2, 3.
    # No attention at the latent size keeps the 512x512 workflows fast on a CPU (sd2v has it).
    "sd15": {
        **_UNET_BASE,
        "adm_in_channels": None,
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 1, 1],
        "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": SD15_CONTEXT,
    },
    # SD2 layout: linear proj_in/proj_out, heads of 16 channels.
    "sd2v": {
        **_UNET_BASE,
        "adm_in_channels": None,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": SD2_CONTEXT,
    },
    # SDXL layout: three levels, no attention at latent size, several transformer blocks per site with
    # a depth that differs between levels (2 at half size, 3 at quarter size and in the middle), and
    # the pooled-text + size "adm" input (label_emb).
    # Sites: in 2 (x2), 4 (x3); middle (x3); out 0, 1 (x3), 2, 3 (x2).
    "sdxl": {
        **_UNET_BASE,
        "num_classes": "sequential",
        "adm_in_channels": SDXL_ADM,
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 2, 3],
        "transformer_depth_output": [0, 0, 2, 2, 3, 3],
        "transformer_depth_middle": 3,
        "use_linear_in_transformer": True,
        "context_dim": SDXL_CONTEXT,
    },
}

# Sanity numbers the tests check against (cross-attention sites and transformer blocks).
EXPECTED_SITES = {"sd15": 7, "sd2v": 7, "sdxl": 7}
EXPECTED_BLOCKS = {"sd15": 7, "sd2v": 7, "sdxl": 2 + 3 + 3 + 3 + 3 + 2 + 2}

_REGISTERED: dict[str, type] = {}


def tiny_checkpoint_name(kind: str) -> str:
    """The file name the tests use for a tiny checkpoint in the checkpoints folder."""
    _check_kind(kind)
    return f"tiny_{kind}.safetensors"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")


def text_config(hidden_size: int, hidden_act: str, layers: int = TEXT_LAYERS, heads: int = TEXT_HEADS) -> dict[str, Any]:
    """A CLIP text model config (the transformers ``CLIPTextConfig`` fields ComfyUI reads), small."""
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": END,
        "hidden_act": hidden_act,
        "hidden_size": hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": hidden_size,
        "torch_dtype": "float32",
        "vocab_size": VOCAB_SIZE,
    }


def _text_config(name: str) -> dict[str, Any]:
    spec = TEXT_ENCODERS[name]
    return text_config(spec["hidden_size"], spec["hidden_act"])


def text_config_path(name: str, config: dict[str, Any]) -> str:
    """ComfyUI 2024 reads a text model's config from a JSON file only: write it once, by content."""
    text = json.dumps(config, indent=1, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "comfy-tiny-models"
    path = folder / f"{name}-{digest}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.{os.getpid()}"
        partial.write_text(text)
        os.replace(partial, path)
    return str(path)


def _accepts(func: Any, name: str) -> bool:
    return name in inspect.signature(func).parameters


def text_encoder_class(name: str, clip_name: str, config: dict[str, Any], *, layer: str = "last", layer_idx: int | None = None,
                       pad: int = END, final_norm: bool = True, projected_pooled: bool = True) -> type:
    """An ``SDClipModel`` (ComfyUI's CLIP text model wrapper) with the small text model ``config``."""
    import comfy.sd1_clip as sd1_clip

    has_model_options = _accepts(sd1_clip.SDClipModel.__init__, "model_options")  # current, not 2024

    class TinyTextEncoder(sd1_clip.SDClipModel):
        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None, **kwargs: Any) -> None:
            extra = {}
            if has_model_options:
                extra["model_options"] = {**(model_options or {}), "model_name": clip_name}
            super().__init__(
                device=device, dtype=dtype, layer=layer, layer_idx=layer_idx,
                textmodel_json_config=text_config_path(name, config),
                special_tokens={"start": START, "end": END, "pad": pad},
                layer_norm_hidden_state=final_norm, return_projected_pooled=projected_pooled, **extra,
            )

    TinyTextEncoder.__name__ = TinyTextEncoder.__qualname__ = f"Tiny_{name}"
    return TinyTextEncoder


def single_clip_class(clip_name: str, text_encoder: type) -> type:
    """``SD1ClipModel`` (one text encoder named ``clip_<clip_name>``) around ``text_encoder``."""
    import comfy.sd1_clip as sd1_clip

    class TinyClip(sd1_clip.SD1ClipModel):
        def __init__(self, device: Any = "cpu", dtype: Any = None, **kwargs: Any) -> None:
            super().__init__(device=device, dtype=dtype, clip_name=clip_name, clip_model=text_encoder, **kwargs)

    TinyClip.__name__ = TinyClip.__qualname__ = f"TinyClip_{clip_name}"
    return TinyClip


def single_tokenizer_class(clip_name: str, width: int, pad_with_end: bool) -> type:
    """``SD1Tokenizer`` whose ``SDTokenizer`` takes textual-inversion embeddings ``width`` wide."""
    import comfy.sd1_clip as sd1_clip

    class TinyTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory: Any = None, **kwargs: Any) -> None:
            def tokenizer(**kw: Any) -> Any:
                return sd1_clip.SDTokenizer(pad_with_end=pad_with_end, embedding_size=width,
                                            embedding_key=f"clip_{clip_name}", **kw)

            super().__init__(embedding_directory=embedding_directory, clip_name=clip_name, tokenizer=tokenizer, **kwargs)

    TinyTokenizer.__name__ = TinyTokenizer.__qualname__ = f"TinyTokenizer_{clip_name}"
    return TinyTokenizer


def _classes() -> dict[str, type]:
    """The tiny model configs, built on ComfyUI's classes (imported only once the host is booted)."""
    import comfy.model_base
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models as supported
    import comfy.supported_models_base as base

    has_model_options = _accepts(sd1_clip.SDClipModel.__init__, "model_options")  # current, not 2024
    # SD1.x: CLIP-L's last layer after the final layer norm. The checkpoint format drops clip_l's
    # text projection (as ComfyUI's SD15 saving does), so the pooled output is the unprojected one.
    sd15_encoder = text_encoder_class("sd15_l", "clip_l", _text_config("sd15_l"), projected_pooled=False)
    # SD2.x: OpenCLIP-H's penultimate layer (with the final layer norm), padded with 0.
    sd2_encoder = text_encoder_class("sd2_h", "clip_h", _text_config("sd2_h"), layer="hidden", layer_idx=-2, pad=0)
    # SDXL: CLIP-L's penultimate layer without the final norm; CLIP-G's likewise, plus its projected
    # pooled output (clip_l's pooled output is discarded by SDXLClipModel and not saved).
    sdxl_l = text_encoder_class("sdxl_l", "clip_l", _text_config("sdxl_l"), layer="hidden", layer_idx=-2, final_norm=False, projected_pooled=False)
    sdxl_g = text_encoder_class("sdxl_g", "clip_g", _text_config("sdxl_g"), layer="hidden", layer_idx=-2, pad=0, final_norm=False)

    class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
        """ComfyUI's SDXL two-encoder model (concatenated hidden states, clip_g pooled) at tiny widths."""

        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None, **kwargs: Any) -> None:
            torch.nn.Module.__init__(self)
            options = {"model_options": model_options or {}} if has_model_options else {}
            self.clip_l = sdxl_l(device=device, dtype=dtype, **options)
            self.clip_g = sdxl_g(device=device, dtype=dtype, **options)
            self.dtypes = {dtype}

    class TinySDXLTokenizer(sdxl_clip.SDXLTokenizer):
        """ComfyUI's SDXL tokenizer pair with embedding widths of the tiny encoders."""

        def __init__(self, embedding_directory: Any = None, **kwargs: Any) -> None:
            self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, embedding_size=TEXT_ENCODERS["sdxl_l"]["hidden_size"],
                                               embedding_key="clip_l", **kwargs)
            self.clip_g = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, pad_with_end=False,
                                               embedding_size=TEXT_ENCODERS["sdxl_g"]["hidden_size"], embedding_key="clip_g", **kwargs)

    def matching(kind: str) -> dict[str, Any]:
        """The keys the real configs match on, with the tiny values."""
        config = UNET_CONFIGS[kind]
        keys = ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels", "use_temporal_attention",
                "transformer_depth", "channel_mult")
        return {k: config[k] for k in keys}

    class TinySD15(supported.SD15):
        unet_config = matching("sd15")
        unet_extra_config = {**supported.SD15.unet_extra_config, "num_heads": 2, "num_head_channels": -1}

        def clip_target(self, state_dict: Any = None) -> Any:
            return base.ClipTarget(single_tokenizer_class("l", TEXT_ENCODERS["sd15_l"]["hidden_size"], True), single_clip_class("l", sd15_encoder))

    class TinySD2V(supported.SD20):
        unet_config = matching("sd2v")
        unet_extra_config = {**supported.SD20.unet_extra_config, "num_heads": -1, "num_head_channels": 16}

        def model_type(self, state_dict: Any, prefix: str = "") -> Any:
            # SD20's own test reads output_blocks.11, which a tiny UNet lacks: this one is v-prediction.
            return comfy.model_base.ModelType.V_PREDICTION

        def clip_target(self, state_dict: Any = None) -> Any:
            return base.ClipTarget(single_tokenizer_class("h", TEXT_ENCODERS["sd2_h"]["hidden_size"], False), single_clip_class("h", sd2_encoder))

    class TinySDXL(supported.SDXL):
        unet_config = matching("sdxl")
        unet_extra_config = {**supported.SDXL.unet_extra_config, "num_heads": -1, "num_head_channels": 16}

        def clip_target(self, state_dict: Any = None) -> Any:
            return base.ClipTarget(TinySDXLTokenizer, TinySDXLClipModel)

    return {"sd15": TinySD15, "sd2v": TinySD2V, "sdxl": TinySDXL}


def register_tiny_architectures() -> None:
    """Put the tiny model configs first in ComfyUI's model registry (idempotent; after boot)."""
    import comfy.supported_models as supported

    if not _REGISTERED:
        _REGISTERED.update(_classes())
    for cls in reversed(list(_REGISTERED.values())):
        if cls not in supported.models:
            supported.models.insert(0, cls)


def tiny_config_class(kind: str) -> type:
    """The registered model config class for ``kind`` (a subclass of ComfyUI's real one)."""
    _check_kind(kind)
    register_tiny_architectures()
    return _REGISTERED[kind]


# --- deterministic weights -------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (2**63))


def _initialise(prefix: str, module: torch.nn.Module, seed: int, constants: dict[str, float] | None = None) -> None:
    """Give every float parameter and buffer of ``module`` a value drawn from ``seed`` and its name.

    Linear / conv weights ~ N(0, 1/fan_in) (variance-preserving, so that attention maps are far
    from uniform and the text conditioning matters), biases ~ N(0, 0.02^2), norm layers 1 / 0,
    token embeddings ~ N(0, 1), position embeddings ~ N(0, 0.5^2). Values are rounded to float16,
    the storage dtype. ``constants`` names scalars with a fixed value. Anything else raises, so no
    weight is ever left as the uninitialised memory of ComfyUI's skip-init layers.
    """
    constants = constants or {}
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module_name, sub in module.named_modules():
            tensors = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
            for leaf, tensor in tensors:
                if tensor is None or not tensor.is_floating_point():
                    continue
                name = f"{module_name}.{leaf}" if module_name else leaf
                g = _generator(seed, f"{prefix}:{name}")
                if name in constants:
                    values = torch.full(tensor.shape, float(constants[name]))
                elif isinstance(sub, norms):
                    values = torch.ones(tensor.shape) if leaf == "weight" else torch.zeros(tensor.shape)
                elif isinstance(sub, torch.nn.Embedding):
                    std = 0.5 if "position" in module_name else 1.0
                    values = torch.randn(tensor.shape, generator=g) * std
                elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Conv3d)):
                    if leaf == "weight":
                        values = torch.randn(tensor.shape, generator=g) / math.sqrt(tensor[0].numel())
                    else:
                        values = torch.randn(tensor.shape, generator=g) * 0.02
                else:
                    raise RuntimeError(f"tiny_models: no initialisation rule for {prefix}:{name} ({type(sub).__name__})")
                tensor.copy_(values.to(torch.float16).to(tensor.dtype))


# --- building and saving ---------------------------------------------------------------------------

def _build(kind: str, seed: int) -> tuple[Any, Any, Any, Any]:
    """(model_config, BaseModel, comfy.sd.CLIP, comfy.sd.VAE) for ``kind``, weights from ``seed``."""
    import comfy.sd
    import comfy.taesd.taesd

    cls = tiny_config_class(kind)
    config = cls(json.loads(json.dumps(UNET_CONFIGS[kind])))  # a deep copy
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    _initialise("unet", model.diffusion_model, seed)

    clip = comfy.sd.CLIP(config.clip_target())
    _initialise("clip", clip.cond_stage_model, seed,
                constants={f"{name}.logit_scale": 4.6055 for name, _ in clip.cond_stage_model.named_children()})

    # TAESD, as ComfyUI's VAE builds it for a state dict with TAESD keys; vae_scale / vae_shift as
    # ComfyUI's TAESD loader sets them (the decoder sees unit-scale latents). vae_shift exists in
    # current ComfyUI only: it is always written so that files are the same for both versions.
    taesd = comfy.taesd.taesd.TAESD()
    _initialise("vae", taesd, seed, constants={"vae_scale": config.latent_format.scale_factor, "vae_shift": 0.0})
    vae_sd = dict(taesd.state_dict())
    vae_sd.setdefault("vae_shift", torch.tensor(0.0))
    vae = comfy.sd.VAE(sd=dict(vae_sd))
    return config, model, clip, vae


def _state_dict(kind: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        config, model, clip, vae = _build(kind, seed)
        vae_sd = dict(vae.get_sd())
        vae_sd.setdefault("vae_shift", torch.tensor(0.0))
        # What comfy.sd.save_checkpoint writes: the model config's own key layout for each part.
        state = model.state_dict_for_saving(clip.get_sd(), vae_sd, None)
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        out[key] = tensor.contiguous().clone()
    _check_detection(kind, out)
    return out


def _check_detection(kind: str, state: dict[str, torch.Tensor]) -> None:
    """The written UNet must be detected as the tiny config, with exactly the intended layout."""
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    wanted = UNET_CONFIGS[kind]
    diff = {k: (detected.get(k), v) for k, v in wanted.items() if detected.get(k) != v}
    if diff:
        raise RuntimeError(f"tiny_models: {kind} UNet is detected with a different layout: {diff}")
    config = comfy.model_detection.model_config_from_unet(dict(state), "model.diffusion_model.")
    if type(config) is not tiny_config_class(kind):
        raise RuntimeError(f"tiny_models: {kind} checkpoint is detected as {type(config).__name__}")


def tiny_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint ``write_tiny_checkpoint`` writes, as a state dict."""
    _check_kind(kind)
    return _state_dict(kind, int(seed))


def write_tiny_checkpoint(kind: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny ``kind`` UNet, text encoder(s) and VAE from ``seed`` and save a .safetensors."""
    import comfy.utils

    state = tiny_state_dict(kind, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    comfy.utils.save_torch_file(state, str(partial))
    os.replace(partial, path)
    return path
