"""Pytest plugin: collect the repository root as a plain folder.

The root is the ComfyUI pack (it has an ``__init__.py`` that imports ComfyUI); pytest would import
it as a package before the host is booted. The tests load the pack through ComfyUI's own loader.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
