#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: a Prompt-to-Prompt word swap through ComfyUI's real
# executor, images written to out/. Without --checkpoint it uses the tiny world model (tests/data,
# trained on pictures of coloured shapes: a real edit); pass --checkpoint model.safetensors for real ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
