"""Make the README's pictures with the tiny world model (tests/data/world_sd15.safetensors).

Run: `.venv/bin/python scripts/make_doc_images.py` (a minute or two on a CPU). Every picture comes
from the pack's real nodes on the real ComfyUI host, with the benchmark's settings
(tests/world_edits.py); each is labelled as the tiny world model's:

- docs/world_edits.png: per edit, the source, the P2P edit and the target prompt generated plainly
  from the same seed (swap, shape swap, refine, reweight, local blend, a rendered picture inverted
  with null-text and edited);
- docs/world_attention_maps.png: P2P Attention Maps of a colour swap (words of both prompts);
- docs/world_blend_mask.png: P2P Local Blend Mask of a local-blend colour swap, beside its images.

With ``--thumbnails`` it writes instead the template thumbnail (workflows/<name>.jpg) of each SD
workflow: that workflow run as scripts/demo.py runs it on the world model, its first Save Image's
pictures side by side. The DiT workflows have no world model: their thumbnails are the graph, drawn
by the page (tests/test_browser.py with ``P2P_WRITE_DOCS=1``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import build_workflows  # noqa: E402 - scripts/ is this script's own folder
import comfy_host  # noqa: E402
import demo  # noqa: E402
import world_edits  # noqa: E402
import world_model  # noqa: E402
import world_scenes  # noqa: E402

DOCS = REPO / "docs"
NOTE = "tiny world model (128 px, trained on coloured shapes by scripts/train_world.py)"
ZOOM = 2  # 128 px pictures shown at 256 px
ROWS = ("colour swap", "shape swap", "background refine", "reweight", "local blend", "real image: null-text")


def labelled(picture: Image.Image, title: str) -> Image.Image:
    out = Image.new("RGB", (picture.width, picture.height + 36), "white")
    out.paste(picture, (0, 36))
    draw = ImageDraw.Draw(out)
    draw.text((6, 4), title, fill="black")
    draw.text((6, 20), NOTE, fill=(90, 90, 90))
    return out


def tile(picture: np.ndarray, caption: str, width: int) -> Image.Image:
    image = Image.fromarray(picture).resize((picture.shape[1] * ZOOM, picture.shape[0] * ZOOM), Image.NEAREST)
    out = Image.new("RGB", (max(width, image.width), image.height + 48), "white")
    out.paste(image, (0, 0))
    # Outlined: a white mask or background would otherwise merge with the page.
    ImageDraw.Draw(out).rectangle((0, 0, image.width - 1, image.height - 1), outline="gray")
    words, line, lines = caption.split(), "", []
    for word in words:  # wrap the prompt under the picture
        if len(line) + len(word) > 42:
            lines.append(line)
            line = ""
        line = f"{line} {word}".strip()
    ImageDraw.Draw(out).multiline_text((2, image.height + 2), "\n".join(lines + [line]), fill="black", spacing=1)
    return out


def first_valid(host, world, case: str, settings: world_edits.Settings) -> world_edits.CaseResult:
    """The first seed whose source shows its objects (the benchmark scores those)."""
    for seed in range(20):
        result = world_edits.run_case(host, world, case, seed, settings)
        if result.valid:
            return result
    raise RuntimeError(f"no valid source for {case} in 20 seeds")


def edits_sheet(results: dict[str, world_edits.CaseResult], settings: world_edits.Settings) -> Image.Image:
    rows = []
    for case, result in results.items():
        source, target = world_edits.prompt(result.edit.source, settings), world_edits.prompt(result.edit.target, settings)
        first = "real picture (rendered)" if case.startswith("real image") else f"source: {source}"
        tiles = [tile(world_scenes.render(result.edit.source)[0] if case.startswith("real image") else result.images["source"], first, 270),
                 tile(result.images["p2p"], f"P2P {case}: {target}", 270),
                 tile(result.images["plain"], f"plain, same seed: {target}", 270)]
        row = Image.new("RGB", (sum(t.width for t in tiles) + 10 * len(tiles), max(t.height for t in tiles)), "white")
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width + 10
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)), "white")
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + 8
    return labelled(sheet, "source | Prompt-to-Prompt edit | plain generation of the target prompt, same seed")


def sd_workflows() -> list[Path]:
    """The shipped workflows that load the SD1.5 checkpoint, which the world model stands for."""
    return [path for path in sorted(demo.WORKFLOWS.glob("*.json"))
            if any(n["type"] == "CheckpointLoaderSimple" and n["widgets_values"][0] == build_workflows.CHECKPOINT
                   for n in json.loads(path.read_text())["nodes"])]


def thumbnail(pictures: list[Image.Image], label: str) -> Image.Image:
    """``pictures`` side by side under a one-line ``label``, on a thumbnail-sized white card."""
    width, height = comfy_host.THUMBNAIL_SIZE
    gap, top = 8, 36
    side = min((width - gap * (len(pictures) + 1)) // len(pictures), height - top - gap)
    card = Image.new("RGB", (width, height), "white")
    x = (width - side * len(pictures) - gap * (len(pictures) - 1)) // 2
    for picture in pictures:  # the world model's 128 px pictures, enlarged without blurring
        card.paste(picture.convert("RGB").resize((side, side), Image.NEAREST), (x, top + (height - top - side) // 2))
        x += side + gap
    ImageDraw.Draw(card).text((gap, 8), label, fill="black", font=ImageFont.load_default(20))  # readable when the browser shrinks it
    return card


def write_thumbnails(host: comfy_host.Host) -> None:
    """Each SD workflow's thumbnail: its source and edits, from a real run on the world model."""
    world_model.register_world_architecture()
    checkpoint = world_model.install_world_checkpoint(host.work_dir / "models" / "checkpoints")
    for path in sd_workflows():
        outputs = demo.run_workflow(host, path.name, checkpoint, world=True)
        first = outputs[min(outputs, key=int)]  # the lowest id: the Save Image of the source and edits (masks, maps: later ids)
        label = "tiny world model: " + " | ".join(["source"] + ["edit"] * (len(first) - 1))
        thumbnail([Image.open(p) for p in first], label).save(path.with_suffix(".jpg"), quality=88)
        print("wrote", path.with_suffix(".jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thumbnails", action="store_true", help="write the SD workflows' template thumbnails instead")
    if parser.parse_args().thumbnails:
        with tempfile.TemporaryDirectory(prefix="p2p-thumbnails-") as work:
            write_thumbnails(comfy_host.boot(Path(work)))
        return
    settings = world_edits.Settings()
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="p2p-docs-") as work:
        host = comfy_host.boot(Path(work))
        world = world_edits.load_world(host)
        nodes = host.pack.NODE_CLASS_MAPPINGS
        edits_sheet({case: first_valid(host, world, case, settings) for case in ROWS}, settings).save(DOCS / "world_edits.png")
        print("wrote", DOCS / "world_edits.png")

        with torch.inference_mode():
            swap = world_edits.make_edit("colour swap", 0)
            (images, patched, samples) = world_edits.p2p_generate(host, world, world_edits.edit_nodes(host, swap, settings), 0, settings)
            decoded = torch.from_numpy(np.stack(images)).float() / 255.0
            words = f"{swap.source.objects[0].colour}, {swap.target.objects[0].colour}, {swap.source.objects[0].shape}, {swap.source.background}"
            maps = nodes["P2PAttentionMaps"]().render(patched, {"samples": samples["samples"]}, words, "1/2", decoded)[0]
        labelled(Image.fromarray((torch.cat(list(maps), dim=0).clamp(0, 1) * 255).byte().numpy()),
                 f"P2P Attention Maps (1/2 resolution: 8x8), words: {words}").save(DOCS / "world_attention_maps.png")
        print("wrote", DOCS / "world_attention_maps.png")

        with torch.inference_mode():
            blend = world_edits.make_edit("local blend", 1)
            (images, patched, samples) = world_edits.p2p_generate(host, world, world_edits.edit_nodes(host, blend, settings), 1, settings)
            mask = nodes["P2PBlendMask"]().mask(patched, {"samples": samples["samples"]})[1][0]
        mask_picture = (mask.clamp(0, 1) * 255).byte().numpy()
        tiles = [tile(images[0], "source", 260), tile(images[1], "local blend edit", 260), tile(mask_picture, "blend mask (white: may change)", 260)]
        sheet = Image.new("RGB", (sum(t.width + 10 for t in tiles), tiles[0].height), "white")
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * (t.width + 10), 0))
        labelled(sheet, f"P2P Local Blend Mask: {world_edits.prompt(blend.source, settings)} -> {blend.target.objects[0].colour}").save(DOCS / "world_blend_mask.png")
        print("wrote", DOCS / "world_blend_mask.png")


if __name__ == "__main__":
    main()
