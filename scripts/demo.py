"""The main job: run a shipped Prompt-to-Prompt workflow through ComfyUI's real executor.

    bash scripts/demo.sh                                   # tiny random-weight model: noise images
    bash scripts/demo.sh --checkpoint ~/models/sd15.safetensors --workflow p2p_refine.json

Writes the source and edited images to out/ and prints their paths.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_host  # noqa: E402
import tiny_models  # noqa: E402
import workflow_api  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default="p2p_word_swap.json", help="a file in workflows/")
    parser.add_argument("--checkpoint", type=Path, help="a real SD1.x/SD2.x/SDXL checkpoint (default: tiny random model)")
    parser.add_argument("--out", type=Path, default=REPO / "out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="p2p-demo-"))
    host = comfy_host.boot(work)
    checkpoints = work / "models" / "checkpoints"
    if args.checkpoint:
        name = args.checkpoint.name
        (checkpoints / name).symlink_to(args.checkpoint.resolve())
    else:
        tiny_models.register_tiny_architectures()
        name = tiny_models.tiny_checkpoint_name("sd15")
        tiny_models.write_tiny_checkpoint("sd15", checkpoints / name)
        print("No --checkpoint given: using a tiny random-weight SD1.5-architecture model (images are noise).")

    prompt = workflow_api.to_api(json.loads((REPO / "workflows" / args.workflow).read_text()), host.nodes.NODE_CLASS_MAPPINGS)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = name
    started = time.perf_counter()
    result = host.execute(prompt)
    args.out.mkdir(parents=True, exist_ok=True)
    for ui in result["ui"].values():
        for image in (ui or {}).get("images", []):
            source = Path(host.folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"]
            shutil.copy(source, args.out / image["filename"])
            print(args.out / image["filename"])
    print(f"{args.workflow}: done in {time.perf_counter() - started:.1f}s (first image: source; then the edits)")


if __name__ == "__main__":
    main()
