"""P2P DDIM Invert: time of each method relative to one plain sampling pass of the same steps.

    .venv/bin/python benchmarks/bench_inversion.py                          # tiny SD1.5, CPU-sized
    .venv/bin/python benchmarks/bench_inversion.py --size 512 --steps 50    # GPU-sized

"plain" is one stock KSamplerAdvanced pass (batch 1, cfg 7.5, ddim) of the same steps; each
method is the P2P DDIM Invert node's own run. "reference-style" is the null-text reference
implementation's loop on the same UNet: per step one conditional forward, then per iteration a full
forward and backward of the unconditional branch with the UNet's weights requiring gradients (the
reference never turns them off), and a guided forward at batch 2 for the next latent; the DDIM pivot
before it is the same as ours. Null-text runs its full iteration budget in both (early stop off), so
the ratio compares equal work. Times are medians of ``--repeats`` runs in one process.
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="sd15", choices=("sd15", "sd2v", "sdxl"))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import comfy_host
    import tiny_models

    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="p2p-bench-inv-")))
    tiny_models.register_tiny_architectures()
    name = tiny_models.tiny_checkpoint_name(args.kind)
    tiny_models.write_tiny_checkpoint(args.kind, host.work_dir / "models" / "checkpoints" / name)
    nodes = host.nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat riding a bicycle")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        image = torch.rand(1, args.size, args.size, 3)
        latent = nodes.VAEEncode().encode(vae, image)[0]
    invert = host.pack.NODE_CLASS_MAPPINGS["P2PDDIMInvert"]()
    steps, cfg, iterations = args.steps, 7.5, args.iterations

    def plain() -> None:
        nodes.KSamplerAdvanced().sample(model, "disable", 0, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, 0, 10000, "disable")

    def method(name: str):
        return lambda: invert.invert(model, positive, negative, latent, steps, cfg, "ddim_uniform", name, iterations, 0.0)

    inversion = host.pack.p2p_attention.inversion
    base = model.model
    sigmas = host.pack.nodes.host.schedule(model, "ddim_uniform", steps)

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
    print(f"{args.kind} tiny UNet, {args.size}x{args.size} px, {steps} steps, cfg {cfg}, {iterations} null-text iterations, "
          f"device {host.model_management.get_torch_device()}")
    with torch.inference_mode():
        base_time = timed(plain)
        rows = [("plain sampling pass", base_time)]
        for name in ("ddim", "direct", "null-text"):
            rows.append((f"invert: {name}", timed(method(name))))
    rows.append(("reference-style null-text", timed(reference)))
    for label, seconds in rows:
        print(f"{label:28s} {seconds:8.3f} s  {seconds / base_time:6.2f}x plain")
    null_text, ref = rows[3][1], rows[4][1]
    print(f"null-text / reference-style: {null_text / ref:.2f}")


if __name__ == "__main__":
    main()
