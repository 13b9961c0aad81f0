"""P2P edit versus plain generation: time and peak-memory ratios, measured in one run.

    .venv/bin/python benchmarks/bench_p2p.py                    # SD1.5 at 512, SDXL, Flux.1 dev, Flux.2 dev and SD3.5 at 1024
    .venv/bin/python benchmarks/bench_p2p.py --model sd15 --width 320 --steps 20   # full width (GPU)
    .venv/bin/python benchmarks/bench_p2p.py --model flux --width 3072 --steps 20  # Flux.1 dev's full size (GPU)
    .venv/bin/python benchmarks/bench_p2p.py --model sd35 --width 1536 --steps 20  # SD3.5 Medium's full size (GPU)
    .venv/bin/python benchmarks/bench_p2p.py --model flux2 --width 3072 --steps 20 # Flux.2 dev's layout at half width (GPU)

Every side samples the same latent size, steps, sampler and cfg: the plain side a batch of two
images of one prompt (stock nodes only); "p2p" a one-target word swap (source + edit: two images),
with cross_replace_steps 0.8 and self_replace_steps 0.4, as in the paper (it also collects the
attention maps that P2P Attention Maps shows: the controller always does); "p2p+blend" the same
swap with a local blend on the swapped words. The UNets are
ComfyUI's real SD1.5 / SDXL architectures with random weights at the full layout and spatial size;
``--width`` sets model_channels (320 is the real width; the CPU default is narrower so that a run
takes minutes). The DiTs are ComfyUI's Flux.1 dev (guidance-distilled: cfg 1, no unconditional
branch), Flux.2 dev (likewise; 512 text columns, the model's left padding) and SD3.5 Medium (MMDiT-X,
cfg 4.5) at 1024x1024 (a 64x64 token grid after the text); ``--width`` sets the hidden size (Flux.1:
3072 in 24 heads of 128; Flux.2: 6144 in 48; SD3.5 Medium: 1536), and the depth follows it as
MMDiT's own rule does (SD3: ``width / 64`` joint blocks, the first half with MMDiT-X's second
attention; Flux.1: its 19 double and 38 single blocks scaled by ``width / 3072``, Flux.2 its 8 and 48),
so the CPU default is a shallow, narrow model with the real head size, token counts and attention
layout. The text encoder is the tests' tiny one (for the DiTs, the one of tests/tiny_dit_models.py,
whose T5 gives SD3.5's conditioning its real 4096 columns): its width only sizes the key/value
projections of the text, which cost nothing here. Each model runs in two fresh subprocesses: one
times the three modes, one measures their peak memory (runs interleaved, the lowest reported).
Peak memory is the CUDA allocator's peak on a GPU; on a CPU it is the highest resident memory during a
run above the level before it, in a process whose glibc hands freed memory straight back (so that it
follows live tensors; expect a few MiB of noise). Times are never taken in that process: there every
allocation above 64 KiB is a fresh mapping whose pages fault in on first touch, which slows each mode
by its number of allocations, not as a user's ComfyUI runs (it made P2P's time ratio on Flux x1.14
against x1.06 under glibc's defaults).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SOURCE, TARGET = "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"
MODES = ("plain", "p2p", "p2p+blend")
LAYOUTS = {
    # ComfyUI's detected configs of the real models, with model_channels and context set below.
    "sd15": {"kind": "sd15", "size": 512, "unet": {
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "num_heads": 8, "num_head_channels": -1, "adm_in_channels": None}},
    "sdxl": {"kind": "sdxl", "size": 1024, "unet": {
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "num_heads": -1, "num_head_channels": 64, "num_classes": "sequential"}},
    # DiTs: the tiny kind whose text encoder they use, the full width, and the sampling settings.
    "flux": {"kind": "flux_dev", "size": 1024, "full_width": 3072, "cpu_width": 256, "cfg": 1.0, "scheduler": "simple"},
    "sd35": {"kind": "sd35", "size": 1024, "full_width": 1536, "cpu_width": 256, "cfg": 4.5, "scheduler": "sgm_uniform"},
    # Flux.2 dev at full width is 32B parameters (64 GB in float16): a GPU runs it at half width unless told.
    "flux2": {"kind": "flux2", "size": 1024, "full_width": 6144, "gpu_width": 3072, "cpu_width": 256, "cfg": 1.0, "scheduler": "simple"},
}
UNET_CFG, UNET_WIDTHS = 7.5, (64, 320)  # cfg; model_channels on a CPU, on a GPU (the real width)
FLUX_HEAD = 128  # Flux.1's and Flux.2's head size
FLUX_BLOCKS = {"flux": (19, 38), "flux2": (8, 48)}  # double and single blocks at the full width


def dit_config(name: str, width: int) -> object:
    """ComfyUI's model config of the Flux.1 dev, Flux.2 dev or SD3.5 Medium layout at ``width`` (see
    the module docstring), with the tiny text encoders' widths."""
    import comfy.supported_models
    import tiny_dit_models

    detected = tiny_dit_models.DETECTED[LAYOUTS[name]["kind"]]
    if name in FLUX_BLOCKS:
        double, single = (max(1, round(blocks * width / LAYOUTS[name]["full_width"])) for blocks in FLUX_BLOCKS[name])
        unet = dict(detected, hidden_size=width, num_heads=width // FLUX_HEAD, depth=double, depth_single_blocks=single)
        return getattr(comfy.supported_models, tiny_dit_models.REAL_CONFIGS[LAYOUTS[name]["kind"]])(unet)
    depth = width // 64
    embedder = detected["context_embedder_config"]
    unet = dict(detected, depth=depth, x_block_self_attn_layers=list(range(depth // 2 + 1)),
                context_embedder_config=dict(embedder, params=dict(embedder["params"], out_features=width)))
    return comfy.supported_models.SD3(unet)


def unet_config(name: str, width: int) -> object:
    """ComfyUI's model config of the SD1.5 or SDXL UNet at model_channels ``width``."""
    import comfy.supported_models
    import tiny_models

    context = {"sd15": tiny_models.SD15_CONTEXT, "sdxl": tiny_models.SDXL_CONTEXT}[name]
    unet = dict(LAYOUTS[name]["unet"], model_channels=width, context_dim=context, in_channels=4, out_channels=4, image_size=32,
                use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
    if name == "sdxl":
        unet["adm_in_channels"] = tiny_models.SDXL_ADM
    return {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[name](unet)


def run_model(model_name: str, width: int, steps: int, repeats: int, measure: str) -> dict:
    """Build the model once, then for every mode a warm-up run; then ``repeats`` rounds of one run
    per mode measuring ``measure`` ("time" or "memory", its peak), interleaved so that a slow spell
    of the machine hits every mode."""
    import torch

    import comfy_host
    import tiny_dit_models
    import tiny_models

    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="p2p-bench-")), gpu=torch.cuda.is_available())
    layout = LAYOUTS[model_name]
    dit = "unet" not in layout
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    clip_file = host.work_dir / "models" / "checkpoints" / "clip.safetensors"
    if dit:
        tiny_dit_models.register_tiny_dit_architectures()
        path = tiny_dit_models.write_tiny_dit_checkpoint(layout["kind"], clip_file, seed=0)
    else:
        tiny_models.register_tiny_architectures()
        path = tiny_models.write_tiny_checkpoint(layout["kind"], clip_file)
    with torch.inference_mode():
        _, clip, _, _ = host.sd.load_checkpoint_guess_config(str(path), output_vae=False)
    config = dit_config(model_name, width) if dit else unet_config(model_name, width)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config.set_inference_dtype(dtype, None)
    with torch.no_grad():
        base = config.get_model({}, "", device=device)
        # Drawn on the model's device: Flux.1's 12B weights would take minutes on a CPU generator.
        generator = torch.Generator(device=device).manual_seed(0)
        for name, p in base.diffusion_model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            values = (torch.ones(p.shape, device=device) if "norm" in name and name.endswith("weight")
                      else torch.randn(p.shape, generator=generator, device=device) / math.sqrt(fan_in) * (0.02 if p.dim() == 1 else 1))
            p.copy_(values.to(p.dtype))
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))

    nodes = host.nodes
    size = layout["size"]
    edits = host.pack.p2p_attention.edits
    runs = {}
    cfg, scheduler = layout.get("cfg", UNET_CFG), layout.get("scheduler", "normal")
    empty_node = nodes.NODE_CLASS_MAPPINGS["EmptyFlux2LatentImage" if model_name == "flux2" else "EmptySD3LatentImage" if dit else "EmptyLatentImage"]

    def empty(batch: int) -> dict:
        """The stock empty latent (EmptyFlux2LatentImage is a V3 node: execute, not generate)."""
        made = empty_node.execute(size, size, batch) if model_name == "flux2" else empty_node().generate(size, size, batch)
        return made[0]

    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        positive = nodes.CLIPTextEncode().encode(clip, SOURCE)[0]
        runs["plain"] = (model, positive, empty(2))
        swap = edits.add_target(None, SOURCE, TARGET, edits.WORD_SWAP, "P2P Word Swap")
        blend = edits.local_blend(swap, "cat", "dog", "", 0.3, 0.2, None, edits.UNION, "P2P Local Blend")
        for mode, edit in (("p2p", swap), ("p2p+blend", blend)):
            latent = empty(1)
            runs[mode] = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, edit, latent, 0.8, 0.4)

    def sample(mode: str) -> None:
        sampled_model, positive, latent = runs[mode]
        with torch.inference_mode():
            nodes.KSampler().sample(sampled_model, 1, steps, cfg, "euler", scheduler, positive, negative, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()

    comfy.model_management.load_models_gpu([model])
    for mode in MODES:  # warm-up: one-off allocations of a first run (kernels, caches) count for no mode
        sample(mode)

    def peak_bytes(mode: str) -> int:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            sample(mode)
            return torch.cuda.max_memory_allocated() - before
        before = _rss_bytes()
        with _RssPeak() as watch:
            sample(mode)
        return watch.peak - before

    def seconds(mode: str) -> float:
        started = time.perf_counter()
        sample(mode)
        return time.perf_counter() - started

    measured = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            measured[mode].append(peak_bytes(mode) if measure == "memory" else seconds(mode))
    # The lowest of each: the least disturbed by whatever else the machine (or, for resident memory,
    # the allocator) was doing.
    return {mode: min(values) for mode, values in measured.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class _RssPeak:
    """The highest resident memory while the block runs (CPU has no allocator peak counter)."""

    def __enter__(self) -> "_RssPeak":
        self.peak, self._done = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(LAYOUTS), nargs="*", default=sorted(LAYOUTS))
    parser.add_argument("--width", type=int, default=None, help="UNets: model_channels (320 = real; default 64 on CPU, 320 on GPU); "
                        "DiTs: hidden size (Flux.1 3072, SD3.5 Medium 1536 = real and the GPU default; Flux.2 6144 real, "
                        "3072 on a GPU; 256 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="default 2 on CPU, 20 on GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    steps = args.steps or (20 if gpu else 2)

    def width_of(name: str) -> int:
        layout = LAYOUTS[name]
        full, cpu = (layout.get("gpu_width", layout["full_width"]), layout["cpu_width"]) if "full_width" in layout else (UNET_WIDTHS[1], UNET_WIDTHS[0])
        return args.width or (full if gpu else cpu)

    if args.one:
        print(json.dumps(run_model(args.one, width_of(args.one), steps, args.repeats, args.measure)))
        return
    print(f"device: {'cuda' if gpu else 'cpu'}, {steps} euler steps, batch of 2 images, lowest of {args.repeats} runs")
    environments = {
        "time": os.environ,
        # Freed memory goes straight back to the system, so that resident memory follows live tensors.
        "memory": dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"),
    }
    for name in args.model:
        width = width_of(name)
        measured = {}
        for measure, env in environments.items():
            command = [sys.executable, __file__, "--one", name, "--width", str(width), "--steps", str(steps),
                       "--repeats", str(args.repeats), "--measure", measure]
            output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            measured[measure] = json.loads(output.strip().splitlines()[-1])
        seconds, peak = measured["time"], measured["memory"]
        size, layout = LAYOUTS[name]["size"], LAYOUTS[name]
        print(f"{name} {size}x{size}, width {width}, cfg {layout.get('cfg', UNET_CFG)}: plain {seconds['plain']:.2f}s, "
              f"peak {peak['plain'] / 2**20:.0f} MiB")
        for mode in MODES[1:]:
            print(
                f"  {mode:10s} {seconds[mode]:.2f}s, peak {peak[mode] / 2**20:.0f} MiB | "
                f"time x{seconds[mode] / seconds['plain']:.3f}, peak memory x{peak[mode] / peak['plain']:.3f}"
            )


if __name__ == "__main__":
    main()
