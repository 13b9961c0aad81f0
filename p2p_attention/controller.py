"""The controller: an edit compiled against tokens, applied to attention during sampling.

``build_plan`` turns a P2P_EDIT into per-target token maps, reweight factors and replace windows;
``P2PController.attention`` applies them to each attention call of the model, whatever its family:
a UNet's self-attention is a call without text keys, its cross-attention a call with text keys only,
a DiT's joint attention a call with both (``AttentionCall``). Rows of a call are laid out by
ComfyUI's CFG batching: one chunk per branch (conditional / unconditional), each holding the whole
latent batch, i.e. the source followed by the targets. Only conditional chunks are edited.
"""
from __future__ import annotations

import bisect
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .alignment import TokenMap, refine_map, word_swap_map
from .attention import Attend, map_cross_probs, mark_text_mass, merge_heads, selection, split_mass, text_distribution, with_mass_channels
from .blend import BlendPlan, blend, blend_masks
from .columns import Columns, common_lengths, map_on_columns, padded, tiled
from .edits import REFINE, LocalBlendEdit, P2PEdit
from .errors import P2PError
from .maps import AttentionMapStore
from .tokens import PromptTokens

CONTROLLER = "P2P Controller"
# The layers whose self-attention the targets take from the source, by the finest map size relative
# to the latent: the official implementation (both its notebooks) replaces maps of at most 16x16 for
# a 64x64 latent, i.e. 1/4 of the latent and coarser; 1/2 and coarser also replaces the 32x32 maps.
# The finer layers keep the target's own detail. The default, 1/2 and coarser, is the one the
# edit-quality benchmark chose: on the first tiny world model's swaps it kept more of the source's
# structure (IoU 0.50 against 0.41) at the same edit success, and on the current one a little more
# (0.62 against 0.60) (README, "Edit quality", "Defaults").
SELF_REPLACE_DOWNSCALES = {"1/4 and coarser": 4, "1/2 and coarser": 2}
DEFAULT_SELF_REPLACE = "1/2 and coarser"
# Queries per block of explicit cross-attention probabilities: a block's few float32 temporaries
# stay below what the joint attention itself adds (Flux at 1024x1024: 4096 image queries).
QUERY_BLOCK = 512
NOISE_START = 0.001  # steps above this fraction's noise level start from pure noise (a run's first)
TILED, PADDED = "tiled", "padded"  # how prompts of different lengths share columns: see columns.py


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

    @property
    def prompts(self) -> list[PromptTokens]:
        return [self.source] + [t.tokens for t in self.targets]


@dataclass(frozen=True)
class AttentionCall:
    """What the controller needs to know about one attention call.

    Keys are the prompt's text columns (``text``), image tokens (``image_keys``) or both (a DiT's
    joint attention); ``queries`` are the rows of the image tokens, which alone are edited.
    """

    heads: int
    sigma: float
    chunks: tuple[bool, ...]  # one per CFG chunk: True for the conditional branch
    downscale: int  # attention map size relative to the latent: 1, 2, 4, ...
    map_size: tuple[int, int]  # (h, w) of the attention maps: the latent's size / downscale, rounded up
    queries: slice
    text: slice | None  # key columns of the prompt's tokens; None in self-attention
    image_keys: slice | None  # key columns of the image tokens; None in cross-attention
    transformer: bool = False  # a DiT: every block sees the same token grid
    site: tuple = ()  # which block: ComfyUI's (block name, number, index) or a DiT's (block type, index)


class Recorder(Protocol):
    """Receives the cross-attention maps of the conditional branch, targets as edited."""

    def record(self, call: AttentionCall, rows: slice, maps: list[torch.Tensor]) -> None:
        """``maps``: per image (the source first) ``[rows, tokens]`` float32 probabilities over the
        prompt's tokens, averaged over heads, of the call's query rows ``rows`` (counted from its
        first image query). A call's blocks come in order, its first at row 0."""


def build_plan(
    edit: P2PEdit,
    tokenize: Callable[[str], PromptTokens],
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
        own_window = torch.zeros(len(tokens), dtype=torch.bool)
        for word, fraction in cross_replace_words:
            positions = tokens.find(word)
            found_words[word] |= bool(positions)
            cross_until[positions] = float(fraction)
            own_window[positions] = True
        for reweight in target_edit.reweights:
            positions = tokens.find(reweight.word)
            if not positions:
                raise P2PError(
                    reweight.node,
                    "words",
                    f"{reweight.word!r} is not a word of the prompt {tokens.text!r}.",
                    "name words as they are typed in the prompt (case and surrounding punctuation do not matter).",
                )
            # A reweight acts inside its word's window, so a reweighted word is edited over the whole
            # schedule unless cross_replace_words gives it a window: after the window the word's own
            # attention comes back unscaled, and on the world model a reweight inside the common
            # window alone cleared the pattern on 5% of the seeds at 0.6 and 45% at 0.8, against 90%
            # over the whole schedule (README, "Defaults").
            whole = torch.tensor(positions)[~own_window[positions]]
            cross_until[whole] = 1.0
            if float(cross_until[positions].max()) <= 0:
                raise P2PError(
                    CONTROLLER,
                    "cross_replace_words",
                    f"it gives {reweight.word!r} a window of 0, and a reweight acts only inside its word's window, "
                    "so the reweight would do nothing.",
                    "give the word a window above 0, or leave it out (a reweighted word is edited over the whole schedule).",
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
    blend_plan = None if edit.blend is None else _blend_plan(edit.blend, source, [t.tokens for t in targets])
    return EditPlan(source=source, targets=tuple(targets), self_until=float(self_replace_steps), blend=blend_plan,
                    self_min_downscale=int(self_replace_min_downscale))


def _blend_plan(blend_edit: LocalBlendEdit, source: PromptTokens, targets: list[PromptTokens]) -> BlendPlan:
    """Token weights of the blend's words in each prompt; every word must be found somewhere."""
    prompts = [source] + targets

    def weights(words: tuple[str, ...], images: list[int], input_name: str, where: str) -> list[torch.Tensor]:
        vectors = [torch.zeros(len(p)) for p in prompts]
        for word in words:
            found = False
            for image in images:
                positions = prompts[image].find(word)
                vectors[image][positions] = 1.0
                found |= bool(positions)
            if not found:
                raise P2PError(
                    blend_edit.node,
                    input_name,
                    f"{word!r} is not a word of {where}.",
                    "name words as they are typed in the prompts (case and surrounding punctuation do not matter).",
                )
        return vectors

    everything = list(range(len(prompts)))
    source_weights = weights(blend_edit.source_words, [0], "source_words", f"the source prompt {source.text!r}")
    target_weights = weights(blend_edit.target_words, everything[1:], "target_words", "any target prompt")
    region = [source_weights[0]] + target_weights[1:]
    subtract = weights(blend_edit.subtract_words, everything, "subtract_words", "the source or any target prompt")
    return BlendPlan(edit=blend_edit, region=tuple(region), subtract=tuple(subtract))


def same_rows(x: torch.Tensor) -> bool:
    """Whether every row of a batch equals the first, up to float rounding."""
    scale = max(1.0, float(x[:1].abs().max()))
    return bool(((x[1:] - x[:1]).abs() <= 1e-5 * scale).all())


@dataclass(frozen=True)
class _Window:
    """The cross-attention replace windows at one noise level, on the device."""

    editing: bool  # some column is inside its window
    from_source: torch.Tensor | None  # [n, K] bool: the columns taking the source's map; None: none does
    scale: torch.Tensor | None  # [n, 1, 1, K]: reweight factors inside the window; None: all 1


@dataclass(frozen=True)
class _OnColumns:
    """The plan on one conditioning width and device, stacked over targets.

    Which columns are inside their window depends on the noise level alone, so it is decided on the
    host, once per level (``window``): testing device tensors, or copying host tensors to the device,
    at every attention call would make the host wait for the device's queue each time.
    """

    images: tuple[Columns, ...]  # where each prompt's tokens sit (source first), indexed on the device
    matrix: torch.Tensor  # [n, K, K], on the device
    picks: torch.Tensor | None  # [n, K] on the device: the matrix as a selection, where it is one
    padding: torch.Tensor | None  # [images, K] additive key mask (-inf on padding), None without padding
    from_source: torch.Tensor  # [n, K], on the host like the two below
    scale: torch.Tensor  # [n, K]
    cross_sigma: torch.Tensor  # [n, K]: the column takes the source's map while sigma > this
    levels: tuple[float, ...]  # the distinct values of cross_sigma, ascending
    windows: dict[int, _Window] = field(default_factory=dict)  # by how many levels sigma is above

    def window(self, sigma: float) -> _Window:
        """The windows at noise level ``sigma``."""
        level = bisect.bisect_left(self.levels, sigma)
        cached = self.windows.get(level)
        if cached is None:
            device = self.matrix.device
            inside = sigma > self.cross_sigma
            from_source = self.from_source & inside
            scale = torch.where(inside, self.scale, torch.ones_like(self.scale))
            cached = self.windows[level] = _Window(
                editing=bool(inside.any()),
                from_source=from_source.to(device) if bool(from_source.any()) else None,
                scale=None if bool((scale == 1).all()) else scale[:, None, None, :].to(device),
            )
        return cached


class P2PController:
    """Applies an ``EditPlan`` to attention calls and guided predictions. Its only state is the
    attention maps of the latest runs, kept per run, so one patched model serves any number of
    samplers and queue runs."""

    def __init__(
        self,
        plan: EditPlan,
        percent_to_sigma: Callable[[float], float],
        layout: str = TILED,
        text_pads_to: int = 0,
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.text_pads_to = text_pads_to  # the model's own left padding of its text (columns.padded)
        # Names what this controller made (its conditioning), through any copies on the way to the sampler.
        self.key = uuid.uuid4().hex
        self.images = 1 + len(plan.targets)
        sigma_of = {}
        for target in plan.targets:
            for fraction in target.cross_until.tolist():
                sigma_of.setdefault(fraction, percent_to_sigma(fraction))
        self._cross_sigma = [
            torch.tensor([sigma_of[f] for f in t.cross_until.tolist()], dtype=torch.float64) for t in plan.targets
        ]
        self._self_sigma = percent_to_sigma(plan.self_until)
        self._noise_sigma = percent_to_sigma(NOISE_START)
        self._blend_sigma = percent_to_sigma(plan.blend.edit.start) if plan.blend else 0.0
        self._on_columns: dict[tuple[int, torch.device], _OnColumns] = {}
        self.maps = AttentionMapStore()
        self.recorders: list[Recorder] = [self.maps]

    @property
    def columns_width(self) -> int | None:
        """The conditioning's width in the padded layout (None when tiled: any common multiple)."""
        return sum(common_lengths(self.plan.prompts)) if self.layout == PADDED else None

    def prompt_columns(self, keys: int) -> list[Columns]:
        """Where each prompt's tokens sit among ``keys`` conditioning columns (source first)."""
        prompts = self.plan.prompts
        if self.layout == PADDED:
            lengths = common_lengths(prompts)
            if keys == sum(lengths):
                return [padded(p, lengths, self.text_pads_to) for p in prompts]
        elif not any(keys % len(p) for p in prompts):
            return [tiled(len(p), keys) for p in prompts]
        raise P2PError(
            CONTROLLER,
            "clip",
            f"the sampler's conditioning has {keys} tokens, which is not made of this edit's prompts "
            f"({', '.join(str(len(p)) for p in prompts)} tokens).",
            "plug the controller's CONDITIONING output into the sampler's positive input unchanged.",
        )

    def on_columns(self, keys: int, device: torch.device) -> _OnColumns:
        cached = self._on_columns.get((keys, device))
        if cached is None:
            images = self.prompt_columns(keys)
            source, targets = images[0], images[1:]
            spread = lambda values, cols, fill: cols.spread(values, fill)  # noqa: E731
            padding = torch.stack([c.padding for c in images])
            cross_sigma = torch.stack([spread(s, c, 0.0) for s, c in zip(self._cross_sigma, targets)])
            matrix = torch.stack([map_on_columns(t.token_map.matrix, source, c) for t, c in zip(self.plan.targets, targets)])
            from_source = torch.stack([spread(t.token_map.from_source, c, False) for t, c in zip(self.plan.targets, targets)])
            picks = selection(matrix, from_source)
            cached = _OnColumns(
                images=tuple(c.to(device) for c in images),
                matrix=matrix.to(device),
                picks=None if picks is None else picks.to(device),
                padding=torch.zeros(padding.shape, device=device).masked_fill(padding.to(device), float("-inf")) if bool(padding.any()) else None,
                from_source=from_source,
                scale=torch.stack([spread(t.scale, c, 1.0) for t, c in zip(self.plan.targets, targets)]),
                cross_sigma=cross_sigma,
                levels=tuple(sorted(set(cross_sigma.flatten().tolist()))),
            )
            self._on_columns[(keys, device)] = cached
        return cached

    def _wrong_batch(self, latents: int) -> P2PError:
        return P2PError(
            CONTROLLER,
            "latent",
            f"the sampler runs {latents} latents per branch, but this edit makes "
            f"{self.images} images (the source and {self.images - 1} target(s)).",
            "plug the controller's LATENT output into the sampler unchanged (no batch or repeat nodes between).",
        )

    def after_cfg(self, denoised: torch.Tensor, sigma: float, x: torch.Tensor | None = None) -> torch.Tensor:
        """Each step's guided prediction: local blend (from its start) and the run's latest result.

        ``x``, the sampler's input, is checked at the first step from pure noise (above the noise
        level of the schedule's first 0.1%): every image starts from one noise only if the sampler
        was given the controller's latent. Later steps are not checked: a stock ancestral sampler
        legitimately draws different noise per image (README, Samplers).
        """
        if denoised.shape[0] != self.images:
            raise self._wrong_batch(denoised.shape[0])
        run = self.maps.current(sigma)
        if x is not None and sigma > self._noise_sigma and not same_rows(x):
            raise P2PError(
                CONTROLLER,
                "latent",
                "the sampler's images do not start from one noise, so the edits would differ from the source everywhere: "
                "its latent is not this controller's latent output (e.g. another Empty Latent Image with a batch size).",
                "connect the P2P Controller's latent output to the sampler's latent_image.",
            )
        if self.plan.blend is not None and sigma <= self._blend_sigma:
            masks = blend_masks(self.plan.blend, run, self.images - 1, tuple(denoised.shape[-2:]), denoised.device)
            denoised = blend(denoised, masks)
            run.blend_mask = masks
        run.final = denoised
        return denoised

    def rows(self, call: AttentionCall, batch: int) -> list[tuple[int, slice]]:
        """(source row, target rows) of every conditional chunk."""
        if batch != len(call.chunks) * self.images:
            raise self._wrong_batch(batch // max(len(call.chunks), 1))
        return [(c * self.images, slice(c * self.images + 1, (c + 1) * self.images)) for c, is_cond in enumerate(call.chunks) if is_cond]

    def key_mask(self, call: AttentionCall, batch: int, keys: int, device: torch.device) -> torch.Tensor | None:
        """The padding columns of each conditional row, as an additive ``[batch, 1, 1, keys]`` mask
        (None where no prompt is padded)."""
        if call.text is None:
            return None
        padding = self.on_columns(call.text.stop - call.text.start, device).padding
        if padding is None:
            return None
        mask = torch.zeros(batch, keys, device=device)
        for source, targets in self.rows(call, batch):
            mask[source : targets.stop, call.text] = padding
        return mask[:, None, None, :]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, attend: Attend) -> torch.Tensor:
        """One attention call, ``q, k, v`` heads-first: returns ``[b, queries, heads * dim]`` as the
        model's attention does.

        Inside the self-attention window the targets' image queries and keys are the source's (the
        source's layout, over the targets' own values: the fused kernel computes it and no image map
        is ever formed). With text keys, the targets take the source's (mapped, reweighted)
        cross-attention maps inside the cross window: the edit is added as a difference to
        ``attend``'s output, so that another pack's attention chained underneath keeps its own
        contribution, and the maps of the conditional branch are recorded. Probabilities are formed a
        block of image queries at a time over the text keys only, so they stay a few MB at any size.
        """
        rows = self.rows(call, q.shape[0])
        laid_out = self._takes_source_layout(call, rows)
        mask = self.key_mask(call, q.shape[0], k.shape[2], q.device)
        on = None if call.text is None or not rows else self.on_columns(call.text.stop - call.text.start, q.device)
        window = None if on is None else on.window(call.sigma)
        editing = window is not None and window.editing
        if editing and call.image_keys is not None:
            out, mass = self._attend_with_mass(q, k, v, call, rows, laid_out, mask, attend)
        elif laid_out:
            q_in, k_in = q.clone(), k.clone()  # the model's own q and k stay as they are
            for source, targets in rows:
                self._copy_source_layout(q_in[targets], k_in[targets], q, k, source, call)
            out, mass = attend(q_in, k_in, v, mask, slice(None)), None
            del q_in, k_in  # freed before the maps are formed
        else:
            out, mass = attend(q, k, v, mask, slice(None)), None
        if on is None:
            return out
        for source, targets in rows:
            images = slice(source, targets.stop)
            v_text = v[targets, :, call.text].float()
            for start in range(call.queries.start, call.queries.stop, QUERY_BLOCK):
                block = slice(start, min(start + QUERY_BLOCK, call.queries.stop))
                queries = q[images, :, block]
                if laid_out:  # the targets' image queries are the source's, as in the attention above
                    queries = queries[:1].expand_as(queries)
                recorded = text_distribution(queries, k[images, :, call.text], on.padding)
                if editing:
                    edited = self._edit_block(recorded, mass, out, v_text, targets, block, on, window)
                    if edited is not None:
                        recorded = torch.cat([recorded[:1], edited])
                # Handed over a block at a time: a recorder sums them where it keeps them, and no map
                # of the whole call is formed.
                per_image = [columns.gather(m) for columns, m in zip(on.images, recorded.mean(dim=1))]
                if self.text_pads_to:  # the model's own padding holds the rest: maps over the prompt's tokens
                    per_image = [m / m.sum(dim=-1, keepdim=True) for m in per_image]
                for recorder in self.recorders:
                    recorder.record(call, slice(block.start - call.queries.start, block.stop - call.queries.start), per_image)
        return out

    def _attend_with_mass(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: AttentionCall,
        rows: list[tuple[int, slice]],
        laid_out: bool,
        mask: torch.Tensor | None,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention while editing: the output and each query's share of the softmax for the
        text, ``[b, h, queries]`` (set on the target rows, the only ones edited).

        The targets' rows are attended apart, on padded copies of their own (``with_mass_channels``,
        with the source's layout inside the self-attention window); the other rows on the model's
        own tensors. Padded copies of the whole batch would be the largest tensors of the call, above
        the peak memory of plain generation. The targets go first, so that their copies never sit
        beside the other rows' output.
        """
        pieces, mass = {}, q.new_zeros(q.shape[:3], dtype=torch.float32)

        def rows_of(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
            return None if x is None else x[part]

        for source, targets in rows:
            q_own, k_own, v_own = (with_mass_channels(x[targets]) for x in (q, k, v))
            if laid_out:
                self._copy_source_layout(q_own, k_own, q, k, source, call)
            mark_text_mass(q_own, v_own, call.text)
            own = attend(q_own, k_own, v_own, rows_of(mask, targets), targets)
            del q_own, k_own, v_own
            pieces[targets.start], mass[targets] = split_mass(own, call.heads)
        done = 0
        for _, targets in rows + [(None, slice(q.shape[0], q.shape[0]))]:
            if done < targets.start:
                part = slice(done, targets.start)
                pieces[done] = attend(q[part], k[part], v[part], rows_of(mask, part), part)
            done = targets.stop
        return torch.cat([pieces[start] for start in sorted(pieces)]), mass

    def _edit_block(
        self,
        dist: torch.Tensor,
        mass: torch.Tensor | None,
        out: torch.Tensor,
        v_text: torch.Tensor,
        targets: slice,
        block: slice,
        on: _OnColumns,
        window: _Window,
    ) -> torch.Tensor | None:
        """Add the edit of one block of queries to ``out``; the targets' maps as edited (None: unchanged).

        ``dist`` ``[images, h, queries, K]`` is each query's distribution over the text keys. The
        targets take the source's (mapped, reweighted) distribution; in joint attention each target
        query keeps its own share ``mass`` of the softmax for the text (so its image keys keep
        theirs); in cross-attention the share is 1.
        """
        if window.from_source is None and window.scale is None:
            return None
        own = dist[1:]
        edited = own if window.from_source is None else map_cross_probs(dist[0], own, on.matrix, window.from_source, on.picks)
        if window.scale is not None:
            edited = edited * window.scale
        change = edited - own
        if mass is not None:
            change = change * mass[targets, :, block, None]
        out[targets, block] += merge_heads(change @ v_text).to(out.dtype)
        return edited

    def _takes_source_layout(self, call: AttentionCall, rows: list[tuple[int, slice]]) -> bool:
        """Whether the targets' image queries and keys are the source's in this call (inside the
        self-attention window, on the layers whose layout is replaced)."""
        takes_layout = call.transformer or call.downscale >= self.plan.self_min_downscale
        return call.image_keys is not None and bool(rows) and takes_layout and call.sigma > self._self_sigma

    @staticmethod
    def _copy_source_layout(q_to: torch.Tensor, k_to: torch.Tensor, q: torch.Tensor, k: torch.Tensor, source: int, call: AttentionCall) -> None:
        """Writes the source row's image queries and keys (of the model's ``q``, ``k``) into every row
        of ``q_to``, ``k_to``: copies of the targets' rows, maybe with more channels."""
        d = q.shape[-1]
        q_to[:, :, call.queries, :d] = q[source, :, call.queries]
        k_to[:, :, call.image_keys, :d] = k[source, :, call.image_keys]
