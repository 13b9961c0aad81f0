"""Make the README's attention-map and blend-mask pictures with the tests' tiny model.

Run: `.venv/bin/python scripts/make_doc_images.py` (about a minute on a CPU). The tiny model has
random weights, so on its own its maps are noise; here its attention is steered (as in the tests) so
that "cat" and "dog" take the top-left quarter of every map, which shows what the nodes draw. The
pictures are labelled as such; real checkpoints give real maps.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_host  # noqa: E402
import p2p_helpers  # noqa: E402
import tiny_models  # noqa: E402

SOURCE, TARGET = "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"
NOTE = "tiny random-weight test model, attention steered to the top-left quarter: illustrates the node output only"


def save(image: torch.Tensor, path: Path) -> None:
    pixels = (image.clamp(0, 1) * 255).round().byte().numpy()
    picture = Image.fromarray(pixels)
    labelled = Image.new("RGB", (picture.width, picture.height + 20), "white")
    labelled.paste(picture, (0, 20))
    ImageDraw.Draw(labelled).text((4, 4), NOTE, fill="black")
    labelled.save(path)
    print("wrote", path)


def main() -> None:
    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="p2p-docs-")))
    tiny_models.register_tiny_architectures()
    checkpoint = tiny_models.write_tiny_checkpoint("sd15", host.work_dir / "models" / "checkpoints" / "tiny.safetensors")
    nodes = host.pack.NODE_CLASS_MAPPINGS
    with torch.inference_mode():
        model, clip, _, _ = host.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)
    model = p2p_helpers.steer_attention(host, model, column=5)  # "cat" / "dog": a photo of a cat
    edits = host.pack.p2p_attention.edits
    edit = edits.add_target(None, SOURCE, TARGET, edits.WORD_SWAP, "P2P Word Swap")
    edit = edits.local_blend(edit, "cat", "dog", "", 0.3, 0.2, None, edits.UNION, "P2P Local Blend")
    patched, positive, latent = p2p_helpers.p2p(host, model, clip, edit, size=512)
    samples = p2p_helpers.sample(host, patched, clip, positive, latent, steps=10)
    with torch.inference_mode():
        maps = nodes["P2PAttentionMaps"]().render(patched, {"samples": samples}, "cat, dog, riding, bicycle", "1/4")[0]
        _, mask_image = nodes["P2PBlendMask"]().mask(patched, {"samples": samples})
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    save(torch.cat(list(maps), dim=0), docs / "attention_maps_tiny.png")
    save(mask_image[0], docs / "blend_mask_tiny.png")


if __name__ == "__main__":
    main()
