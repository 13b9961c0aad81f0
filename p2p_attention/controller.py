"""The controller: an edit compiled against tokens, applied to attention during sampling.

``build_plan`` turns a P2P_EDIT into per-target token maps, reweight factors and replace windows;
``P2PController`` applies them to each attention call of the UNet. Rows of a call are laid out by
ComfyUI's CFG batching: one chunk per branch (conditional / unconditional), each holding the whole
latent batch, i.e. the source followed by the targets. Only conditional chunks are edited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .alignment import TokenMap, refine_map, word_swap_map
from .attention import apply_probs, attention_probs, edit_cross_probs
from .blend import BlendPlan, blend, blend_masks
from .edits import REFINE, LocalBlendEdit, P2PEdit
from .errors import P2PError
from .maps import AttentionMapStore
from .tokens import WORD, PromptTokens

CONTROLLER = "P2P Controller"
# The layers whose self-attention the targets take from the source, by the finest map size relative
# to the latent: the official implementation (both its notebooks) replaces maps of at most 16x16 for
# a 64x64 latent, i.e. 1/4 of the latent and coarser; 1/2 and coarser also replaces the 32x32 maps.
# The finer layers keep the target's own detail. The default stays this pack's earlier behaviour
# (1/2 and coarser) until benchmarks/bench_edit_quality.py can tell the two apart on a world model
# that follows its captions (README, "Edit quality").
SELF_REPLACE_DOWNSCALES = {"1/4 and coarser": 4, "1/2 and coarser": 2}
DEFAULT_SELF_REPLACE = "1/2 and coarser"
QUERY_BLOCK = 1024  # queries per block of explicit cross-attention probabilities

Tokenize = Callable[[str], PromptTokens]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TargetPlan:
    tokens: PromptTokens
    token_map: TokenMap
    scale: torch.Tensor  # [target tokens]: reweight factor, 1 where unchanged
    cross_until: torch.Tensor  # [target tokens]: fraction of the schedule taking the source's map


@dataclass(frozen=True)
class EditPlan:
    source: PromptTokens
    targets: tuple[TargetPlan, ...]
    self_until: float  # fraction of the schedule with the source's self-attention
    blend: BlendPlan | None = None
    self_min_downscale: int = SELF_REPLACE_DOWNSCALES[DEFAULT_SELF_REPLACE]  # finest self-attention maps replaced


@dataclass(frozen=True)
class AttentionCall:
    """What the controller needs to know about one attention call."""

    heads: int
    sigma: float
    chunks: tuple[bool, ...]  # one per CFG chunk: True for the conditional branch
    downscale: int  # attention map size relative to the latent: 1, 2, 4, ...
    map_size: tuple[int, int]  # (h, w) of the attention maps: the latent's size / downscale, rounded up
    site: tuple = ()  # which transformer block: ComfyUI's (block name, number, index)


class Recorder(Protocol):
    """Receives the cross-attention maps of the conditional branch, targets as edited."""

    def record(self, call: AttentionCall, maps: torch.Tensor) -> None:
        """``maps``: ``[images, queries, keys]`` float32 probabilities averaged over heads, the source first."""


def word_positions(prompt: PromptTokens, word: str, tokenize: Tokenize) -> list[int]:
    """Token positions of every occurrence of ``word`` (one or more words) in ``prompt``."""
    query = [t.key for t in tokenize(word).tokens if t.role == WORD]
    return [p for match in prompt.find(query) for p in match] if query else []


def build_plan(
    edit: P2PEdit,
    tokenize: Tokenize,
    cross_replace_steps: float,
    self_replace_steps: float,
    cross_replace_words: list[tuple[str, float]] = (),
    self_replace_min_downscale: int = SELF_REPLACE_DOWNSCALES[DEFAULT_SELF_REPLACE],
) -> EditPlan:
    """Tokenize and align every target, and place its reweights and replace windows on tokens."""
    source = tokenize(edit.source)
    targets = []
    found_words = {word: False for word, _ in cross_replace_words}
    for target_edit in edit.targets:
        tokens = tokenize(target_edit.prompt)
        if target_edit.alignment == REFINE:
            token_map = refine_map(source, tokens)
        else:
            token_map = word_swap_map(source, tokens, node=target_edit.node)
        scale = torch.ones(len(tokens))
        cross_until = torch.full((len(tokens),), float(cross_replace_steps))
        for word, fraction in cross_replace_words:
            positions = word_positions(tokens, word, tokenize)
            found_words[word] |= bool(positions)
            cross_until[positions] = float(fraction)
        for reweight in target_edit.reweights:
            positions = word_positions(tokens, reweight.word, tokenize)
            if not positions:
                raise P2PError(
                    reweight.node,
                    "words",
                    f"{reweight.word!r} is not a word of the prompt {tokens.text!r}.",
                    "name words exactly as they appear in the prompt (case does not matter).",
                )
            if float(cross_until[positions].max()) <= 0:
                raise P2PError(
                    CONTROLLER,
                    "cross_replace_steps",
                    f"it is 0 for {reweight.word!r}, and a reweight acts only inside the cross-attention replace window, "
                    "so the reweight would do nothing.",
                    "raise cross_replace_steps (the paper uses 0.8).",
                )
            scale[positions] = scale[positions] * reweight.scale
        targets.append(TargetPlan(tokens, token_map, scale, cross_until))
    missing = [word for word, found in found_words.items() if not found]
    if missing:
        raise P2PError(
            CONTROLLER,
            "cross_replace_words",
            f"{', '.join(map(repr, missing))} is in no target prompt.",
            "name words of the target prompts, e.g. 'lasagne: 0.2'.",
        )
    blend_plan = None if edit.blend is None else _blend_plan(edit.blend, source, [t.tokens for t in targets], tokenize)
    return EditPlan(source=source, targets=tuple(targets), self_until=float(self_replace_steps), blend=blend_plan,
                    self_min_downscale=int(self_replace_min_downscale))


def _blend_plan(blend_edit: LocalBlendEdit, source: PromptTokens, targets: list[PromptTokens], tokenize: Tokenize) -> BlendPlan:
    """Token weights of the blend's words in each prompt; every word must be found somewhere."""
    prompts = [source] + targets

    def weights(words: tuple[str, ...], images: list[int], input_name: str, where: str) -> list[torch.Tensor]:
        vectors = [torch.zeros(len(p)) for p in prompts]
        for word in words:
            found = False
            for image in images:
                positions = word_positions(prompts[image], word, tokenize)
                vectors[image][positions] = 1.0
                found |= bool(positions)
            if not found:
                raise P2PError(
                    blend_edit.node,
                    input_name,
                    f"{word!r} is not a word of {where}.",
                    "name words exactly as they appear in the prompts (case does not matter).",
                )
        return vectors

    everything = list(range(len(prompts)))
    source_weights = weights(blend_edit.source_words, [0], "source_words", f"the source prompt {source.text!r}")
    target_weights = weights(blend_edit.target_words, everything[1:], "target_words", "any target prompt")
    region = [source_weights[0]] + target_weights[1:]
    subtract = weights(blend_edit.subtract_words, everything, "subtract_words", "the source or any target prompt")
    return BlendPlan(edit=blend_edit, region=tuple(region), subtract=tuple(subtract))


@dataclass(frozen=True)
class _Columns:
    """The plan on one conditioning length, stacked over targets."""

    matrix: torch.Tensor  # [n, K, K]
    from_source: torch.Tensor  # [n, K]
    scale: torch.Tensor  # [n, K]
    cross_sigma: torch.Tensor  # [n, K]: the token takes the source's map while sigma > this


class P2PController:
    """Applies an ``EditPlan`` to attention calls and guided predictions. Its only state is the
    attention maps of the latest runs, kept per run, so one patched model serves any number of
    samplers and queue runs."""

    def __init__(self, plan: EditPlan, percent_to_sigma: Callable[[float], float], tokenize: Tokenize) -> None:
        self.plan = plan
        self.tokenize = tokenize  # the model's own tokenizer, to find words in maps later
        self.images = 1 + len(plan.targets)
        sigma_of = {}
        for target in plan.targets:
            for fraction in target.cross_until.tolist():
                sigma_of.setdefault(fraction, percent_to_sigma(fraction))
        self._cross_sigma = [
            torch.tensor([sigma_of[f] for f in t.cross_until.tolist()], dtype=torch.float64) for t in plan.targets
        ]
        self._self_sigma = percent_to_sigma(plan.self_until)
        self._blend_sigma = percent_to_sigma(plan.blend.edit.start) if plan.blend else 0.0
        self._columns: dict[tuple[int, torch.device], _Columns] = {}
        self.maps = AttentionMapStore([len(plan.source)] + [len(t.tokens) for t in plan.targets])
        self.recorders: list[Recorder] = [self.maps]

    def columns(self, keys: int, device: torch.device) -> _Columns:
        cached = self._columns.get((keys, device))
        if cached is None:
            lengths = [len(self.plan.source)] + [len(t.tokens) for t in self.plan.targets]
            if any(keys % n for n in lengths):
                raise P2PError(
                    CONTROLLER,
                    "clip",
                    f"the sampler's conditioning has {keys} tokens, which is not made of this edit's prompts "
                    f"({', '.join(map(str, lengths))} tokens).",
                    "plug the controller's CONDITIONING output into the sampler's positive input unchanged.",
                )
            maps = [t.token_map.tile(keys) for t in self.plan.targets]
            repeat = [keys // len(t.tokens) for t in self.plan.targets]
            cached = _Columns(
                matrix=torch.stack([m.matrix for m in maps]).to(device),
                from_source=torch.stack([m.from_source for m in maps]).to(device),
                scale=torch.stack([t.scale.repeat(r) for t, r in zip(self.plan.targets, repeat)]).to(device),
                cross_sigma=torch.stack([s.repeat(r) for s, r in zip(self._cross_sigma, repeat)]).to(device),
            )
            self._columns[(keys, device)] = cached
        return cached

    def _wrong_batch(self, latents: int) -> P2PError:
        return P2PError(
            CONTROLLER,
            "latent",
            f"the sampler runs {latents} latents per branch, but this edit makes "
            f"{self.images} images (the source and {self.images - 1} target(s)).",
            "plug the controller's LATENT output into the sampler unchanged (no batch or repeat nodes between).",
        )

    def after_cfg(self, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """Each step's guided prediction: local blend (from its start) and the run's latest result."""
        if denoised.shape[0] != self.images:
            raise self._wrong_batch(denoised.shape[0])
        run = self.maps.current(sigma)
        if self.plan.blend is not None and sigma <= self._blend_sigma:
            masks = blend_masks(self.plan.blend, run, self.images - 1, tuple(denoised.shape[-2:]), denoised.device)
            denoised = blend(denoised, masks)
            run.blend_mask = masks
        run.final = denoised
        return denoised

    def rows(self, call: AttentionCall, batch: int) -> list[tuple[int, list[int]]]:
        """(source row, target rows) of every conditional chunk."""
        if batch != len(call.chunks) * self.images:
            raise self._wrong_batch(batch // max(len(call.chunks), 1))
        return [
            (c * self.images, list(range(c * self.images + 1, (c + 1) * self.images)))
            for c, is_cond in enumerate(call.chunks)
            if is_cond
        ]

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, attend: Attend) -> torch.Tensor:
        """Inside the self-attention window the targets attend with the source's queries and keys
        over their own values: the source's attention map applied to the target, which a fused
        kernel computes without ever forming the map."""
        rows = self.rows(call, q.shape[0])
        if call.downscale < self.plan.self_min_downscale or not call.sigma > self._self_sigma or not rows:
            return attend(q, k, v)
        take = list(range(q.shape[0]))  # each row's queries and keys: its own, or its source's
        for source, targets in rows:
            for target in targets:
                take[target] = source
        return attend(q[take], k[take], v)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, attend: Attend) -> torch.Tensor:
        """Targets take the source's (mapped, reweighted) cross-attention maps inside the window.

        The edit is added as a difference to ``attend``'s output, so that another pack's attention
        patch chained underneath keeps its own contribution. Probabilities are formed a block of
        queries at a time, so their memory stays a few MB at any image size.
        """
        rows = self.rows(call, q.shape[0])
        out = attend(q, k, v)
        if not rows:
            return out
        cols = self.columns(k.shape[1], q.device)
        inside = call.sigma > cols.cross_sigma
        editing = bool(inside.any())
        if not editing and not self.recorders:
            return out
        from_source = cols.from_source & inside
        scale = torch.where(inside, cols.scale, torch.ones_like(cols.scale))
        for source, targets in rows:
            images = [source] + targets
            maps = []
            for start in range(0, q.shape[1], QUERY_BLOCK):
                block = slice(start, start + QUERY_BLOCK)
                probs = attention_probs(q[images, block], k[images], call.heads)
                if editing:
                    own = probs[1:]
                    edited = edit_cross_probs(probs[0], own, cols.matrix, from_source, scale)
                    if edited is not own:
                        delta = apply_probs(edited - own, v[targets], call.heads)
                        out[targets, block] += delta.to(out.dtype)
                        probs = torch.cat([probs[:1], edited])
                maps.append(probs.mean(dim=1))
            maps = torch.cat(maps, dim=1)
            for recorder in self.recorders:
                recorder.record(call, maps)
        return out
