"""The one error type users see: it names the node, the input and the fix."""
from __future__ import annotations


class P2PError(ValueError):
    """A user-facing mistake in a P2P node's inputs.

    ComfyUI shows the exception message in its error dialog, so the message is written for the
    person at the graph: which node, which input, what is wrong, and how to fix it.
    """

    def __init__(self, node: str, input_name: str | None, problem: str, fix: str) -> None:
        where = f"{node} › {input_name}" if input_name else node
        super().__init__(f"[{where}] {problem} Fix: {fix}")
        self.node = node
        self.input_name = input_name
        self.problem = problem
        self.fix = fix
