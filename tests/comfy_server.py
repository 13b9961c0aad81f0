"""The real ComfyUI server (``main.py``) in a subprocess, and its page in headless Chromium.

The server is the same checkout the in-process tests run (a host in .hosts/, or ``COMFYUI_PATH``), started on 127.0.0.1 with the CPU, this pack in its custom_nodes, and the tests'
tiny SD1.5 checkpoint under the file name the shipped workflows use (``link_checkpoints`` adds others,
e.g. the tiny DiT checkpoints under the real names of Flux, SD3.5, Qwen-Image and Chroma files). A
second, test-only custom node folder registers the tiny architectures in the server process (never
shipped with the pack).

The page is driven with Selenium through Debian's ``chromium`` and ``chromium-driver`` (installed
by scripts/setup.sh): no browser is downloaded. Everything the helpers read or do in the page goes
through the frontend's own objects (``app.graph``, ``LiteGraph``) and elements (its file input,
its queue button), which both the 2024 frontend and the current one (comfyui-frontend-package) have.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_host import PACK_FOLDER, REPO_ROOT

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the file name every shipped workflow loads
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
START_TIMEOUT_S = 180.0
# Current frontend settings, preset so the page opens straight on the canvas: no first-run template
# dialog, no minimap over the graph, node text drawn at any zoom (for screenshots).
CURRENT_FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0,
}
REGISTER_TINY_MODELS = '''"""Test-only: lets this ComfyUI server load the tests' tiny checkpoints."""
import sys

sys.path.insert(0, {tests!r})
import tiny_dit_models  # noqa: E402
import tiny_models  # noqa: E402

tiny_models.register_tiny_architectures()
if tiny_dit_models.unsupported_reason() is None:  # the DiT architectures exist in v0.3.75, not in 2024
    tiny_dit_models.register_tiny_dit_architectures()
NODE_CLASS_MAPPINGS = {{}}
'''


class ServerError(RuntimeError):
    """The server did not start or answer; the message ends with its log."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    process: subprocess.Popen
    work_dir: Path
    log: Path

    @property
    def input_dir(self) -> Path:
        return self.work_dir / "input"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def status(self, path: str) -> int:
        """The HTTP status of a GET (errors included)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def queue_prompt(self, prompt: dict) -> str:
        """POST an API-format prompt to /prompt, as the page's queue button does; returns its id."""
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["prompt_id"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def link_checkpoints(work_dir: Path, links: dict[str, Path]) -> None:
    """Show each file under a checkpoint name (name -> file) in the server's checkpoints folder, e.g.
    the tiny DiT checkpoints under the real names shipped workflows load. The server lists the folder
    again when it changes, so links made while it runs show up too."""
    for name, target in links.items():
        link = work_dir / "models" / "checkpoints" / name
        if not (link.is_symlink() and link.resolve() == Path(target).resolve()):
            link.symlink_to(target)


def start_server(comfy_path: Path, work_dir: Path, checkpoint: Path, current: bool) -> ComfyServer:
    """Start ``comfy_path``/main.py with this pack and ``checkpoint``; returns once it answers."""
    custom_nodes = work_dir / "custom_nodes"
    checkpoints = work_dir / "models" / "checkpoints"
    run_dir = work_dir / "run"
    for folder in (custom_nodes, checkpoints, run_dir, work_dir / "input", work_dir / "output", work_dir / "temp", work_dir / "user" / "default"):
        folder.mkdir(parents=True, exist_ok=True)
    (custom_nodes / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    registration = custom_nodes / "p2p_test_tiny_models"
    registration.mkdir()
    (registration / "__init__.py").write_text(REGISTER_TINY_MODELS.format(tests=str(REPO_ROOT / "tests")))
    link_checkpoints(work_dir, {CHECKPOINT: checkpoint})
    config = work_dir / "extra_model_paths.yaml"
    config.write_text(f"p2p_tests:\n  custom_nodes: {custom_nodes}\n  checkpoints: {checkpoints}\n")

    port = _free_port()
    command = [
        sys.executable, str(comfy_path / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(config), "--disable-auto-launch",
        # PyTorch's fused attention, as the in-process host uses: the CPU default is much slower.
        "--use-pytorch-cross-attention",
        "--input-directory", str(work_dir / "input"), "--output-directory", str(work_dir / "output"),
        "--temp-directory", str(work_dir / "temp"),
    ]
    if current:  # the 2024 host keeps its user folder (frontend settings) inside its own checkout
        command += ["--user-directory", str(work_dir / "user")]
        (work_dir / "user" / "default" / "comfy.settings.json").write_text(json.dumps(CURRENT_FRONTEND_SETTINGS))
    log = work_dir / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = ComfyServer(f"http://127.0.0.1:{port}", process, work_dir, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if "P2PController" in server.get_json("/object_info/P2PController"):
                return server
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    server.stop()
    raise ServerError(f"ComfyUI did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


GRAPH_NODES_JS = """
return app.graph._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!LiteGraph.registered_node_types[n.type],
    category: (LiteGraph.registered_node_types[n.type] || {}).category || null,
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
    // [x, y, width, height] on the canvas, title bar included; at least the size its widgets need
    // (the page draws widgets past a node's saved size when it is too small for them)
    bounds: (([x, y, w, h], [minW, minH]) => [x, y, Math.max(w, minW), h - n.size[1] + Math.max(n.size[1], minH)])(n.getBounding(), n.computeSize()),
}));
"""

# Dialogs of both frontends: the 2024 one's .comfy-modal, the current one's PrimeVue dialogs.
OPEN_DIALOGS = "Array.from(document.querySelectorAll('.comfy-modal, .p-dialog, [role=dialog]')).filter(e => e.checkVisibility())"
CLOSE_DIALOGS_JS = """
for (const button of document.querySelectorAll('.comfy-modal-content > button, .p-dialog-close-button, .p-dialog-header-close'))
    if (button.checkVisibility()) button.click();
"""

# Scale and pan the canvas so the graph (or the nodes with the given ids) fits inside
# the given margins (the menus' room); returns where those nodes are drawn: [x, y, width, height].
FIT_VIEW_JS = """
const [left, top, right, bottom] = arguments[0], ids = arguments[1];
const canvas = app.canvas, element = canvas.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
for (const n of app.graph._nodes.filter(n => ids === null || ids.includes(n.id))) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
}
const width = element.clientWidth - left - right, height = element.clientHeight - top - bottom;
const scale = Math.min(width / (x1 - x0), height / (y1 - y0), 1);
const screenX = left + (width - (x1 - x0) * scale) / 2, screenY = top + (height - (y1 - y0) * scale) / 2;
canvas.ds.scale = scale;
canvas.ds.offset = [screenX / scale - x0, screenY / scale - y0];
canvas.setDirty(true, true);
const box = element.getBoundingClientRect();
return [box.left + screenX, box.top + screenY, (x1 - x0) * scale, (y1 - y0) * scale];
"""

SET_WIDGET_JS = """
const [name, value] = arguments;
let count = 0;
for (const n of app.graph._nodes) for (const w of n.widgets || []) if (w.name === name) {
    w.value = value; if (w.callback) w.callback(value, app.canvas, n); count++;
}
app.graph.setDirtyCanvas(true, true);
return count;
"""


class ComfyPage:
    """The ComfyUI page in headless Chromium, used as a person uses it."""

    def __init__(self, server: ComfyServer, width: int = 1600, height: int = 900) -> None:
        if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
            raise ServerError(f"{CHROMIUM} / {CHROMEDRIVER} missing: run `bash scripts/setup.sh` (installs Debian's chromium and chromium-driver)")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--force-device-scale-factor=1"):
            options.add_argument(argument)
        self.server = server
        self.driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        self.resize(width, height)
        self.driver.get(server.url + "/")
        self.wait_for("return !!(window.app && app.graph && window.LiteGraph && app.canvas)", 60, "the ComfyUI app to start")

    def close(self) -> None:
        self.driver.quit()

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_for(self, condition: str, timeout_s: float, what: str, *args: Any) -> Any:
        """Poll a JS expression (a ``return ...`` body) until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.js(condition, *args)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def resize(self, width: int, height: int) -> None:
        """Set the page's viewport (not the window, whose frame differs between Chromium versions)."""
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def open_workflow(self, path: Path) -> None:
        """Open a workflow file through the page's own file input, as its Load / Open menu does.

        Returns once the page shows the file's nodes with the file's values in its P2P nodes: two
        shipped workflows can share node ids and types, so ids alone do not tell them apart.
        """
        from selenium.webdriver.common.by import By

        def shown(nodes: list[dict]) -> list[tuple]:
            return sorted((n["id"], n["type"], n["widgets_values"] if n["type"].startswith("P2P") else None) for n in nodes)

        expected = shown(json.loads(path.read_text())["nodes"])
        self.driver.find_element(By.ID, "comfy-file-input").send_keys(str(path))
        deadline = time.monotonic() + 30
        while shown([{**n, "widgets_values": [w["value"] for w in n["widgets"]]} for n in self.graph_nodes()]) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not show {path.name} within 30 s")
            time.sleep(0.25)

    def graph_nodes(self) -> list[dict]:
        return self.js(GRAPH_NODES_JS)

    def open_dialogs(self) -> list[str]:
        return self.js(f"return {OPEN_DIALOGS}.map(e => e.innerText);")

    def close_dialogs(self) -> None:
        """Dismiss open dialogs as a person would (Escape, then their close buttons)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        self.js(CLOSE_DIALOGS_JS)
        self.wait_for(f"return {OPEN_DIALOGS}.length === 0", 10, "the dialogs to close")

    def set_widgets(self, name: str, value: Any) -> int:
        """Type ``value`` into every widget called ``name``; returns how many there were."""
        return self.js(SET_WIDGET_JS, name, value)

    def fit_view(self, margins: tuple[int, int, int, int] = (90, 100, 230, 40), ids: list[int] | None = None) -> list[float]:
        """Fit the nodes with these ``ids`` (all by default) into the view; returns their rectangle
        on the page."""
        rect = self.js(FIT_VIEW_JS, list(margins), ids)
        time.sleep(0.3)  # the canvas redraws on its next animation frame
        return rect

    def queue(self) -> str:
        """Click the page's queue button; returns the id of the prompt it queued."""
        from selenium.webdriver.common.by import By

        known = self._prompt_ids()
        # The 2024 menu's "Queue Prompt" or the current action bar's "Run".
        buttons = [b for b in self.driver.find_elements(By.CSS_SELECTOR, "#queue-button, button[aria-label='Run']") if b.is_displayed()]
        if not buttons:
            raise AssertionError("the page shows no queue button")
        buttons[0].click()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new = self._prompt_ids() - known
            if new:
                return new.pop()
            time.sleep(0.2)
        raise AssertionError(f"clicking the queue button queued nothing; open dialogs: {self.open_dialogs()}")

    def _prompt_ids(self) -> set[str]:
        """Every prompt the server knows: queued, running or finished."""
        queue = self.server.get_json("/queue")
        return set(self.server.get_json("/history")) | {entry[1] for entry in queue["queue_running"] + queue["queue_pending"]}

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))


def wait_for_prompt(server: ComfyServer, prompt_id: str, timeout_s: float) -> dict:
    """The history entry of ``prompt_id`` once it has finished (successfully or not)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str") in ("success", "error"):
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s:\n{server.log_tail()}")
