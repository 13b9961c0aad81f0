"""The tiny DiT test checkpoints: ComfyUI v0.3.75's real Flux.1, Chroma, SD3.5, Qwen-Image and Flux.2
architectures with their real tokenizers, loaded by the stock loader, deterministic, and with peaked,
text-conditioned joint attention. Every test skips on the 2024 host, which has none of them."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_dit_models
from p2p_helpers import empty_latent

KINDS = tiny_dit_models.KINDS
PROMPT, EDITED = "a photo of a cat", "a photo of a dog"  # one word apart
SIZE = 128  # pixels: a 16x16 latent, 8x8 = 64 image tokens (patch 2; Flux.2: an 8x8 latent, patch 1)
IMAGE_TOKENS = (SIZE // 16) ** 2

EXPECTED: dict[str, dict[str, Any]] = {
    # model_base class, diffusion model, VAE, latent format, tokens (key -> length) and conditioning
    # (shape, pooled shape) for PROMPT, inputs of the diffusion model besides x and t. Latents of 16
    # channels at 1/8 of the image (patch 2) but where ``latent`` says otherwise; the text attended as
    # encoded but where ``text`` says otherwise.
    "flux_dev": {"base": "Flux", "unet": "Flux", "vae": "TAESD", "latent_format": "Flux", "tokens": {"l": 77, "t5xxl": 256},
                 "cond": (1, 256, 32), "pooled": (1, 32), "inputs": {"c_crossattn", "y", "guidance"}},
    "flux_schnell": {"base": "Flux", "unet": "Flux", "vae": "TAESD", "latent_format": "Flux", "tokens": {"l": 77, "t5xxl": 256},
                     "cond": (1, 256, 32), "pooled": (1, 32), "inputs": {"c_crossattn", "y", "guidance"}},
    "chroma": {"base": "Chroma", "unet": "Chroma", "vae": "TAESD", "latent_format": "Flux", "tokens": {"t5xxl": 8},
               "cond": (1, 8, 32), "pooled": None, "inputs": {"c_crossattn", "guidance"}},
    "sd35": {"base": "SD3", "unet": "OpenAISignatureMMDITWrapper", "vae": "TAESD", "latent_format": "SD3",
             "tokens": {"g": 77, "l": 77, "t5xxl": 77}, "cond": (1, 154, 4096), "pooled": (1, 96), "inputs": {"c_crossattn", "y"}},
    "qwen_image": {"base": "QwenImage", "unet": "QwenImageTransformer2DModel", "vae": "WanVAE", "latent_format": "Wan21",
                   "tokens": {"qwen25_7b": 44}, "cond": (1, 10, 32), "pooled": None, "inputs": {"c_crossattn"}},
    # Flux.2: 128 channels at 1/16 (EmptyFlux2LatentImage), patch 1; the tiny TAESD decodes at 8x;
    # the model pads the text to 512 tokens.
    "flux2": {"base": "Flux2", "unet": "Flux", "vae": "TAESD", "latent_format": "Flux2", "tokens": {"mistral3_24b": 38},
              "cond": (1, 38, 48), "pooled": None, "inputs": {"c_crossattn", "guidance"},
              "latent": {"channels": 128, "downscale": 16, "patch": 1, "node": "EmptyFlux2LatentImage", "decoded": SIZE // 2},
              "text": 512},
}
LATENT = {"channels": 16, "downscale": 8, "patch": 2, "node": "EmptySD3LatentImage", "decoded": SIZE}


def latent_of(kind: str) -> dict[str, Any]:
    return EXPECTED[kind].get("latent", LATENT)


def expected_latent_shape(kind: str) -> tuple[int, ...]:
    """An image latent's shape for the model, as the stock empty-latent nodes make it (Flux.2's: 128
    channels at 1/16)."""
    latent = latent_of(kind)
    return (1, latent["channels"], SIZE // latent["downscale"], SIZE // latent["downscale"])
MAX_FILE_BYTES = 24e6

# Attention thresholds. Measured with seed 0 (peaked / the usual initialisation), over every joint
# call of a 4-step sampling run: normalised entropy of the image queries' text attention 0.18-0.73 /
# 0.85-0.99; largest text probability 4.9-61 / 1.8-3.97 times uniform; spatial variation of the
# prompt words' maps 1.7-3.6 / 0.2-1.0; one-word edit through the attention alone 7-30% / 0.3-4%
# (Flux.2: 0.36 / 0.92, 22 / 3.97, 3.4 / 0.78, 7.1% / 0.26%).
MAX_ENTROPY = 0.8
MIN_PEAK = 4.0
MIN_WORD_MAP_VARIATION = 1.5
MIN_EDIT_CHANGE = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """These models run thousands of tiny ops. On a CPU shared with other jobs, torch's second
    intra-op thread mostly waits for a core and makes each op ten times slower or worse: one thread
    while this module runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sampling_prompt(kind: str, name: str, seed: int) -> dict:
    """Stock nodes, API format: load, encode, sample SIZE x SIZE in 4 steps, decode, capture.

    Flux.1-dev and Flux.2 are guidance-distilled: cfg 1 with FluxGuidance; the others cfg 3 with a negative."""
    distilled = kind in tiny_dit_models.DISTILLED
    positive = ["guided", 0] if distilled else ["positive", 0]
    prompt = {
        "load": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["load", 1], "text": PROMPT}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["load", 1], "text": "blurry"}},
        "latent": {"class_type": latent_of(kind)["node"], "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["load", 0], "seed": seed, "steps": 4, "cfg": 1.0 if distilled else 3.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": positive, "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["load", 2]}},
        "keep_latent": {"class_type": "TestCaptureLatent", "inputs": {"value": ["sample", 0], "key": "latent"}},
        "keep_image": {"class_type": "TestCaptureImage", "inputs": {"value": ["decode", 0], "key": "image"}},
    }
    if distilled:
        prompt["guided"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["positive", 0], "guidance": 3.5}}
    return prompt


@pytest.mark.parametrize("kind", KINDS)
def test_stock_pipeline_is_deterministic(host: Any, tiny_dit_checkpoint: Any, captured: dict, kind: str) -> None:
    """Stock loader, text encoder, sampler and decoder through ComfyUI's executor; the same seed gives
    the same bytes, another seed another image."""
    name = tiny_dit_checkpoint(kind).name
    runs = []
    for seed in (5, 5, 6):
        host.execute(_sampling_prompt(kind, name, seed))
        runs.append({key: captured[key]["samples"] if key == "latent" else captured[key] for key in ("latent", "image")})
    first, again, other = runs
    decoded = latent_of(kind)["decoded"]
    shape = expected_latent_shape(kind)
    assert first["latent"].shape == (shape[:2] + (1,) + shape[2:] if kind == "qwen_image" else shape)  # Qwen-Image's are 5-D
    assert first["image"].shape == (1, decoded, decoded, 3)
    assert torch.isfinite(first["latent"]).all() and first["latent"].std() > 0.1
    assert first["image"].std() > 1e-3
    for key in ("latent", "image"):
        assert first[key].numpy().tobytes() == again[key].numpy().tobytes(), key
        assert not torch.equal(first[key], other[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_loads_as_the_real_architecture(host: Any, load_tiny_dit: Any, tiny_dit_checkpoint: Any, kind: str) -> None:
    import comfy.model_base
    import comfy.supported_models as supported

    model, clip, vae = load_tiny_dit(kind)
    expected = EXPECTED[kind]
    config = model.model.model_config
    assert type(config) is tiny_dit_models.tiny_dit_config_class(kind)
    assert isinstance(config, getattr(supported, tiny_dit_models.REAL_CONFIGS[kind]))
    assert type(model.model) is getattr(comfy.model_base, expected["base"])
    assert type(model.model.diffusion_model).__name__ == expected["unet"]
    assert type(model.model.latent_format).__name__ == expected["latent_format"]
    assert type(vae.first_stage_model).__name__ == expected["vae"]
    assert vae.latent_channels == model.model.latent_format.latent_channels == latent_of(kind)["channels"]
    assert model.model.diffusion_model.patch_size == latent_of(kind)["patch"]
    assert tiny_dit_checkpoint(kind).stat().st_size < MAX_FILE_BYTES


@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_is_loaded(host: Any, load_tiny_dit: Any, tiny_dit_checkpoint: Any, kind: str) -> None:
    """The stock loader puts every tensor of the file into the model, text encoders and VAE."""
    from safetensors.torch import load_file

    model, clip, vae = load_tiny_dit(kind)
    saved = load_file(str(tiny_dit_checkpoint(kind)))
    config = model.model.model_config
    parts = {
        "model.diffusion_model.": model.model.diffusion_model.state_dict(),
        config.vae_key_prefix[0]: vae.first_stage_model.state_dict(),
        config.text_encoder_key_prefix[0]: clip.get_sd(),  # with the tokenizer's data (Flux.2's vocabulary)
    }
    for prefix, loaded in parts.items():
        in_file = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        assert in_file and set(in_file) == set(loaded), (prefix, set(in_file) ^ set(loaded))
        for key, tensor in in_file.items():
            assert torch.equal(loaded[key].float().cpu(), tensor.float()), prefix + key
    assert sum(len(p) for p in parts.values()) == len(saved)


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoding_with_the_real_tokenizer(host: Any, load_tiny_dit: Any, kind: str) -> None:
    model, clip, vae = load_tiny_dit(kind)
    expected = EXPECTED[kind]
    tokens = clip.tokenize(PROMPT)
    assert {key: len(value[0]) for key, value in tokens.items()} == expected["tokens"]
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        edited, _ = clip.encode_from_tokens(clip.tokenize(EDITED), return_pooled=True)
    assert tuple(cond.shape) == expected["cond"]
    assert (None if pooled is None else tuple(pooled.shape)) == expected["pooled"]
    assert torch.isfinite(cond).all()
    assert (cond - edited).abs().amax() > 0.1
    # The real vocabularies: "cat" -> one known id per tokenizer.
    ids = {key: [t[0] for t in value[0]] for key, value in tokens.items()}
    if "t5xxl" in ids:
        assert ids["t5xxl"][:8] == [3, 9, 1202, 13, 3, 9, 1712, 1]  # ▁ a ▁photo ▁of ▁ a ▁cat </s>
    if "l" in ids:
        assert ids["l"][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    if "qwen25_7b" in ids:
        assert _qwen_prompt_ids(ids["qwen25_7b"]) == [64, 6548, 315, 264, 8251]  # a, Ġphoto, Ġof, Ġa, Ġcat
    if "mistral3_24b" in ids:
        assert _flux2_prompt_ids(ids["mistral3_24b"]) == [1097, 16649, 1307, 1261, 7990]  # a, Ġphoto, Ġof, Ġa, Ġcat
        assert ids["mistral3_24b"][:2] == [1, 17]  # <s> [SYSTEM_PROMPT]


def _qwen_prompt_ids(ids: list[int]) -> list[int]:
    """The prompt's ids inside Qwen-Image's chat template: after '<|im_start|>user\\n', up to '<|im_end|>'."""
    user = max(i for i in range(len(ids) - 2) if ids[i:i + 3] == [151644, 872, 198]) + 3
    return ids[user:ids.index(151645, user)]


def _flux2_prompt_ids(ids: list[int]) -> list[int]:
    """The prompt's ids inside Flux.2's template: between [INST] (3) and [/INST] (4)."""
    return ids[ids.index(3) + 1:ids.index(4)]


def prompt_columns(kind: str, tokens: dict) -> list[int]:
    """Conditioning columns that hold the prompt's word tokens (not start/end, padding or template)."""
    ids = {key: [t[0] for t in value[0]] for key, value in tokens.items()}
    if kind == "flux2":  # the whole template is encoded; the prompt ends before [/INST]
        mistral = ids["mistral3_24b"]
        return list(range(mistral.index(4) - len(_flux2_prompt_ids(mistral)), mistral.index(4)))
    if kind == "sd35":  # the CLIP-L/G tokens (77 columns), then the T5 tokens
        return ([i for i, t in enumerate(ids["l"]) if t not in (49406, 49407)]
                + [len(ids["l"]) + i for i, t in enumerate(ids["t5xxl"]) if t not in (0, 1)])
    if kind == "qwen_image":  # the encoder keeps the template from the user's text on
        return list(range(len(_qwen_prompt_ids(ids["qwen25_7b"]))))
    return [i for i, t in enumerate(ids["t5xxl"]) if t not in (0, 1)]  # T5: </s> is 1, padding 0


class TextAttention:
    """An ``optimized_attention_override`` that keeps, for every joint attention call, the image
    queries' attention over the text keys: the joint softmax's text columns, renormalised."""

    def __init__(self, image_tokens: int) -> None:
        self.image_tokens = image_tokens
        self.maps: list[torch.Tensor] = []  # [B, heads, image tokens, text tokens] each

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]  # SD3 passes heads by name
        if not kwargs.get("skip_reshape"):  # [B, L, heads * D] (SD3) -> [B, heads, L, D]
            q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
        text = q.shape[2] - self.image_tokens
        if text > 0:  # joint [text, image] calls; MMDiT-X's second call is image-only
            logits = q[:, :, text:].float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
            probs = logits.softmax(-1)[..., :text]
            self.maps.append(probs / probs.sum(-1, keepdim=True))
        return func(*args, **kwargs)


def attention_statistics(host: Any, model: Any, clip: Any, kind: str) -> dict[str, float]:
    """Sample PROMPT (cfg 1: every row is the prompt) and measure its image-to-text attention over
    the encoded text (renormalised there: Flux.2 puts 474 alike zero columns before it)."""
    recorder = TextAttention(IMAGE_TOKENS)
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
    _sample(host, patched, clip, PROMPT)
    text = EXPECTED[kind]["cond"][1]
    maps = torch.cat([m.flatten(0, 1)[..., -text:] for m in recorder.maps])  # [calls * B * heads, queries, text]
    maps = maps / maps.sum(-1, keepdim=True)
    words = maps[..., prompt_columns(kind, clip.tokenize(PROMPT))]
    return {
        "entropy": float((-(maps * maps.clamp_min(1e-12).log()).sum(-1) / math.log(text)).mean()),
        "peak": float(maps.amax(-1).mean() * text),
        # how much each word's map varies over the image (coefficient of variation over the queries)
        "word_map_variation": float((words.std(-2) / words.mean(-2)).mean()),
        "word_share": float(words.sum(-1).mean() / (words.shape[-1] / text)),
    }


def _sample(host: Any, model: Any, clip: Any, text: str, pooled_from: str | None = None) -> torch.Tensor:
    """Stock encode + KSampler at cfg 1 (4 steps, seed 3); ``pooled_from`` encodes the pooled vector
    from another prompt, so that only the attended tokens differ."""
    nodes = host.nodes
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, text)[0]
        if pooled_from is not None:
            pooled = nodes.CLIPTextEncode().encode(clip, pooled_from)[0][0][1].get("pooled_output")
            cond = [[cond[0][0], {**cond[0][1], "pooled_output": pooled}]]
        latent = empty_latent(model, SIZE)
        return nodes.KSampler().sample(model, 3, 4, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]


def _edit_change(host: Any, model: Any, clip: Any) -> float:
    """Relative change of the sampled latent when one word changes, through the attention alone."""
    plain = _sample(host, model, clip, PROMPT)
    edited = _sample(host, model, clip, EDITED, pooled_from=PROMPT)
    return float((plain - edited).abs().mean() / plain.abs().mean())


@pytest.mark.parametrize("kind", KINDS)
def test_attention_is_peaked_and_text_matters(host: Any, load_tiny_dit: Any, kind: str) -> None:
    model, clip, vae = load_tiny_dit(kind)
    stats = attention_statistics(host, model, clip, kind)
    assert stats["entropy"] < MAX_ENTROPY, stats
    assert stats["peak"] > MIN_PEAK, stats
    # The prompt's words (not only padding or template tokens) get attention, in maps that differ
    # over the image, as P2P's word maps must.
    assert stats["word_share"] > 0.5, stats
    assert stats["word_map_variation"] > MIN_WORD_MAP_VARIATION, stats
    assert _edit_change(host, model, clip) > MIN_EDIT_CHANGE
    # The stock path too, where Flux and SD3 also get the edited prompt's pooled vector.
    plain, edited = _sample(host, model, clip, PROMPT), _sample(host, model, clip, EDITED)
    assert (plain - edited).abs().mean() > MIN_EDIT_CHANGE * plain.abs().mean()


@pytest.mark.parametrize("kind", KINDS)
def test_usual_initialisation_fails_the_attention_checks(host: Any, load_tiny_dit: Any, kind: str) -> None:
    """Control: without the attention and modulation gains, attention is near uniform and a one-word
    edit hardly changes the image, so the checks above can fail."""
    model, clip, vae = load_tiny_dit(kind, peaked=False)
    stats = attention_statistics(host, model, clip, kind)
    assert stats["entropy"] > MAX_ENTROPY, stats
    assert stats["peak"] < MIN_PEAK, stats
    assert stats["word_map_variation"] < MIN_WORD_MAP_VARIATION, stats
    assert _edit_change(host, model, clip) < MIN_EDIT_CHANGE


# What detection reads from the real checkpoints (their weight shapes): Flux.1-dev / schnell and Chroma
# (3072 wide, 19 double + 38 single blocks), SD3.5 Medium (24 blocks, MMDiT-X in 0-12, 384^2 positions),
# Qwen-Image (60 blocks; its text norm is 3584 wide), Flux.2 dev (6144 wide, 8 double + 48 single blocks,
# three 5120-wide layers of Mistral Small).
_REAL_FLUX = {**tiny_dit_models.DETECTED["flux_dev"], "hidden_size": 3072, "context_in_dim": 4096, "vec_in_dim": 768,
              "depth": 19, "depth_single_blocks": 38}
REAL_DETECTED = {
    "flux_dev": _REAL_FLUX,
    "flux_schnell": {**_REAL_FLUX, "guidance_embed": False},
    "chroma": {**tiny_dit_models.DETECTED["chroma"], "hidden_size": 3072, "context_in_dim": 4096, "depth": 19, "depth_single_blocks": 38},
    "sd35": {**tiny_dit_models.DETECTED["sd35"], "depth": 24, "adm_in_channels": 2048, "num_patches": 147456, "pos_embed_max_size": 384,
             "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
             "x_block_self_attn_layers": list(range(13))},
    "qwen_image": {**tiny_dit_models.DETECTED["qwen_image"], "num_layers": 60},
    "flux2": {**tiny_dit_models.DETECTED["flux2"], "hidden_size": 6144, "context_in_dim": 15360, "depth": 8, "depth_single_blocks": 48},
}


def _text_norm(width: int) -> dict[str, torch.Tensor]:
    """The weight Qwen-Image's tiny config reads its width from (detection does not)."""
    return {"model.diffusion_model.txt_norm.weight": torch.empty(width)}


def test_registration_is_idempotent_and_leaves_real_checkpoints_alone(host: Any, tiny_dit_checkpoint: Any) -> None:
    import comfy.model_detection
    import comfy.supported_models as supported

    tiny_dit_checkpoint("chroma")  # skips on a host without these architectures
    tiny_dit_models.register_tiny_dit_architectures()
    tiny_dit_models.register_tiny_dit_architectures()
    classes = {kind: tiny_dit_models.tiny_dit_config_class(kind) for kind in KINDS}
    first_real = min(supported.models.index(getattr(supported, name)) for name in tiny_dit_models.REAL_CONFIGS.values())
    for kind, cls in classes.items():
        real = getattr(supported, tiny_dit_models.REAL_CONFIGS[kind])
        assert issubclass(cls, real) and supported.models.count(cls) == 1
        # Detection takes the first match, and the real configs match the tiny layouts too.
        assert supported.models.index(cls) < first_real
        tiny_sd, real_sd = (_text_norm(32), _text_norm(3584)) if kind == "qwen_image" else ({}, {})
        for other in KINDS:
            assert cls.matches(tiny_dit_models.DETECTED[other], _text_norm(32)) == (other == kind), (kind, other)
        assert not cls.matches(REAL_DETECTED[kind], real_sd)
        detected = comfy.model_detection.model_config_from_unet_config(REAL_DETECTED[kind], real_sd)
        assert type(detected) is real
        assert type(comfy.model_detection.model_config_from_unet_config(tiny_dit_models.DETECTED[kind], tiny_sd)) is cls


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_is_a_function_of_kind_and_seed(host: Any, tiny_dit_checkpoint: Any, tmp_path: Path, kind: str) -> None:
    written = tiny_dit_checkpoint(kind)
    again = tiny_dit_models.write_tiny_dit_checkpoint(kind, tmp_path / "again.safetensors", seed=0)
    assert again.read_bytes() == written.read_bytes()


def test_another_seed_draws_other_weights(host: Any, tiny_dit_checkpoint: Any) -> None:
    from safetensors.torch import load_file

    first = load_file(str(tiny_dit_checkpoint("chroma")))
    second = tiny_dit_models.tiny_dit_state_dict("chroma", seed=1)
    assert first.keys() == second.keys()
    drawn = [k for k, v in first.items() if v.is_floating_point() and v.numel() > 1 and v.float().std() > 0]
    assert sum(not torch.equal(first[k], second[k]) for k in drawn) > 0.9 * len(drawn)


# Attention calls of one forward at cfg 1 (batch 1) for PROMPT: block type, block index, q's shape,
# how heads is passed, skip_reshape, mask. Text tokens come first in every joint call.
def _calls(kind: str) -> list[tuple]:
    text = EXPECTED[kind].get("text", EXPECTED[kind]["cond"][1])
    joint = text + IMAGE_TOKENS
    if kind == "sd35":  # [B, L, heads * 64]; no block_type/index; MMDiT-X's image-only call in block 0
        return [(None, None, (1, joint, 128), "heads=", False, None), (None, None, (1, IMAGE_TOKENS, 128), "heads=", False, None),
                (None, None, (1, joint, 128), "heads=", False, None)]
    blocks = [("double", 0), ("double", 1)] + ([] if kind == "qwen_image" else [("single", 0), ("single", 1)])
    return [(block, index, (1, 4, joint, 32), "positional", True, None) for block, index in blocks]


@pytest.mark.parametrize("kind", KINDS)
def test_joint_attention_calls(host: Any, load_tiny_dit: Any, kind: str) -> None:
    """What an ``optimized_attention_override`` sees (the facts P2P on these models builds on)."""
    model, clip, vae = load_tiny_dit(kind)
    calls = []

    def record(func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs["transformer_options"]
        mask = kwargs["mask"] if "mask" in kwargs else args[4] if len(args) > 4 else None  # Qwen-Image: positional
        calls.append((options.get("block_type"), options.get("block_index"), tuple(args[0].shape),
                      "heads=" if "heads" in kwargs else "positional", bool(kwargs.get("skip_reshape")), mask))
        return func(*args, **kwargs)

    inputs = []

    def model_inputs(apply_model: Any, args: dict) -> torch.Tensor:
        inputs.append(set(args["c"]) - {"transformer_options"})
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    patched.set_model_unet_function_wrapper(model_inputs)
    nodes = host.nodes
    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        latent = empty_latent(model, SIZE)
        nodes.KSampler().sample(patched, 0, 1, 1.0, "euler", "simple", cond, cond, latent)
    assert calls == _calls(kind)
    assert inputs == [EXPECTED[kind]["inputs"]]


def test_server_loads_them_under_real_file_names(tiny_dit_checkpoint: Any, request: pytest.FixtureRequest) -> None:
    """The browser test's server: tiny DiT checkpoints linked under the real names shipped workflows
    use, listed by the stock loader and run there (the server registers the tiny architectures)."""
    import comfy_server

    links = {name: tiny_dit_checkpoint(kind) for kind, name in tiny_dit_models.REAL_FILE_NAMES.items()}  # skips on 2024
    server = request.getfixturevalue("ui_server")
    comfy_server.link_checkpoints(server.work_dir, links)
    listed = server.get_json("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert set(links) <= set(listed)
    prompt = {}
    for index, name in enumerate(links):
        prompt.update({
            f"{index}_load": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
            f"{index}_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": [f"{index}_load", 1], "text": PROMPT}},
            f"{index}_latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            f"{index}_sample": {"class_type": "KSampler", "inputs": {
                "model": [f"{index}_load", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": [f"{index}_text", 0], "negative": [f"{index}_text", 0], "latent_image": [f"{index}_latent", 0], "denoise": 1.0}},
            f"{index}_decode": {"class_type": "VAEDecode", "inputs": {"samples": [f"{index}_sample", 0], "vae": [f"{index}_load", 2]}},
            f"{index}_preview": {"class_type": "PreviewImage", "inputs": {"images": [f"{index}_decode", 0]}},
        })
    entry = comfy_server.wait_for_prompt(server, server.queue_prompt(prompt), timeout_s=120)
    assert entry["status"]["status_str"] == "success", f"{entry['status']['messages']}\n{server.log_tail()}"
    assert sorted(entry["outputs"]) == sorted(f"{index}_preview" for index in range(len(links)))
