"""The demo (scripts/demo.py, the README's first command) as a user runs it: a separate process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from comfy_host import REPO_ROOT

DEMO = REPO_ROOT / "scripts" / "demo.py"


def run_demo(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp)}  # the demo's temporary folder lands here, to be checked
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, env=env, timeout=600)


def test_a_missing_or_corrupt_checkpoint_ends_in_one_line(tmp_path):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"not a checkpoint")
    for checkpoint, reason in ((tmp_path / "missing.safetensors", "no such file"), (corrupt, "cannot be read")):
        result = run_demo("--checkpoint", str(checkpoint), tmp=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(f"demo: --checkpoint {checkpoint}: {reason}")


def test_the_demo_edits_on_the_world_model_and_leaves_no_temporary_folder(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    result = run_demo("--out", str(out), tmp=scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(out.glob("*.png"))
    assert len(images) == 2 and all(Image.open(i).size == (128, 128) for i in images)  # the source and its edit
    assert list(scratch.iterdir()) == []
