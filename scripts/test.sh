#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on the real ComfyUI host.
# COMFYUI_PATH=/path/to/ComfyUI runs it on another ComfyUI checkout instead of the vendored one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
