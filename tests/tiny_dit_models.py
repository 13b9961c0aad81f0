"""Tiny random-weight checkpoints in ComfyUI v0.3.75's real DiT architectures, with their real tokenizers.

Kinds: ``flux_dev`` (Flux.1 with the guidance embedding: guidance-distilled, sampled at cfg 1),
``flux_schnell`` (Flux.1 without it), ``chroma``, ``sd35`` (SD3.5 MMDiT-X: an extra image-only
attention in the first block, as SD3.5 Medium has in its first half), ``qwen_image`` and ``flux2``
(Flux.2 dev: shared modulation, 128 latent channels, patch 1, guidance-distilled).

As in ``tiny_models`` (the UNet kinds): ComfyUI detects a checkpoint's architecture from its weight
shapes and takes the first config in ``comfy.supported_models.models`` that matches, so
``register_tiny_dit_architectures`` puts test-only subclasses of the real ``Flux`` / ``FluxSchnell``
/ ``Chroma`` / ``SD3`` / ``QwenImage`` configs at the front of that list. They match only the tiny
widths and depths, and set what detection hard-codes for the real sizes (Flux's 24 heads, Chroma's
approximator, Qwen-Image's widths) in ``unet_extra_config``. The model classes, blocks, attention
calls, latent formats, checkpoint key layouts and the loader are ComfyUI's own.

Text encoders are ComfyUI's own classes (``FluxClipModel``, ``SD3ClipModel``, ``PixArtT5XXL``,
``QwenImageTEModel``, ``Flux2TEModel``) with tiny configs, given through ComfyUI's
``<name>_model_config`` and ``<name>_class`` model options, and the real tokenizers with their full
vocabularies (CLIP 49408, T5 32128, Qwen2.5 152064, Mistral's Tekken 131072 rows). Flux.2's
tokenizer is built, as ComfyUI builds it, from a Tekken vocabulary file that its text encoder
checkpoints carry (``tekken_model``); the tests take it from the ``mistral_common`` wheel
(``scripts/setup.sh`` unpacks it into ``.hosts/mistral-common``, never imported), which lacks the
list of the 1000 special tokens: ``tekken_vocabulary`` adds mistral_common's own. Whether its ranks
are exactly those of Flux.2's encoder cannot be checked offline. Three departures, all forced by
fixed sizes in ComfyUI:
- SD3ClipModel pads the CLIP-L+G hidden states to T5-XXL's 4096 columns and stacks the T5 tokens
  under them: the tiny T5's output is zero-padded to 4096 columns in ``sd35`` (as wide as the real
  conditioning; the other T5 kinds keep the tiny width).
- Qwen2.5-VL's vision tower is built at 1280 wide and 32 deep whatever the config says: the tiny
  one is built with small sizes (it is not used for text-to-image).
- Flux.2's encoder reads the hidden states of layers 10, 20 and 30 of Mistral Small: the tiny one
  has 30 layers (as the pruned Flux.2 encoder) and 128-wide attention heads (fixed in ComfyUI's
  config) over a 16-wide model.

VAEs: ComfyUI's TAESD with 16 latent channels for Flux, Chroma and SD3.5 and with 128 for Flux.2
(the stock loader builds the KL autoencoders at their full width; Flux.2's real VAE gives 128
channels at 1/16 of the image's size, TAESD at 1/8), and a narrow Wan 2.1 VAE (Qwen-Image's real
one; the loader reads its width from the weights) for Qwen-Image, whose latents are 5-D
[B, 16, 1, h, w]. The real latent formats (Flux, SD3, Wan21, Flux2) apply.

Weights: every tensor is drawn from its own generator, seeded from ``seed`` and its name
(``tiny_models``' rules: N(0, 1/fan_in) for linear and conv weights, so activations keep their
scale; norms 1), so a checkpoint is a pure function of ``(kind, seed)``. At that initialisation the
joint attention is nearly uniform and the adaLN gates small, and a one-word prompt edit changes the
image by 0.3-4%. Three gains make the diffusion model behave like a trained text-to-image model:
- ``QK_GAIN``: the q/k RMS norm scales, so attention logits have a standard deviation of about 4
  instead of 1 and image queries attend to a few tokens;
- ``TEXT_KEY_GAIN``: the text stream's key norm (where a block has its own), so image queries give
  the text a large share of their attention, not just its share of the tokens;
- ``MODULATION_GAIN``: the adaLN projections, so shift, scale and gate are of order 1.
The tests measure the result (peaked image-to-text maps, prompt words with maps that vary over the
image, a one-word edit changing the image by 9-30% through the attention alone) and check that the
usual initialisation (``peaked=False``) fails the same checks.

Usage, after ``comfy_host.boot()`` on v0.3.75::

    register_tiny_dit_architectures()
    write_tiny_dit_checkpoint("flux_dev", checkpoints_dir / tiny_dit_checkpoint_name("flux_dev"))
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

import comfy_host
import tiny_models

KINDS = ("flux_dev", "flux_schnell", "chroma", "sd35", "qwen_image", "flux2")

# File names of real checkpoints that shipped workflows load; the browser test's server links the
# tiny checkpoints under them (kind -> name).
REAL_FILE_NAMES = {
    "flux_dev": "flux1-dev-fp8.safetensors",
    "sd35": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
    "qwen_image": "qwen_image_all_in_one.safetensors",
    "chroma": "chroma_all_in_one.safetensors",
}

# The real config classes (comfy.supported_models) each kind subclasses.
REAL_CONFIGS = {"flux_dev": "Flux", "flux_schnell": "FluxSchnell", "chroma": "Chroma", "sd35": "SD3", "qwen_image": "QwenImage",
                "flux2": "Flux2"}

# Gains of the diffusion model's attention and modulation (see the module docstring).
QK_GAIN = 2.0  # q/k RMS norm scales: attention logits with a standard deviation of about 4
TEXT_KEY_GAIN = 4.0  # the text stream's key norm scale, where the block has its own
MODULATION_GAIN = 3.0  # adaLN projections: shift, scale and gate of order 1
# Module names (suffixes) they apply to: Flux / Chroma QKNorm, MMDiT ln_q / ln_k (attn2: MMDiT-X),
# Qwen-Image norm_q / norm_k / norm_added_q / norm_added_k; the modulation projections of Flux
# (Modulation, LastLayer; Flux.2's shared ones), MMDiT (DismantledBlock, FinalLayer) and Qwen-Image
# (blocks, LastLayer).
_TEXT_KEY_NORMS = ("txt_attn.norm.key_norm", "context_block.attn.ln_k", "attn.norm_added_k")
_QK_NORMS = ("norm.query_norm", "norm.key_norm", "attn.ln_q", "attn.ln_k", "attn2.ln_q", "attn2.ln_k", "attn.norm_q",
             "attn.norm_k", "attn.norm_added_q")
_MODULATIONS = ("img_mod.lin", "txt_mod.lin", "modulation.lin", "modulation_img.lin", "modulation_txt.lin",
                "adaLN_modulation.1", "img_mod.1", "txt_mod.1", "norm_out.linear")

# --- text encoders ---------------------------------------------------------------------------------
CLIP_L = tiny_models._text_config("sdxl_l")  # 32 wide, 3 layers: Flux's pooled vector, SD3's first columns
CLIP_G = tiny_models._text_config("sdxl_g")  # 64 wide: SD3
# T5-XXL's layout (gated GELU, relative position buckets, 32128-token vocabulary) at 32 wide.
T5 = {"d_model": 32, "d_kv": 16, "num_heads": 2, "d_ff": 64, "num_layers": 2}
T5XXL_WIDTH = 4096
# Qwen2.5-7B-VL's layout (GQA, multimodal RoPE over 128-wide heads, q/k/v biases, 152064 rows) at 32 wide.
QWEN25 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
QWEN25_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "num_layers": 2}
# Mistral Small 3's layout (GQA, RoPE, 131072 rows) at 16 wide (its vocabulary keeps the checkpoint
# under MAX_FILE_BYTES of the tests); 30 layers, as the pruned Flux.2 encoder.
MISTRAL3 = {"hidden_size": 16, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
TEKKEN_FILE = "mistral_common/data/tekken_240911.json"  # in .hosts/mistral-common (scripts/setup.sh)
# mistral_common's special tokens (ranks 0-19; <SPECIAL_i> up to 999), which its v3 Tekken file does not list.
TEKKEN_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
                  "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")

# --- diffusion models ------------------------------------------------------------------------------
# What comfy.model_detection.detect_unet_config reads from the tiny weights (checked when a checkpoint
# is written), and the sizes detection cannot see, which the tiny configs set (unet_extra_config).
HIDDEN = 128
_FLUX_DETECTED = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": HIDDEN,
    "context_in_dim": T5["d_model"], "patch_size": 2, "vec_in_dim": CLIP_L["hidden_size"], "depth": 2,
    "depth_single_blocks": 2,
}
# 4 heads of 32 channels; RoPE over (index, row, column) in Flux's proportions [16, 56, 56] / 4.
_FLUX_EXTRA = {"num_heads": 4, "axes_dim": [4, 14, 14]}
DETECTED: dict[str, dict[str, Any]] = {
    "flux_dev": {**_FLUX_DETECTED, "guidance_embed": True},
    "flux_schnell": {**_FLUX_DETECTED, "guidance_embed": False},
    "chroma": {
        **{k: v for k, v in _FLUX_DETECTED.items() if k != "vec_in_dim"},
        "image_model": "chroma", "in_channels": 64, "out_channels": 64,
        "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5,
    },
    # MMDiT: depth d means d joint blocks of 64*d channels and d heads of 64; MMDiT-X self-attention in
    # block 0 only; q/k RMS norms (SD3.5); a 64x64 position table (up to 1024x1024 images).
    "sd35": {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
        "adm_in_channels": CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": T5XXL_WIDTH, "out_features": 128}},
        "num_patches": 64 * 64, "pos_embed_max_size": 64, "qk_norm": "rms", "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [0],
    },
    "qwen_image": {"image_model": "qwen_image", "in_channels": 64, "num_layers": 2},
    # Flux.2: what detection hard-codes for it, with the tiny widths; the text is three of the
    # encoder's layers side by side (3 x 16).
    "flux2": {
        "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 48, "mlp_ratio": 3.0, "theta": 2000,
        "out_channels": 128, "global_modulation": True, "vec_in_dim": None, "mlp_silu_act": True, "qkv_bias": False,
        "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0, "in_channels": 128,
        "hidden_size": HIDDEN, "context_in_dim": 3 * MISTRAL3["hidden_size"], "patch_size": 1, "depth": 2,
        "depth_single_blocks": 2, "guidance_embed": True,
    },
}
EXTRA: dict[str, dict[str, Any]] = {
    "flux_dev": _FLUX_EXTRA,
    "flux_schnell": _FLUX_EXTRA,
    # Chroma's approximator maps (timestep, guidance, block index) to every block's modulation: out_dim
    # is the model width.
    "chroma": {**_FLUX_EXTRA, "out_dim": HIDDEN, "hidden_dim": 64, "n_layers": 2},
    "sd35": {},
    "qwen_image": {"num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": [4, 14, 14],
                   "joint_attention_dim": QWEN25["hidden_size"]},
    # 4 heads of 32 channels; RoPE over (index, row, column, text position) in Flux.2's proportions.
    "flux2": {"num_heads": 4, "axes_dim": [8, 8, 8, 8]},
}
# The detected keys the tiny configs match on (with the real configs' own keys).
_MATCHED = {
    "flux_dev": ("in_channels", "hidden_size", "context_in_dim", "vec_in_dim", "depth", "depth_single_blocks"),
    "flux_schnell": ("in_channels", "hidden_size", "context_in_dim", "vec_in_dim", "depth", "depth_single_blocks"),
    "chroma": ("hidden_size", "context_in_dim", "depth", "depth_single_blocks"),
    "sd35": ("depth", "adm_in_channels", "context_embedder_config", "num_patches", "qk_norm", "x_block_self_attn_layers"),
    "qwen_image": ("in_channels", "num_layers"),
    "flux2": ("in_channels", "hidden_size", "context_in_dim", "depth", "depth_single_blocks"),
}
WAN_VAE_DIM = 8  # the real Wan 2.1 VAE is 96 wide
# Guidance-distilled kinds (a guidance embedding): sampled at cfg 1 with FluxGuidance.
DISTILLED = tuple(kind for kind in KINDS if DETECTED[kind].get("guidance_embed"))

_REGISTERED: dict[str, type] = {}


def tiny_dit_checkpoint_name(kind: str, peaked: bool = True) -> str:
    """The file name the tests use for a tiny DiT checkpoint in the checkpoints folder."""
    _check_kind(kind)
    return f"tiny_{kind}.safetensors" if peaked else f"tiny_{kind}_flat.safetensors"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny DiT model kind {kind!r}; expected one of {KINDS}")


def unsupported_reason() -> str | None:
    """Why the booted ComfyUI cannot run the tiny DiT models (None when it can): the March-2024 host
    has none of these architectures."""
    import comfy.supported_models as supported

    import comfy_host

    missing = [name for name in REAL_CONFIGS.values() if not hasattr(supported, name)]
    if not missing:
        return None
    version = comfy_host.comfyui_version(Path(supported.__file__).resolve().parents[1])
    return (f"this ComfyUI host (comfyui_version {version}) has no {', '.join(missing)} model configs: "
            "the tiny DiT models need ComfyUI v0.3.75 (.hosts/comfyui-0.3.75)")


def with_model_options(clip_class: type, options: dict[str, Any], name: str) -> type:
    """``clip_class`` (a ComfyUI text encoder model) built with ``options`` added to its model
    options: ``SDClipModel`` overrides its config with ``<model name>_model_config`` and
    ``SD1ClipModel`` takes its encoder class from ``<name>_class``."""

    class TinyTextEncoders(clip_class):
        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            super().__init__(device=device, dtype=dtype, model_options={**(model_options or {}), **options})

    TinyTextEncoders.__name__ = TinyTextEncoders.__qualname__ = name
    return TinyTextEncoders


def flux_clip_target(clip_l: dict[str, Any], t5: dict[str, Any], name: str, t5_min_length: int | None = None) -> Any:
    """Flux.1's text encoders (``FluxClipModel``: CLIP-L's pooled vector, T5's tokens) at the given
    sizes, with the real Flux tokenizer; ``t5_min_length`` replaces the 256 tokens it pads T5's to
    (through the ``t5xxl_min_length`` tokenizer data ComfyUI's ``SDTokenizer`` reads)."""
    import comfy.supported_models_base as base
    import comfy.text_encoders.flux as flux_te

    tokenizer = flux_te.FluxTokenizer
    if t5_min_length is not None:
        class PaddedFluxTokenizer(flux_te.FluxTokenizer):
            def __init__(self, embedding_directory: Any = None, tokenizer_data: dict | None = None) -> None:
                super().__init__(embedding_directory, {**(tokenizer_data or {}), "t5xxl_min_length": t5_min_length})

        tokenizer = PaddedFluxTokenizer
    return base.ClipTarget(tokenizer, with_model_options(
        flux_te.flux_clip(), {"clip_l_model_config": clip_l, "t5xxl_model_config": t5}, name))


@functools.lru_cache(maxsize=1)
def tekken_vocabulary() -> torch.Tensor:
    """Flux.2's tokenizer data as its text encoder checkpoints carry it (``tekken_model``: the Tekken
    JSON as bytes): mistral_common's vocabulary file with its special tokens listed, and only what
    ComfyUI's ``load_mistral_tokenizer`` reads (ranks and bytes; 6 of the file's 19 MB)."""
    path = comfy_host.HOSTS / "mistral-common" / TEKKEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run scripts/setup.sh (it unpacks the mistral_common wheel there)")
    tekken = json.loads(path.read_text())
    special = [{"rank": rank, "token_str": TEKKEN_SPECIAL[rank] if rank < len(TEKKEN_SPECIAL) else f"<SPECIAL_{rank}>",
                "is_control": True} for rank in range(tekken["config"]["default_num_special_tokens"])]
    vocab = [{"rank": w["rank"], "token_bytes": w["token_bytes"]} for w in tekken["vocab"]]
    text = json.dumps({"config": tekken["config"], "vocab": vocab, "special_tokens": special}, separators=(",", ":"))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


def sized_config_class(real_name: str, detected: dict[str, Any], matched: tuple[str, ...], extra: dict[str, Any],
                       clip_target: Any, name: str) -> type:
    """A subclass of ComfyUI's real model config ``real_name`` that matches only the ``matched``
    keys of ``detected`` (a small layout), builds its model with ``extra`` and its text encoders
    from ``clip_target``."""
    import comfy.supported_models as supported

    real = getattr(supported, real_name)

    class SizedConfig(real):
        unet_config = {**real.unet_config, **{k: detected[k] for k in matched}}
        unet_extra_config = {**real.unet_extra_config, **extra}

        def clip_target(self, state_dict: Any = None) -> Any:
            return clip_target

    SizedConfig.__name__ = SizedConfig.__qualname__ = name
    return SizedConfig


def _classes() -> dict[str, type]:
    """The tiny model configs, built on ComfyUI's classes (imported only once the host is booted)."""
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models_base as base
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.pixart_t5 as pixart_t5
    import comfy.text_encoders.qwen_image as qwen_image_te
    import comfy.text_encoders.qwen_vl as qwen_vl
    import comfy.text_encoders.sd3_clip as sd3_clip

    t5_options = {"t5xxl_model_config": T5}

    class T5PaddedToXXL(sd3_clip.T5XXLModel):
        """ComfyUI's T5-XXL encoder model; the tiny hidden states are zero-padded to 4096 columns."""

        def encode_token_weights(self, token_weight_pairs: Any) -> tuple:
            out = super().encode_token_weights(token_weight_pairs)
            padded = torch.nn.functional.pad(out[0], (0, T5XXL_WIDTH - out[0].shape[-1]))
            return (padded, *out[1:])

    sd3_base = with_model_options(sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True),
                                  {"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G, **t5_options}, "TinySD3Base")

    class TinySD3TextEncoders(sd3_base):
        """SD3's CLIP-L + CLIP-G + T5: the CLIP hidden states padded to 4096 columns (77 rows), then
        the T5 tokens (at least 77), which must be 4096 wide too."""

        def __init__(self, device: Any = "cpu", dtype: Any = None, model_options: dict | None = None) -> None:
            super().__init__(device=device, dtype=dtype, model_options=model_options)
            t5_dtype = next(self.t5xxl.parameters()).dtype
            self.t5xxl = T5PaddedToXXL(device=device, dtype=t5_dtype, attention_mask=self.t5_attention_mask,
                                       model_options={**(model_options or {}), **t5_options})

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        """ComfyUI's Qwen2.5-VL language model with a small vision tower (ComfyUI builds it at full size)."""

        def __init__(self, config_dict: dict, dtype: Any, device: Any, operations: Any) -> None:
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(output_hidden_size=config.hidden_size, **QWEN25_VISION,
                                                           device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwen25VLEncoder(qwen_image_te.Qwen25_7BVLIModel):
        """``Qwen25_7BVLIModel`` (its special tokens, masks and output layer) around ``TinyQwen25VL``."""

        def __init__(self, device: Any = "cpu", layer: str = "last", layer_idx: int | None = None, dtype: Any = None,
                     attention_mask: bool = True, model_options: dict | None = None) -> None:
            sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(QWEN25), dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask, model_options=model_options or {})

    text_encoders = {
        "flux": flux_clip_target(CLIP_L, T5, "TinyFluxTextEncoders"),
        "chroma": base.ClipTarget(pixart_t5.PixArtTokenizer, with_model_options(
            pixart_t5.pixart_te(), t5_options, "TinyChromaTextEncoder")),
        "sd35": base.ClipTarget(sd3_clip.SD3Tokenizer, TinySD3TextEncoders),
        "qwen_image": base.ClipTarget(qwen_image_te.QwenImageTokenizer, with_model_options(
            qwen_image_te.te(), {"qwen25_7b_class": TinyQwen25VLEncoder}, "TinyQwenImageTextEncoder")),
        "flux2": base.ClipTarget(flux_te.Flux2Tokenizer, with_model_options(
            flux_te.flux2_te(pruned=True), {"mistral3_24b_model_config": MISTRAL3}, "TinyFlux2TextEncoder")),
    }

    def tiny_config(kind: str) -> type:
        target = text_encoders["flux" if kind.startswith("flux_") else kind]
        return sized_config_class(REAL_CONFIGS[kind], DETECTED[kind], _MATCHED[kind], EXTRA[kind], target,
                                  f"Tiny_{REAL_CONFIGS[kind]}_{kind}")

    configs = {kind: tiny_config(kind) for kind in KINDS}

    class TinyQwenImage(configs["qwen_image"]):
        @classmethod
        def matches(cls, unet_config: dict, state_dict: Any = None) -> bool:
            # Qwen-Image's detected config holds only in_channels and num_layers: the width comes from
            # the weights (a real checkpoint's txt_norm is 3584 wide).
            if not super().matches(unet_config, state_dict):
                return False
            widths = [v.shape[0] for k, v in (state_dict or {}).items() if k.endswith("txt_norm.weight")]
            return widths == [QWEN25["hidden_size"]]

    TinyQwenImage.__name__ = TinyQwenImage.__qualname__ = configs["qwen_image"].__name__
    configs["qwen_image"] = TinyQwenImage
    return configs


def register_tiny_dit_architectures() -> None:
    """Put the tiny DiT model configs first in ComfyUI's model registry (idempotent; after boot)."""
    import comfy.supported_models as supported

    if not _REGISTERED:
        _REGISTERED.update(_classes())
    for cls in reversed(list(_REGISTERED.values())):
        if cls not in supported.models:
            supported.models.insert(0, cls)


def tiny_dit_config_class(kind: str) -> type:
    """The registered model config class for ``kind`` (a subclass of ComfyUI's real one)."""
    _check_kind(kind)
    register_tiny_dit_architectures()
    return _REGISTERED[kind]


# --- deterministic weights -------------------------------------------------------------------------

def _rms_norm_classes() -> tuple[type, ...]:
    """RMS-style norms (a scale, no bias) of these models, which ``tiny_models``' rules leave out."""
    import comfy.ldm.flux.layers
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.ldm.wan.vae
    import comfy.rmsnorm
    import comfy.text_encoders.llama
    import comfy.text_encoders.t5

    return (comfy.ldm.flux.layers.RMSNorm, comfy.ldm.modules.diffusionmodules.mmdit.RMSNorm, comfy.rmsnorm.RMSNorm,
            comfy.text_encoders.llama.RMSNorm, comfy.text_encoders.t5.T5LayerNorm, comfy.ldm.wan.vae.RMS_norm)


def _dit_gains(model: torch.nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    """(norm scales, weight gains) by parameter name that make the diffusion model's attention peaked
    and text-conditioned (see the module docstring): the q/k RMS norms' scales, the text stream's
    key norm where it has its own, and the adaLN modulation projections."""
    scales, gains = {}, {}
    for name, sub in model.named_modules():
        if name.endswith(_TEXT_KEY_NORMS):
            scales[f"{name}.{_scale_name(sub)}"] = TEXT_KEY_GAIN
        elif name.endswith(_QK_NORMS):
            scales[f"{name}.{_scale_name(sub)}"] = QK_GAIN
        elif name.endswith(_MODULATIONS):
            gains[f"{name}.weight"] = MODULATION_GAIN
    return scales, gains


def _scale_name(norm: torch.nn.Module) -> str:
    (name, _), = norm.named_parameters(recurse=False)
    return name


def initialise(prefix: str, module: torch.nn.Module, seed: int, norm_scales: dict[str, float] | None = None,
                weight_gains: dict[str, float] | None = None, fixed: dict[str, torch.Tensor] | None = None) -> None:
    """``tiny_models``' deterministic initialisation, plus what its rules leave out: RMS-style norm
    scales 1 (or ``norm_scales[name]``), text encoders' logit scales as ComfyUI sets them, buffers
    that are computed, never saved (rotary frequencies), kept as they are, and ``fixed`` tensors
    (name -> value). ``weight_gains`` multiplies drawn weights."""
    norm_scales = norm_scales or {}
    fixed = dict(fixed or {})
    persistent = set(module.state_dict())
    fixed.update({name: buffer.clone() for name, buffer in module.named_buffers()
                  if buffer.is_floating_point() and name not in persistent})
    constants: dict[str, float] = {name: 0.0 for name in fixed}  # placeholders: set below
    norms = _rms_norm_classes()
    for name, sub in module.named_modules():
        for leaf, _ in sub.named_parameters(recurse=False):
            if isinstance(sub, norms):
                constants[f"{name}.{leaf}"] = norm_scales.get(f"{name}.{leaf}", 1.0)
            elif leaf == "logit_scale":
                constants[f"{name}.{leaf}"] = 4.6055
    unknown = set(norm_scales) - set(constants)
    if unknown:
        raise RuntimeError(f"tiny_dit_models: {prefix} has no RMS norm scales {sorted(unknown)}")
    tiny_models._initialise(prefix, module, seed, constants)
    with torch.no_grad():
        for name, gain in (weight_gains or {}).items():
            module.get_parameter(name).mul_(gain)
        for name, value in fixed.items():
            module.get_buffer(name).copy_(value)


def _sd3_position_table(kind: str) -> torch.Tensor:
    """SD3's fixed 2-D sine-cosine position table, as real checkpoints store it."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    config = DETECTED[kind]
    hidden = 64 * config["depth"]
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden, config["pos_embed_max_size"])).float().unsqueeze(0)


# --- building and saving ---------------------------------------------------------------------------

def _vae(kind: str, seed: int, latent_format: Any) -> Any:
    """``comfy.sd.VAE`` for ``kind``: TAESD with the latent format's channels, or for Qwen-Image a narrow Wan 2.1 VAE,
    both built as ComfyUI's VAE loader builds them for the checkpoint's weights."""
    import comfy.ldm.wan.vae
    import comfy.sd
    import comfy.taesd.taesd

    if kind == "qwen_image":
        wan = comfy.ldm.wan.vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                       temperal_downsample=[False, True, True], dropout=0.0)
        initialise("vae", wan, seed)
        return comfy.sd.VAE(sd=dict(wan.state_dict()))
    # vae_scale / vae_shift as ComfyUI's TAESD loader sets them: the decoder sees unit-scale latents.
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_format.latent_channels)
    tiny_models._initialise("vae", taesd, seed, constants={"vae_scale": latent_format.scale_factor,
                                                           "vae_shift": getattr(latent_format, "shift_factor", 0.0)})
    return comfy.sd.VAE(sd=dict(taesd.state_dict()))


def _build(kind: str, seed: int, peaked: bool) -> tuple[Any, Any, Any, Any]:
    """(model_config, BaseModel, comfy.sd.CLIP, comfy.sd.VAE) for ``kind``, weights from ``seed``."""
    import comfy.sd

    cls = tiny_dit_config_class(kind)
    config = cls(json.loads(json.dumps(DETECTED[kind])))  # a deep copy, as detection returns it
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    fixed = {"pos_embed": _sd3_position_table(kind)} if kind == "sd35" else {}
    scales, gains = _dit_gains(model.diffusion_model) if peaked else ({}, {})
    initialise("dit", model.diffusion_model, seed, norm_scales=scales, weight_gains=gains, fixed=fixed)
    tokenizer_data = {"tekken_model": tekken_vocabulary()} if kind == "flux2" else {}
    clip = comfy.sd.CLIP(config.clip_target(), tokenizer_data=tokenizer_data)
    initialise("text", clip.cond_stage_model, seed)
    return config, model, clip, _vae(kind, seed, config.latent_format)


def _state_dict(kind: str, seed: int, peaked: bool) -> dict[str, torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        config, model, clip, vae = _build(kind, seed, peaked)
        # What comfy.sd.save_checkpoint writes: the model config's own key layout for each part,
        # stored in float16 (as tiny_models does) to keep the files small.
        state = model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
        out = {key: (t.to(torch.float16) if t.is_floating_point() else t).contiguous().clone() for key, t in state.items()}
    _check_detection(kind, out)
    return out


def _check_detection(kind: str, state: dict[str, torch.Tensor]) -> None:
    check_detected(state, DETECTED[kind], tiny_dit_config_class(kind), f"tiny_dit_models: {kind}")


def check_detected(state: dict[str, torch.Tensor], detected: dict[str, Any], config_class: type, what: str) -> None:
    """A written checkpoint must be detected as ``config_class``, with exactly the ``detected`` layout."""
    import comfy.model_detection

    found = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    if found != detected:
        diff = {k: (found.get(k), detected.get(k)) for k in set(found) | set(detected) if found.get(k) != detected.get(k)}
        raise RuntimeError(f"{what} is detected with a different layout (detected, intended): {diff}")
    config = comfy.model_detection.model_config_from_unet(dict(state), "model.diffusion_model.")
    if type(config) is not config_class:
        raise RuntimeError(f"{what} checkpoint is detected as {type(config).__name__}")


def tiny_dit_state_dict(kind: str, seed: int = 0, peaked: bool = True) -> dict[str, torch.Tensor]:
    """The checkpoint ``write_tiny_dit_checkpoint`` writes, as a state dict."""
    _check_kind(kind)
    return _state_dict(kind, int(seed), bool(peaked))


def write_tiny_dit_checkpoint(kind: str, path: str | os.PathLike, seed: int = 0, peaked: bool = True) -> Path:
    """Build the tiny ``kind`` diffusion model, text encoders and VAE from ``seed`` and save an
    all-in-one .safetensors checkpoint. ``peaked=False`` leaves out the attention and modulation
    gains: the usual initialisation, whose near-uniform attention the tests use as a control."""
    import comfy.utils

    state = tiny_dit_state_dict(kind, seed, peaked)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    comfy.utils.save_torch_file(state, str(partial))
    os.replace(partial, path)
    return path
