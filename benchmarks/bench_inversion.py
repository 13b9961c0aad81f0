"""P2P DDIM Invert: time of each method relative to one plain sampling pass of the same steps.

    .venv/bin/python benchmarks/bench_inversion.py                          # tiny SD1.5, CPU-sized
    .venv/bin/python benchmarks/bench_inversion.py --kind flux_dev          # tiny Flux.1 dev (v0.3.75)
    .venv/bin/python benchmarks/bench_inversion.py --size 512 --steps 50    # GPU-sized

"plain" is one stock KSamplerAdvanced pass (batch 1, ddim) of the same steps at the model's usual
guidance (SD: cfg 7.5, ddim_uniform; Flux.1 dev: cfg 1 with FluxGuidance 3.5, simple; SD3.5: cfg 4.5,
simple); each method is the P2P DDIM Invert node's own run, every method the model allows (fireflow
on flow models, null-text where there is a negative branch). "reference-style" is the null-text reference
implementation's loop on the same UNet: per step one conditional forward, then per iteration a full
forward and backward of the unconditional branch with the UNet's weights requiring gradients (the
reference never turns them off), and a guided forward at batch 2 for the next latent; the DDIM pivot
before it is the same as ours. Null-text runs its full iteration budget in both (early stop off), so
the ratio compares equal work. Times are medians of ``--repeats`` runs in one process.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def vp_scale(sigma: float) -> float:
    """The reference's loss is on DDPM's latents: ``x / sqrt(1 + sigma^2)`` in ComfyUI's (SD1.5) terms."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


# kind -> (scheduler, cfg, the methods to time); null-text needs cfg > 1, fireflow a flow model.
SETTINGS = {
    "sd15": ("ddim_uniform", 7.5, ("ddim", "direct", "null-text")),
    "sd2v": ("ddim_uniform", 7.5, ("ddim", "direct", "null-text")),
    "sdxl": ("ddim_uniform", 7.5, ("ddim", "direct", "null-text")),
    "flux_dev": ("simple", 1.0, ("ddim", "direct", "fireflow")),
    "sd35": ("simple", 4.5, ("ddim", "direct", "fireflow", "null-text")),
}
UNETS = ("sd15", "sd2v", "sdxl")  # the reference-style loop calls a UNet with a context only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="sd15", choices=tuple(SETTINGS))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import comfy_host
    import tiny_dit_models
    import tiny_models

    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="p2p-bench-inv-")))
    checkpoints = host.work_dir / "models" / "checkpoints"
    if args.kind in UNETS:
        tiny_models.register_tiny_architectures()
        name = tiny_models.tiny_checkpoint_name(args.kind)
        tiny_models.write_tiny_checkpoint(args.kind, checkpoints / name)
    else:
        tiny_dit_models.register_tiny_dit_architectures()
        name = tiny_dit_models.tiny_dit_checkpoint_name(args.kind)
        tiny_dit_models.write_tiny_dit_checkpoint(args.kind, checkpoints / name)
    nodes = host.nodes
    scheduler, cfg, methods = SETTINGS[args.kind]
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat riding a bicycle")[0]
        if args.kind == "flux_dev":
            positive = nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(positive, 3.5)[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        image = torch.rand(1, args.size, args.size, 3)
        latent = nodes.VAEEncode().encode(vae, image)[0]
    invert = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]()
    steps, iterations = args.steps, args.iterations

    def plain() -> None:
        nodes.KSamplerAdvanced().sample(model, "disable", 0, steps, cfg, "ddim", scheduler, positive, negative, latent, 0, 10000, "disable")

    def method(name: str):
        return lambda: invert.invert(model, positive, negative, latent, steps, cfg, scheduler, name, iterations, 0.0)

    inversion = host.pack.p2p_attention.inversion
    base = model.model
    sigmas = host.pack.nodes.host.schedule(model, scheduler, steps)

    def reference() -> None:
        """The reference's loop on this UNet (ComfyUI's apply_model, weights requiring gradients)."""
        with torch.inference_mode(False):
            x0 = base.process_latent_in(latent["samples"].clone())
            cond, uncond = positive[0][0].clone(), negative[0][0].clone()
            module = _Apply(base)
            weights = {k: p.detach().clone().requires_grad_(True) for k, p in module.named_parameters()}

            def unet(x, sigma, context):
                t = x.new_full((x.shape[0],), sigma)
                return torch.func.functional_call(module, weights, (x, t), {"c_crossattn": context})

            with torch.no_grad():
                path = inversion.ddim_inversion(x0, sigmas, lambda x, s: unet(x, s, cond), vp_scale)
            x = path[0]
            for i in range(steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                with torch.no_grad():
                    c = unet(x, s, cond)
                u = uncond.clone().requires_grad_(True)
                optimiser = torch.optim.Adam([u], lr=inversion.null_text_lr(i, steps))
                with torch.autograd.graph.allow_mutation_on_saved_tensors():
                    for _ in range(iterations):
                        d_u = unet(x, s, u)
                        landed = inversion.euler_step(x, d_u + cfg * (c - d_u), s, s_next)
                        scale = vp_scale(s_next)
                        loss = torch.nn.functional.mse_loss(landed * scale, path[i + 1] * scale)
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
                with torch.no_grad():  # the reference's guided step: a batch of 2
                    both = unet(torch.cat([x, x]), s, torch.cat([u.detach(), cond]))
                    x = inversion.euler_step(x, both[:1] + cfg * (both[1:] - both[:1]), s, s_next)

    class _Apply(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.base = inner

        def forward(self, *a, **k):
            return self.base.apply_model(*a, **k)

    def timed(fn) -> float:
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    print(f"$ {' '.join(['.venv/bin/python', 'benchmarks/bench_inversion.py'] + sys.argv[1:])}")
    print(f"{args.kind} tiny model, {args.size}x{args.size} px, {steps} steps, {scheduler}, cfg {cfg}, "
          f"{iterations} null-text iterations, device {host.model_management.get_torch_device()}")
    with torch.inference_mode():
        base_time = timed(plain)
        rows = {"plain sampling pass": base_time}
        for name in methods:
            rows[f"invert: {name}"] = timed(method(name))
    if args.kind in UNETS:
        rows["reference-style null-text"] = timed(reference)
    for label, seconds in rows.items():
        print(f"{label:28s} {seconds:8.3f} s  {seconds / base_time:6.2f}x plain")
    if "reference-style null-text" in rows:
        print(f"null-text / reference-style: {rows['invert: null-text'] / rows['reference-style null-text']:.2f}")


if __name__ == "__main__":
    main()
