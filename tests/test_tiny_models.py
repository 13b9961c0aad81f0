"""The tiny test checkpoints: real ComfyUI architectures, loaded by the stock loader, deterministic."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_models

KINDS = tiny_models.KINDS

EXPECTED = {
    # real config class, model_base class, prediction, context width, sites, blocks per site, map sizes
    "sd15": {"real": "SD15", "base": "BaseModel", "type": "EPS", "context": 64, "sites": 7, "per_site": {1},
             "sizes": {(4, 4), (2, 2)}, "conv_proj": True},
    "sd2v": {"real": "SD20", "base": "BaseModel", "type": "V_PREDICTION", "context": 64, "sites": 7, "per_site": {1},
             "sizes": {(8, 8), (4, 4)}, "conv_proj": False},
    "sdxl": {"real": "SDXL", "base": "SDXL", "type": "EPS", "context": 96, "sites": 7, "per_site": {2, 3},
             "sizes": {(4, 4), (2, 2)}, "conv_proj": False},
}
# Keys that ComfyUI's own SD1.5 / SDXL checkpoint layouts leave out for CLIP-L (current ComfyUI treats
# them as expected): the logit scale and text projection, which text encoding does not use.
UNUSED_CLIP_L = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load(host: Any, path: Path, embeddings: Path) -> dict[str, Any]:
    """comfy.sd.load_checkpoint_guess_config, with the log lines it writes."""
    root = logging.getLogger()
    records, level = _Records(), root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with torch.inference_mode():
            model, clip, vae = host.sd.load_checkpoint_guess_config(
                str(path), output_vae=True, output_clip=True, embedding_directory=str(embeddings))[:3]
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return {"model": model, "clip": clip, "vae": vae, "log": records.messages, "path": path}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Textual-inversion embeddings as wide as the tiny text encoders (two vectors each)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(7)
    save_file({"emb_params": torch.randn(2, 64, generator=g)}, str(folder / "tiny_ti_64.safetensors"))
    save_file({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 64, generator=g)},
              str(folder / "tiny_ti_xl.safetensors"))
    return folder


@pytest.fixture(scope="module")
def written(host: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny_checkpoints")
    return {kind: tiny_models.write_tiny_checkpoint(kind, folder / tiny_models.tiny_checkpoint_name(kind), seed=0) for kind in KINDS}


@pytest.fixture(scope="module")
def loaded(host: Any, written: dict[str, Path], embeddings: Path) -> dict[str, dict[str, Any]]:
    return {kind: _load(host, written[kind], embeddings) for kind in KINDS}


def _sites(diffusion_model: torch.nn.Module) -> list[tuple[str, Any]]:
    from comfy.ldm.modules.attention import SpatialTransformer

    sites = []
    for part in ("input_blocks", "middle_block", "output_blocks"):
        for name, module in getattr(diffusion_model, part).named_modules():
            if isinstance(module, SpatialTransformer):
                sites.append((f"{part}.{name}", module))
    return sites


def _encode(clip: Any, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def _sample(host: Any, model: Any, clip: Any, prompt: str, seed: int = 3) -> torch.Tensor:
    nodes = host.nodes
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return nodes.KSampler().sample(model, seed, 4, 6.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def test_registration_is_idempotent_and_first(host: Any) -> None:
    import comfy.supported_models as supported

    tiny_models.register_tiny_architectures()
    tiny_models.register_tiny_architectures()
    classes = [tiny_models.tiny_config_class(kind) for kind in KINDS]
    # ComfyUI's own configs, by their names in its module (other tests register tiny DiT configs first).
    real_models = [m for m in supported.models if getattr(supported, m.__name__, None) is m]
    for cls in classes:
        assert supported.models.count(cls) == 1
        # detection takes the first match: every tiny config comes before every real one
        assert supported.models.index(cls) < supported.models.index(real_models[0])
    for kind, cls in zip(KINDS, classes):
        real = getattr(supported, EXPECTED[kind]["real"])
        assert issubclass(cls, real)
        # Neither hijacks the other: the tiny layouts do not match the real configs and back.
        for other in KINDS:
            assert cls.matches(tiny_models.UNET_CONFIGS[other]) == (other == kind)
        assert not real.matches(tiny_models.UNET_CONFIGS[kind])
        assert not cls.matches({**tiny_models.UNET_CONFIGS[kind], **real.unet_config})


@pytest.mark.parametrize("kind", KINDS)
def test_detected_as_tiny_real_architecture(host: Any, loaded: dict, kind: str) -> None:
    import comfy.model_base
    import comfy.supported_models as supported

    model = loaded[kind]["model"]
    expected = EXPECTED[kind]
    assert type(model.model.model_config) is tiny_models.tiny_config_class(kind)
    assert isinstance(model.model.model_config, getattr(supported, expected["real"]))
    assert type(model.model) is getattr(comfy.model_base, expected["base"])
    assert type(model.model.diffusion_model).__name__ == "UNetModel"
    assert model.model.model_type == getattr(comfy.model_base.ModelType, expected["type"])
    assert loaded[kind]["path"].stat().st_size < 24e6


@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_is_loaded(host: Any, loaded: dict, kind: str) -> None:
    from safetensors.torch import load_file

    entry = loaded[kind]
    saved = load_file(str(entry["path"]))
    config = entry["model"].model.model_config
    log = entry["log"]
    assert not [m for m in log if "unet missing" in m or "unet unexpected" in m or "Missing VAE keys" in m], log
    for message in log:
        if message.startswith("clip missing"):
            assert all(key in message for key in UNUSED_CLIP_L) and message.count("'") == 2 * len(UNUSED_CLIP_L), message

    def same(loaded_sd: dict, file_sd: dict, allowed_missing: set = frozenset()) -> None:
        missing = set(loaded_sd) - set(file_sd) - set(allowed_missing)
        assert not missing, missing
        for key, tensor in loaded_sd.items():
            if key in file_sd:
                assert torch.equal(tensor.float().cpu(), file_sd[key].float()), key

    for key, tensor in saved.items():  # drawn values, not the empty memory of skip-init layers
        if tensor.is_floating_point() and tensor.numel():
            assert torch.isfinite(tensor).all() and tensor.abs().max() < 20, key
    unet = {k[len("model.diffusion_model."):]: v for k, v in saved.items() if k.startswith("model.diffusion_model.")}
    same(entry["model"].model.diffusion_model.state_dict(), unet)
    vae = {k[len("first_stage_model."):]: v for k, v in saved.items() if k.startswith("first_stage_model.")}
    same(entry["vae"].first_stage_model.state_dict(), vae)
    clip = config.process_clip_state_dict(dict(saved))
    same(entry["clip"].cond_stage_model.state_dict(), clip, UNUSED_CLIP_L if kind in ("sd15", "sdxl") else set())


@pytest.mark.parametrize("kind", KINDS)
def test_cross_attention_sites(host: Any, loaded: dict, kind: str) -> None:
    expected = EXPECTED[kind]
    model = loaded[kind]["model"]
    sites = _sites(model.model.diffusion_model)
    assert len(sites) == expected["sites"] == tiny_models.EXPECTED_SITES[kind]
    per_site = [len(module.transformer_blocks) for _, module in sites]
    assert set(per_site) == expected["per_site"]
    assert sum(per_site) == tiny_models.EXPECTED_BLOCKS[kind]
    assert any(name.startswith("middle_block") for name, _ in sites)
    for _, module in sites:
        assert isinstance(module.proj_in, torch.nn.Conv2d) == expected["conv_proj"]
        for block in module.transformer_blocks:
            assert block.attn2.to_k.in_features == expected["context"]

    # The sites run at two resolutions (8x8 latent): record them during a real sampling run.
    sizes: set[tuple[int, int]] = set()
    hooks = [module.register_forward_pre_hook(lambda mod, args: sizes.add(tuple(args[0].shape[-2:]))) for _, module in sites]
    try:
        _sample(host, model, loaded[kind]["clip"], "a red cube")
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes == expected["sizes"]


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoder(host: Any, loaded: dict, kind: str) -> None:
    clip = loaded[kind]["clip"]
    cond_a, pooled_a = _encode(clip, "a photo of a cat")
    cond_b, pooled_b = _encode(clip, "a watercolor of a dog")
    cond_a2, _ = _encode(clip, "a photo of a cat")
    assert cond_a.shape == (1, 77, EXPECTED[kind]["context"])
    assert torch.isfinite(cond_a).all() and torch.isfinite(cond_b).all()
    assert torch.equal(cond_a, cond_a2)
    assert (cond_a - cond_b).abs().mean() > 1e-2
    if kind == "sdxl":
        assert pooled_a is not None and pooled_a.shape == (1, tiny_models.SDXL_POOLED)
        assert (pooled_a - pooled_b).abs().mean() > 1e-2
        assert model_adm(loaded[kind]["model"], pooled_a).shape == (1, tiny_models.SDXL_ADM)


def model_adm(model: Any, pooled: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.model.encode_adm(pooled_output=pooled, width=64, height=64)


@pytest.mark.parametrize("kind", KINDS)
def test_unet_output_depends_on_prompt(host: Any, loaded: dict, kind: str) -> None:
    model, clip = loaded[kind]["model"], loaded[kind]["clip"]
    cat = _sample(host, model, clip, "a photo of a cat")
    dog = _sample(host, model, clip, "a watercolor of a dog")
    again = _sample(host, model, clip, "a photo of a cat")
    assert cat.shape == (1, 4, 8, 8)
    assert torch.isfinite(cat).all() and torch.isfinite(dog).all()
    assert torch.equal(cat, again)
    assert (cat - dog).abs().mean() > 1e-3 * cat.abs().mean()


@pytest.mark.parametrize("kind", KINDS)
def test_textual_inversion_embedding_of_the_tiny_width(host: Any, loaded: dict, kind: str) -> None:
    clip = loaded[kind]["clip"]
    name = "tiny_ti_xl" if kind == "sdxl" else "tiny_ti_64"
    root = logging.getLogger()
    records = _Records()
    root.addHandler(records)
    try:
        tokens = clip.tokenize(f"a photo of embedding:{name}")
        with torch.inference_mode():
            cond, _ = clip.encode_from_tokens(tokens, return_pooled=True)
    finally:
        root.removeHandler(records)
    assert not [m for m in records.messages if "mismatch" in m or "does not exist" in m], records.messages
    for part in tokens.values():
        assert sum(not isinstance(t[0], int) for t in part[0]) == 2  # both vectors went in as embeddings
    plain, _ = _encode(clip, "a photo of")
    assert not torch.equal(cond, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_vae_is_8x_with_4_channels(host: Any, loaded: dict, kind: str) -> None:
    vae = loaded[kind]["vae"]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        latent = vae.encode(image)
        decoded = vae.decode(latent)
    assert latent.shape == (1, 4, 8, 8)
    assert decoded.shape == (1, 64, 64, 3)
    assert torch.isfinite(latent).all() and torch.isfinite(decoded).all()
    assert decoded.std() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_from_seed(host: Any, written: dict, tmp_path: Path, kind: str) -> None:
    again = tiny_models.write_tiny_checkpoint(kind, tmp_path / "again.safetensors", seed=0)
    other = tiny_models.write_tiny_checkpoint(kind, tmp_path / "other.safetensors", seed=1)
    assert again.read_bytes() == written[kind].read_bytes()
    assert other.read_bytes() != written[kind].read_bytes()
    from safetensors.torch import load_file

    first, second = load_file(str(written[kind])), load_file(str(other))
    assert first.keys() == second.keys()
    differing = [k for k in first if first[k].is_floating_point() and first[k].numel() > 1 and not torch.equal(first[k], second[k])]
    assert "model.diffusion_model.input_blocks.0.0.weight" in differing
    assert len(differing) > 0.9 * sum(1 for k in first if first[k].is_floating_point() and first[k].numel() > 1 and first[k].std() > 0)


@pytest.mark.parametrize("kind", KINDS)
def test_stock_checkpoint_loader_node(host: Any, kind: str) -> None:
    """The conftest writes the tiny checkpoints into the host's models folder: the node finds them."""
    assert tiny_models.tiny_checkpoint_name(kind) in host.folder_paths.get_filename_list("checkpoints")
    with torch.inference_mode():
        model, clip, vae = host.nodes.CheckpointLoaderSimple().load_checkpoint(tiny_models.tiny_checkpoint_name(kind))[:3]
    assert type(model.model.model_config) is tiny_models.tiny_config_class(kind)
    assert clip is not None and vae is not None
