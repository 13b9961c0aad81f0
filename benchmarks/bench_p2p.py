"""P2P edit versus plain generation: time and peak-memory ratios, measured in one run.

    .venv/bin/python benchmarks/bench_p2p.py                    # SD1.5 at 512 and SDXL at 1024
    .venv/bin/python benchmarks/bench_p2p.py --model sd15 --width 320 --steps 20   # full width (GPU)

Every side samples the same latent size, steps, sampler and cfg: the plain side a batch of two
images of one prompt (stock nodes only); "p2p" a one-target word swap (source + edit: two images),
with cross_replace_steps 0.8 and self_replace_steps 0.4, as in the paper (it also collects the
attention maps that P2P Attention Maps shows: the controller always does); "p2p+blend" the same
swap with a local blend on the swapped words. The UNets are
ComfyUI's real SD1.5 / SDXL architectures with random weights at the full layout and spatial size;
``--width`` sets model_channels (320 is the real width; the CPU default is narrower so that a run
takes minutes). The text encoder is the tests' tiny one: its width only sizes the cross-attention
key/value projections, which cost nothing here. Each model runs in a fresh subprocess; timed runs
of the three modes are interleaved and the fastest reported. Peak memory is the CUDA allocator's peak
on a GPU; on a CPU it is the highest resident memory during a run above the level before it, with
glibc told to hand freed memory straight back (so it follows live tensors; expect a few MiB of noise).
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
}


def run_model(model_name: str, width: int, steps: int, repeats: int) -> dict:
    """Build the model once, then for every mode: one run for peak memory; then ``repeats`` rounds
    of one timed run per mode, interleaved so that a slow spell of the machine hits every mode."""
    import torch

    import comfy_host
    import tiny_models

    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="p2p-bench-")))
    tiny_models.register_tiny_architectures()
    layout = LAYOUTS[model_name]
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    device = comfy.model_management.get_torch_device()
    path = tiny_models.write_tiny_checkpoint(layout["kind"], host.work_dir / "models" / "checkpoints" / "clip.safetensors")
    with torch.inference_mode():
        _, clip, _, _ = host.sd.load_checkpoint_guess_config(str(path), output_vae=False)
    context = {"sd15": tiny_models.SD15_CONTEXT, "sdxl": tiny_models.SDXL_CONTEXT}[model_name]
    unet = dict(layout["unet"], model_channels=width, context_dim=context, in_channels=4, out_channels=4, image_size=32,
                use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
    if model_name == "sdxl":
        unet["adm_in_channels"] = tiny_models.SDXL_ADM
    config = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[model_name](unet)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config.set_inference_dtype(dtype, None)
    with torch.no_grad():
        base = config.get_model({}, "", device=device)
        generator = torch.Generator().manual_seed(0)
        for name, p in base.diffusion_model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            values = torch.ones(p.shape) if "norm" in name and name.endswith("weight") else torch.randn(p.shape, generator=generator) / math.sqrt(fan_in) * (0.02 if p.dim() == 1 else 1)
            p.copy_(values.to(p.dtype))
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))

    nodes = host.nodes
    size = layout["size"]
    edits = host.pack.p2p_attention.edits
    runs = {}
    with torch.inference_mode():
        negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        positive = nodes.CLIPTextEncode().encode(clip, SOURCE)[0]
        runs["plain"] = (model, positive, nodes.EmptyLatentImage().generate(size, size, 2)[0])
        swap = edits.add_target(None, SOURCE, TARGET, edits.WORD_SWAP, "P2P Word Swap")
        blend = edits.local_blend(swap, "cat", "dog", "", 0.3, 0.2, None, edits.UNION, "P2P Local Blend")
        for mode, edit in (("p2p", swap), ("p2p+blend", blend)):
            latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
            runs[mode] = host.pack.NODE_CLASS_MAPPINGS["P2PController"]().apply(model, clip, edit, latent, 0.8, 0.4)

    def sample(mode: str) -> None:
        sampled_model, positive, latent = runs[mode]
        with torch.inference_mode():
            nodes.KSampler().sample(sampled_model, 1, steps, 7.5, "euler", "normal", positive, negative, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()

    comfy.model_management.load_models_gpu([model])
    results = {mode: {"times": []} for mode in MODES}
    for mode in MODES:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            sample(mode)
            results[mode]["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        else:
            before = _rss_bytes()
            with _RssPeak() as watch:
                sample(mode)
            results[mode]["peak_bytes"] = watch.peak - before
    for _ in range(repeats):
        for mode in MODES:
            started = time.perf_counter()
            sample(mode)
            results[mode]["times"].append(time.perf_counter() - started)
    # The fastest run: the least disturbed by whatever else the machine was doing.
    return {mode: {"seconds": min(r["times"]), "peak_bytes": r["peak_bytes"]} for mode, r in results.items()}


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
    parser.add_argument("--width", type=int, default=None, help="model_channels (320 = real; default 64 on CPU, 320 on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="default 2 on CPU, 20 on GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    width = args.width or (320 if gpu else 64)
    steps = args.steps or (20 if gpu else 2)
    if args.one:
        print(json.dumps(run_model(args.one, width, steps, args.repeats)))
        return
    print(f"device: {'cuda' if gpu else 'cpu'}, model_channels {width}, {steps} euler steps, cfg 7.5, batch of 2 images, fastest of {args.repeats}")
    # Freed memory goes straight back to the system, so that resident memory follows live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for name in args.model:
        command = [sys.executable, __file__, "--one", name, "--width", str(width), "--steps", str(steps), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results = json.loads(output.strip().splitlines()[-1])
        plain = results["plain"]
        size = LAYOUTS[name]["size"]
        print(f"{name} {size}x{size}: plain {plain['seconds']:.2f}s, peak {plain['peak_bytes'] / 2**20:.0f} MiB")
        for mode in MODES[1:]:
            edit = results[mode]
            print(
                f"  {mode:10s} {edit['seconds']:.2f}s, peak {edit['peak_bytes'] / 2**20:.0f} MiB | "
                f"time x{edit['seconds'] / plain['seconds']:.3f}, peak memory x{edit['peak_bytes'] / plain['peak_bytes']:.3f}"
            )


if __name__ == "__main__":
    main()
