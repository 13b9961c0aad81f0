"""The tiny world model and its world: the stock loader loads it, CLIP Text Encode is its trained
text path, and the scorer reads the world's own pictures back exactly.

The floor on P2P's edit quality with this model is ``test_edit_quality.py``.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_dit_models
import world_edits
import world_model
import world_scenes


def test_the_stock_loader_loads_the_world_model_and_clip_text_encode_is_its_text_path(host):
    import comfy.model_base

    model, clip, vae = world_edits.load_world(host)
    assert type(model.model.model_config) is world_model.register_world_architecture()
    # It predicts v, as it was trained to: read as eps, every picture would be wrong.
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert type(vae.first_stage_model).__name__ == "TAESD"
    text = "a small red circle at the top left on a striped gray background"
    tokens = clip.tokenize(text)
    with torch.inference_mode():
        stock = host.nodes.CLIPTextEncode().encode(clip, text)[0][0][0]
        trained = clip.cond_stage_model.clip_l([[t for t, _ in tokens["l"][0]]])[0]  # what train_world.py calls
    torch.testing.assert_close(stock.float(), trained.float(), rtol=1e-4, atol=1e-4)


def test_the_world_models_caption_reaches_it_through_its_words_not_its_padding(host):
    """``train_world.content_free_padding``: from the first end token on, CLIP Text Encode gives every
    caption the empty caption's states, so the words' tokens are where the caption is, and
    Prompt-to-Prompt's edits of their attention change the picture. (The previous model's padding
    carried the whole caption, each differently: 1.29 here, for the first caption.)"""
    _, clip, _ = world_edits.load_world(host)
    captions = ["a small red circle at the top left on a striped gray background",
                "a large blue triangle and a small green square on a dotted yellow background", ""]
    with torch.inference_mode():
        states = [host.nodes.CLIPTextEncode().encode(clip, c)[0][0][0][0].float() for c in captions]
    empty, end = states[-1], clip.cond_stage_model.clip_l.special_tokens["end"]
    for caption, hidden in zip(captions, states[:-1]):
        tail = slice([t for t, _ in clip.tokenize(caption)["l"][0]].index(end), None)  # from the first end token on
        difference = (hidden[tail] - empty[tail]).pow(2).mean().sqrt() / empty[tail].pow(2).mean().sqrt()
        assert difference < 0.1, f"{caption!r}: the padding differs from the empty caption's by {difference:.2f} (RMS, relative)"


def test_a_flux_world_checkpoint_loads_with_the_stock_loader_and_clip_text_encode_is_its_trained_text_path(host, tmp_path):
    """The flux family as ``scripts/train_world.py`` saves it (untrained: its layout is what is
    checked); the committed flux checkpoint comes from a GPU run."""
    reason = tiny_dit_models.unsupported_reason()
    if reason:
        pytest.skip(reason)
    family = world_model.FAMILIES["flux"]
    parts = family.build()
    state = family.state_dict(parts)
    family.check_detection(state)
    host.utils.save_torch_file(state, str(tmp_path / "world_flux.safetensors"))
    model, clip, vae = world_edits.load_world(host, "flux", tmp_path / "world_flux.safetensors")
    assert type(model.model.model_config) is world_model.register_world_architecture("flux")
    assert (type(vae.first_stage_model).__name__, vae.latent_channels) == ("TAESD", 16)
    text = "a small red circle at the top left on a striped gray background"
    with torch.inference_mode():
        stock = host.nodes.CLIPTextEncode().encode(clip, text)[0][0]
        trained = parts.encode_tokens(torch.tensor([parts.token_ids(text)]))
    torch.testing.assert_close(stock[0].float(), trained["t5xxl"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stock[1]["pooled_output"].float(), trained["l"][1], rtol=1e-4, atol=1e-4)


# The committed world models' caption following on FOLLOWING_SEEDS (the benchmark's
# --caption-following scenes): at least these shares; an untrained model scores about chance
# (background colour 0.25, place 0.11). Their 60-caption figures are in the README.
FOLLOWING_SEEDS = range(10)
FOLLOWING_FLOORS = {
    "sd15": {"colour": 0.7, "shape": 0.7, "place": 0.6, "background": 0.9, "pattern": 0.9},
    "flux": {"colour": 0.6, "place": 0.7, "background": 0.9, "pattern": 0.9},
}


@pytest.mark.parametrize("family", list(FOLLOWING_FLOORS))
def test_the_world_model_follows_its_captions(host, family):
    reason = family == "flux" and tiny_dit_models.unsupported_reason()
    if reason:
        pytest.skip(reason)
    world = world_edits.load_world(host, family)
    scores = [world_edits.follow_caption(host, world, seed, world_edits.FAMILY_SETTINGS[family])[1] for seed in FOLLOWING_SEEDS]
    floors = FOLLOWING_FLOORS[family]
    means = {k: float(np.mean([s[k] for s in scores])) for k in floors}
    print(family, means)
    assert all(means[k] >= floor for k, floor in floors.items()), means


def test_the_world_model_draws_circles_and_squares_from_their_words(host):
    """``world_edits.shape_word_use`` (``bench_edit_quality.py --shape-words``): with circle and square
    swapped in the caption, the committed model's error inside the object grows (about x1.9 at sigma
    1.6 over 48 objects); a model that draws them alike, as an hour from scratch did, errs the same."""
    rows = world_edits.shape_word_use(host, world_edits.load_world(host), count=16)
    sigma, right, wrong = rows[world_edits.WORD_USE_STEPS.index(500)]
    assert round(sigma, 1) == 1.6 and wrong > 1.4 * right, rows


def test_the_scorer_reads_rendered_scenes_exactly():
    for pattern in world_scenes.PATTERNS:
        for phase in range(world_scenes.PATTERN_PHASES):  # however the pattern lies
            assert world_scenes.read_background(world_scenes.background_image("brown", pattern, phase)) == ("brown", pattern)
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = world_scenes.sample_scene(rng)
        picture, masks = world_scenes.render(scene)
        assert world_scenes.caption_following(picture, scene) == {"colour": 1.0, "shape": 1.0, "place": 1.0, "background": 1.0, "pattern": 1.0}
        found = world_scenes.find_objects(picture)
        for obj, mask in zip(scene.objects, masks):
            assert world_scenes.iou(world_scenes.best_match(found, obj).mask, mask) == 1.0


def test_the_scorer_sees_a_wrong_colour_shape_and_background():
    scene = world_scenes.Scene((world_scenes.make_object("circle", "red", "large", (1, 1)),), "gray", "striped")
    other = world_scenes.Scene((world_scenes.make_object("square", "blue", "large", (0, 0)),), "pink", "dotted")
    picture = world_scenes.render(other)[0]
    assert world_scenes.caption_following(picture, scene) == {"colour": 0.0, "shape": 0.0, "place": 0.0, "background": 0.0, "pattern": 0.0}


def test_training_keeps_the_caption_out_of_the_padding_of_the_free_rows_only(host, monkeypatch):
    """``scripts/train_world.py``: the rows ``content_free_share`` frees see the empty caption's
    states from their first end token on (and only those are taught to give them); the others keep
    their own, which carry the caption, as a model from scratch first learns the world from."""
    if host.version != "current":
        pytest.skip("the training script runs on the late-2025 host (Parts.encode_tokens is its SDClipModel's)")
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import train_world

    assert [train_world.content_free_share(step, 100, (0.25, 0.65)) for step in (0, 25, 45, 65, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert train_world.content_free_share(0, 100, (0.0, 0.0)) == 1.0  # going on from a checkpoint: all, from the first step
    parts = world_model.FAMILIES["sd15"].build()
    caption = "a small red circle at the top left on a striped gray background"
    tokens, empty = torch.tensor([parts.token_ids(caption)] * 2), torch.tensor(parts.token_ids(""))
    with torch.no_grad():
        cond, loss = train_world.content_free_padding(parts, tokens, empty, torch.tensor([True, False]))
        own, empty_states = parts.encode_tokens(torch.cat([tokens, empty[None]]))["l"][0].split([2, 1])
    tail = slice(parts.token_ids(caption).index(parts.encoder("l").special_tokens["end"]), None)
    seen = cond["l"][0]
    assert torch.equal(seen[0, tail], empty_states[0, tail]) and torch.equal(seen[1], own[1])
    assert torch.equal(seen[0, : tail.start], own[0, : tail.start])
    assert not torch.allclose(own[1, tail], empty_states[0, tail])  # so the first row's tail did change
    assert loss > 0


def _training_parts_and_two_captions(host, monkeypatch, family: str) -> tuple:
    """(the training script, the family, its parts, what the denoiser sees of two captions as the
    script encodes them, the first's padding content-free)."""
    if host.version != "current":
        pytest.skip("the training script runs on the late-2025 host (the world families build trainable text encoders there)")
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import train_world

    world = world_model.FAMILIES[family]
    parts = world.build()
    tokens = torch.tensor([parts.token_ids("a small red circle on a plain white background")] * 2)
    with train_world.copying_saved_tensors():
        cond, _ = train_world.content_free_padding(parts, tokens, torch.tensor(parts.token_ids("")), torch.tensor([True, False]))
    return train_world, world, parts, cond


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_training_copies_what_autograd_saves_only_in_denoisers_that_add_in_place(host, monkeypatch, family):
    """``Family.adds_in_place``: ``scripts/train_world.py`` copies the tensors autograd saves in the
    text encoders and, where the flag says so, in the denoiser. The flag must be true where the
    backward needs the copies (Flux's blocks add their residuals in place), and false only where it
    does not (SD1.x's UNet: the copies cost 5% of its CPU step)."""
    train_world, world, parts, cond = _training_parts_and_two_captions(host, monkeypatch, family)
    channels = parts.vae.taesd_encoder[-1].out_channels
    losses, _ = world.loss(parts, torch.randn(2, channels, 16, 16), cond, torch.Generator().manual_seed(0), (0.5, 0.0))
    if world.adds_in_place:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            losses.sum().backward()
    else:
        losses.sum().backward()


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_coarse_steps_train_every_weight_on_the_latents_at_half_their_size(host, monkeypatch, family):
    """``train_world.coarse`` (``--coarse-share``): each 2x2 block's mean, which both families'
    denoisers take as they take the full latents (the UNet's deepest level at 1x1, Flux's 4x4
    tokens): one loss a row, and a gradient for every weight of the denoiser."""
    train_world, world, parts, cond = _training_parts_and_two_captions(host, monkeypatch, family)
    latents = torch.arange(16.0).reshape(1, 1, 4, 4).expand(3, 4, 4, 4).to(torch.float16)
    assert torch.equal(train_world.coarse(latents)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float16))
    full = torch.randn(2, parts.vae.taesd_encoder[-1].out_channels, 16, 16)
    with train_world.copying_saved_tensors():
        losses, _ = world.loss(parts, train_world.coarse(full), cond, torch.Generator().manual_seed(0), (0.5, 0.0))
    assert losses.shape == (2,) and bool(losses.isfinite().all())
    losses.sum().backward()
    denoiser = parts.model.diffusion_model
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in denoiser.parameters() if p.requires_grad)


def test_coarse_steps_with_a_time_limit_are_refused_before_anything_runs():
    """``--coarse-share`` with ``--minutes``: the schedule would be fitted to the time at the speed
    of the half-size steps, and the switch to the full latents would move with every fit."""
    script = world_model.REPO / "scripts" / "train_world.py"
    result = subprocess.run([sys.executable, str(script), "--coarse-share", "0.7", "--minutes", "60"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--coarse-share trains at two speeds, so --minutes cannot fit its schedule to the time: give --steps" in result.stderr


def test_training_captions_leave_the_places_out_of_about_half_of_the_pictures(host, monkeypatch):
    """``scripts/train_world.py``: the dataset's captions are as users write them, about half
    (PLACELESS_SHARE) without the objects' places."""
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import train_world

    def placeless(captions: list[str]) -> int:
        return sum(not any(p in c for p in world_scenes.PLACES.values()) for c in captions)

    pictures, captions = train_world.render_dataset(40, seed=0, workers=1)
    assert len(pictures) == len(captions) == 40
    assert 10 <= placeless(captions) <= 30
    # --placeless-share: the same scenes, fewer or more of them without places
    fewer = train_world.render_dataset(40, seed=0, workers=1, placeless_share=0.25)
    assert np.array_equal(fewer[0], pictures) and placeless(fewer[1]) < placeless(captions)
    assert placeless(train_world.render_dataset(40, seed=0, workers=1, placeless_share=0.0)[1]) == 0


def test_going_on_from_a_checkpoint_finds_the_dataset_its_run_encoded(host, monkeypatch, tmp_path):
    """``train_world.dataset_name``: the encoded dataset is named by the encoder's weights as the
    checkpoint keeps them (float16), so ``--init`` reuses the dataset of the run that wrote the
    checkpoint (4.5 minutes of the hour on 2 CPU cores), and another encoder encodes anew."""
    if host.version != "current":
        pytest.skip("the training script runs on the late-2025 host (the world families build trainable text encoders there)")
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import argparse

    import train_world

    family = world_model.FAMILIES["sd15"]
    args = argparse.Namespace(family="sd15", seed=0, images=8000, placeless_share=train_world.PLACELESS_SHARE)
    parent = family.build()
    with torch.no_grad():  # weights that float16 does not hold exactly, as training leaves them
        for weight in parent.vae.taesd_encoder.parameters():
            weight.add_(torch.randn_like(weight) * 1e-3)
    path = tmp_path / "parent.safetensors"
    train_world.write_checkpoint(parent, family, parent.trainable(), 1.0, path)
    child = family.build()
    train_world.start_from(child, family, path)
    assert train_world.dataset_name(child, args) == train_world.dataset_name(parent, args)
    with torch.no_grad():
        next(child.vae.taesd_encoder.parameters()).view(-1)[0] += 0.01
    assert train_world.dataset_name(child, args) != train_world.dataset_name(parent, args)


def test_going_on_from_a_state_trained_with_other_settings_is_refused(monkeypatch, tmp_path):
    """``train_world.check_same_run``: the state folder is named by the family, the seed and the
    ``--init`` checkpoint, so a second recipe from the same checkpoint would find the first one's
    state, and, once that is done, write its model under the new ``--out``; a second recipe from
    scratch would find the first one's VAE."""
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import argparse

    import train_world

    settings = {name: 0.0 for name in train_world.RUN_SETTINGS} | {"lr": 3e-4, "content_free_ramp": (0.0, 0.0)}
    train_world.check_same_run(settings, argparse.Namespace(**settings), tmp_path)  # the same run goes on
    train_world.check_same_run(None, argparse.Namespace(**settings), tmp_path)  # a state from before the settings were kept
    older = {name: value for name, value in settings.items() if name != "adam_beta2"}  # from before --adam-beta2
    train_world.check_same_run(older, argparse.Namespace(**settings), tmp_path)
    with pytest.raises(SystemExit, match=r"was trained with --lr 0.0003 \(now 0.0006\)"):
        train_world.check_same_run(settings, argparse.Namespace(**(settings | {"lr": 6e-4})), tmp_path)
    with pytest.raises(SystemExit, match=r"was trained with --steps 0.0 \(now 20000\)"):  # more steps would be ignored
        train_world.check_same_run(settings, argparse.Namespace(**(settings | {"steps": 20000})), tmp_path)
    # the VAE's state too: a run from scratch with other VAE settings would use the earlier VAE
    vae = {"images": 8000, "vae_steps": 400, "vae_batch": 12, "vae_lr": 2e-4}
    train_world.check_same_run(vae, argparse.Namespace(**vae), tmp_path, train_world.VAE_SETTINGS)
    with pytest.raises(SystemExit, match=r"was trained with --vae-steps 400 \(now 800\)"):
        train_world.check_same_run(vae, argparse.Namespace(**(vae | {"vae_steps": 800})), tmp_path, train_world.VAE_SETTINGS)


def test_a_world_model_from_scratch_starts_its_word_embeddings_at_unit_scale(host):
    """``world_model._reset``: the text encoder's embeddings start at N(0, 1), PyTorch's default, not
    CLIP's N(0, 0.02), from which training soon gave "circle" and "square" one state
    (docs/world_training.md)."""
    if host.version != "current":
        pytest.skip("the training script runs on the late-2025 host (the world families build trainable text encoders there)")
    embeddings = world_model.FAMILIES["sd15"].build().encoder("l").transformer.get_input_embeddings().weight
    assert abs(float(embeddings.std()) - 1.0) < 0.01 and abs(float(embeddings.mean())) < 0.01


def test_training_draws_its_shares_of_the_rows_from_the_top_and_the_middle_of_the_schedule(host):
    """``world_model._noised``: shares of the rows from the schedule's top 40% (sigma 2.3 and up on
    SD1.x's) and from its middle (sigma 0.57 to 3.3), the others from all of it; without a middle
    share, a seed draws what it drew before the middle band existed (the runs in docs/world_training.md)."""
    if host.version != "current":
        pytest.skip("the training script runs on the late-2025 host (the world families build trainable text encoders there)")
    parts = world_model.FAMILIES["sd15"].build()
    sigmas = parts.model.model_sampling.sigmas
    top, middle, above_middle = (float(sigmas[int(fraction * len(sigmas))]) for fraction in (world_model.HIGH_NOISE[0], *world_model.MID_NOISE))
    assert [round(sigma, 1) for sigma in (top, middle, above_middle)] == [2.3, 0.6, 3.3]
    latents = torch.zeros(4000, 1, 1, 1)
    # (top share, middle share) -> (rows in the top band, rows in the middle band); the bands overlap from sigma 2.3 to 3.3
    cases = {(0.0, 0.0): (0.4, 0.5), (1.0, 0.0): (1.0, 0.25), (0.0, 1.0): (0.2, 1.0), (0.5, 0.0): (0.7, 0.375), (0.5, 0.5): (0.6, 0.625)}
    for shares, (want_top, want_middle) in cases.items():
        sigma = world_model._noised(parts, latents, torch.Generator().manual_seed(0), shares)[0]
        in_top, in_middle = float((sigma >= top).float().mean()), float(((sigma >= middle) & (sigma < above_middle)).float().mean())
        assert abs(in_top - want_top) < 0.03 and abs(in_middle - want_middle) < 0.03, (shares, in_top, in_middle)
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(0, 1000, (4000,), generator=generator)
    high = torch.randint(600, 1000, (4000,), generator=generator)
    before = torch.where(torch.rand(4000, generator=generator) < 0.5, high, before)
    assert torch.equal(world_model._noised(parts, latents, torch.Generator().manual_seed(0), (0.5, 0.0))[0], sigmas[before])


def test_balancing_the_noise_levels_weighs_every_level_alike_and_keeps_the_total(host, monkeypatch):
    """``train_world.NoiseLevelBalance`` (``--balance-noise-levels``): once each band of noise levels
    has its running mean, every row weighs the mean over bands, whatever its own level's loss (the v
    loss at the schedule's top is about six times the middle's), so a level ten times another's
    pulls alike; at power 0.5 it pulls sqrt(10) times as hard, the total still kept; losses alike
    at every level are left as they are; a resumed run goes on with the means it saved."""
    monkeypatch.syspath_prepend(str(world_model.REPO / "scripts"))
    import train_world

    steps = torch.tensor([990, 100, 990, 100])  # rows from the top band and from a low one
    losses = torch.tensor([1.0, 0.1, 1.0, 0.1], requires_grad=True)
    balance = train_world.NoiseLevelBalance(levels=1000, bands=20)
    for _ in range(3):
        balanced = balance(losses, steps)
    balanced.backward()
    torch.testing.assert_close(balanced.detach(), torch.tensor(0.55))  # (1.0 + 0.1) / 2: the total kept
    torch.testing.assert_close(losses.grad * losses.detach() * len(losses), torch.full((4,), 0.55))  # each row weighs alike
    alike = torch.full((4,), 0.3)
    assert torch.equal(train_world.NoiseLevelBalance(levels=1000)(alike, steps), alike.mean())
    half = train_world.NoiseLevelBalance(levels=1000, power=0.5, bands=20)
    losses.grad = None
    for _ in range(3):
        balanced = half(losses, steps)
    balanced.backward()
    torch.testing.assert_close(balanced.detach(), torch.tensor(0.55))  # the total kept at any power
    pulls = losses.grad * losses.detach()
    torch.testing.assert_close(pulls[0] / pulls[1], torch.tensor(10**0.5))  # the top's pull: between x10 (off) and x1
    resumed = train_world.NoiseLevelBalance(levels=1000, bands=20)
    resumed.load_state_dict(balance.state_dict())
    other = torch.tensor([0.5, 0.2, 0.7, 0.1])
    assert torch.equal(resumed(other, steps), balance(other, steps))
