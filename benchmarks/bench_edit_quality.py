"""Edit quality of Prompt-to-Prompt on the tiny world model, against plain regeneration.

    .venv/bin/python benchmarks/bench_edit_quality.py              # every case, 50 seeds each
    .venv/bin/python benchmarks/bench_edit_quality.py --sweep      # the figures behind the defaults
    .venv/bin/python benchmarks/bench_edit_quality.py --caption-following 200   # does the model follow its captions
    .venv/bin/python benchmarks/bench_edit_quality.py --places     # edit prompts that name the objects' places
    .venv/bin/python benchmarks/bench_edit_quality.py --shape-words --checkpoint w.safetensors   # does it draw shapes from their words

Every run goes through the pack's real nodes and the stock ones (CheckpointLoaderSimple, KSampler,
KSamplerAdvanced, VAE Encode / Decode) on the real ComfyUI host; scenes, edits and scores are in
tests/world_edits.py and tests/world_scenes.py. Per case: structure (IoU of the edited object's
mask with the source's), edit success (the asked colour / shape / background is there), background
PSNR (outside the edited object) and, for inverted pictures, the reconstruction's PSNR. The last
line gives the means over every scored case and seed.

``--sweep`` runs the settings the defaults were chosen from (cross / self replace windows, the
self-attention resolutions, the local blend threshold), each on the cases it acts on.
``--caption-following N`` scores N plain generations of random captions: how often the named
colours, shapes, places, background colours and patterns are there. ``--shape-words`` measures
whether the denoiser reads an object's shape from its word (``world_edits.shape_word_use``): its
error inside single circles and squares with the shape word right and swapped. ``--places`` / ``--no-places``
name the objects' places in the edit prompts or leave them out (by default the SD1.x world's prompts
leave them to the seed, as a user's prompt does; the Flux world's, trained on captions with places
only, name them).
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_host  # noqa: E402
import world_edits  # noqa: E402
import world_model  # noqa: E402

METRICS = ("structure_iou", "edit_success", "background_psnr", "reconstruction_psnr")


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


_WORKER: dict = {}


def start_worker(threads: int, family: str, checkpoint: Path | None) -> None:
    """A worker process: its own ComfyUI host (booted in a folder removed at exit) and world model."""
    torch.set_num_threads(threads)
    work = tempfile.mkdtemp(prefix="p2p-bench-")
    atexit.register(shutil.rmtree, work, True)
    host = comfy_host.boot(Path(work))
    _WORKER.update(host=host, world=world_edits.load_world(host, family, checkpoint))


def run_one(job: tuple) -> world_edits.CaseResult:
    case, seed, settings, baseline = job
    result = world_edits.run_case(_WORKER["host"], _WORKER["world"], case, seed, settings, baseline)
    result.images = {}  # only the scores travel back
    return result


def follow_one(job: tuple) -> tuple[int, dict[str, float]]:
    seed, settings = job
    return world_edits.follow_caption(_WORKER["host"], _WORKER["world"], seed, settings)


def caption_following(pool: ProcessPoolExecutor, seeds: range, settings: world_edits.Settings) -> None:
    """How often plain generations show what their captions name, by the number of objects."""
    results = list(pool.map(follow_one, [(seed, settings) for seed in seeds]))
    keys = list(results[0][1])
    print(f"caption following over {len(results)} random captions (plain generation, one seed each)")
    print(f"{'objects':>8} {'n':>4}  " + "  ".join(f"{k:>10}" for k in keys))
    for count in (1, 2, 3, None):
        chosen = [r for n, r in results if count is None or n == count]
        label = "all" if count is None else str(count)
        print(f"{label:>8} {len(chosen):>4}  " + "  ".join(f"{np.mean([r[k] for r in chosen]):>10.2f}" for k in keys))


def shape_words() -> None:
    """``world_edits.shape_word_use`` in this (the only) worker, one row per noise level."""
    print("the denoiser's error inside 48 single circles and squares, the shape word right / circle and square swapped")
    for sigma, right, wrong in world_edits.shape_word_use(_WORKER["host"], _WORKER["world"]):
        print(f"  sigma {sigma:5.2f}: {right:.3f} / {wrong:.3f}  (x{wrong / right:.2f})")


def run(pool: ProcessPoolExecutor, case: str, seeds: range, settings: world_edits.Settings, baseline: bool = True) -> dict:
    """Per arm ("p2p", "plain"): each metric's values over the seeds whose source is valid."""
    started = time.perf_counter()
    results = list(pool.map(run_one, [(case, seed, settings, baseline) for seed in seeds]))
    valid = [r for r in results if r.valid]
    print(f"  {case}: {len(results)} seeds in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    arms = ("p2p", "plain") if baseline else ("p2p",)
    return {
        "valid": len(valid),
        "seeds": len(results),
        **{arm: {m: [getattr(getattr(r, arm), m) for r in valid] for m in METRICS} for arm in arms},
    }


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_header() -> None:
    print(f"{'case':<24} {'valid':>6}  {'structure_iou':>15}  {'edit_success':>15}  {'background_psnr':>17}  {'recon_psnr':>10}")
    print(f"{'':<24} {'':>6}  {'p2p':>7} {'plain':>7}  {'p2p':>7} {'plain':>7}  {'p2p':>8} {'plain':>8}  {'p2p':>10}")


def print_row(case: str, row: dict) -> None:
    p, q = row["p2p"], row["plain"]
    print(f"{case:<24} {row['valid']:>3}/{row['seeds']:<2}  {fmt(mean(p['structure_iou'])):>7} {fmt(mean(q['structure_iou'])):>7}  "
          f"{fmt(mean(p['edit_success'])):>7} {fmt(mean(q['edit_success'])):>7}  "
          f"{fmt(mean(p['background_psnr']), 1):>8} {fmt(mean(q['background_psnr']), 1):>8}  {fmt(mean(p['reconstruction_psnr']), 1):>10}", flush=True)


def overall(rows: dict[str, dict], arm: str, metric: str) -> float:
    return mean([v for row in rows.values() for v in row[arm][metric]])


def sweep(pool: ProcessPoolExecutor, seeds: range, base: world_edits.Settings) -> None:
    """The settings behind the defaults, each on the cases it acts on (P2P only), per case and their mean."""
    edits = ("colour swap", "shape swap", "background refine", "reweight", "local blend")
    swaps = ("colour swap", "shape swap")
    plans = [
        ("cross_replace_steps", [0.2, 0.4, 0.6, 0.8, 1.0], edits),
        ("self_replace_steps", [0.0, 0.2, 0.4, 0.6], swaps),
        ("self_replace_resolution", ["1/4 and coarser", "1/2 and coarser"], swaps),
        ("threshold", [0.2, 0.3, 0.4, 0.5], ("local blend",)),
    ]
    for name, values, cases in plans:
        print(f"\nsweep {name} ({len(seeds)} seeds per case; P2P)")
        print(f"{name:>24}  {'case':<18}  {'structure_iou':>13}  {'edit_success':>12}  {'background_psnr':>15}")
        for value in values:
            rows = {case: run(pool, case, seeds, replace(base, **{name: value}), baseline=False) for case in cases}
            if len(cases) > 1:
                rows["mean"] = {"p2p": {m: [v for row in rows.values() for v in row["p2p"][m]] for m in METRICS}}
            for i, (case, row) in enumerate(rows.items()):
                scores = row["p2p"]
                print(f"{str(value) if i == 0 else '':>24}  {case:<18}  {fmt(mean(scores['structure_iou'])):>13}  "
                      f"{fmt(mean(scores['edit_success'])):>12}  {fmt(mean(scores['background_psnr']), 1):>15}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50, help="seeds per case (the benchmark: at least 50)")
    parser.add_argument("--cases", default=",".join(world_edits.CASES), help="comma-separated cases")
    parser.add_argument("--sweep", action="store_true", help="run the default-selection sweeps instead")
    parser.add_argument("--caption-following", type=int, metavar="N", help="score N plain generations of random captions instead")
    parser.add_argument("--shape-words", action="store_true", help="measure whether the denoiser draws shapes from their words instead (SD1.x)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, each with its own ComfyUI host")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker: the tiny model's ops are too small to share")
    parser.add_argument("--family", default="sd15", choices=sorted(world_model.FAMILIES), help="the world model's family")
    parser.add_argument("--checkpoint", type=Path, help="a world checkpoint of that family (default: the committed one)")
    parser.add_argument("--places", action=argparse.BooleanOptionalAction,
                        help="whether the edit prompts name the objects' places (default: the family's, world_edits.FAMILY_SETTINGS)")
    args = parser.parse_args()

    settings = world_edits.FAMILY_SETTINGS[args.family]
    if args.places is not None:
        settings = replace(settings, places=args.places)
    seeds = range(args.seeds)
    if args.shape_words:
        if args.family != "sd15":
            parser.error("--shape-words measures SD1.x world models (--family sd15)")
        start_worker(args.threads, args.family, args.checkpoint)
        shape_words()
        return
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=start_worker, initargs=(args.threads, args.family, args.checkpoint)) as pool:
        print(f"tiny world model ({args.family}), {settings.steps} {settings.sampler} steps ({settings.scheduler}), cfg {settings.cfg}, "
              f"cross {settings.cross_replace_steps}, self {settings.self_replace_steps} ({settings.self_replace_resolution}), "
              f"blend threshold {settings.threshold}, {args.seeds} seeds per case, {'' if settings.places else 'no '}places in the edit prompts")
        started = time.perf_counter()
        if args.caption_following:
            caption_following(pool, range(args.caption_following), settings)
            return
        if args.sweep:
            sweep(pool, seeds, settings)
            print(f"\nsweeps took {time.perf_counter() - started:.0f} s")
            return
        print_header()
        rows = {}
        for case in args.cases.split(","):  # each row as soon as its case is done
            rows[case] = run(pool, case, seeds, settings)
            print_row(case, rows[case])
    print(f"({time.perf_counter() - started:.0f} s, {args.jobs} worker processes; 'valid': seeds whose source shows its objects, the ones scored)")
    print(f"edit quality: structure_iou p2p={overall(rows, 'p2p', 'structure_iou'):.2f} plain={overall(rows, 'plain', 'structure_iou'):.2f}; "
          f"edit_success p2p={overall(rows, 'p2p', 'edit_success'):.2f} plain={overall(rows, 'plain', 'edit_success'):.2f}; "
          f"background_psnr p2p={overall(rows, 'p2p', 'background_psnr'):.2f} plain={overall(rows, 'plain', 'background_psnr'):.2f}")


if __name__ == "__main__":
    main()
