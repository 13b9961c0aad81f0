"""The numbers the pack reads and their ranges: one source for the widgets' min / max and for the
check each node makes.

ComfyUI's own validation compares a widget value with its min and max, which NaN passes (every
comparison with NaN is false), and values typed in text ("cat: nan", "cat: 1e30") never meet a
widget at all. A NaN or an absurd factor gives a black or silently unedited image, a NaN fraction an
index error deep in sampling; so every number is checked where the pack reads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import P2PError


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False

    def widget(self) -> dict:
        """The widget options ``min`` and ``max`` (ComfyUI's INT / FLOAT inputs)."""
        return {"min": self.low, "max": self.high}

    def check(self, value: object, node: str, input_name: str, label: str = "") -> float:
        """``value`` as a number if it is one (finite, whole for an integer range) inside the range;
        else a P2PError naming ``node`` and ``input_name``. ``label`` says where in a text the value
        was typed (e.g. "'cat: nan'")."""
        where = f"{label}: " if label else ""
        kind = "a whole number" if self.integer else "a number"
        fix = f"use {kind} from {self.low:g} to {self.high:g}."
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise P2PError(node, input_name, f"{where}{value!r} is not a finite number.", fix)
        if self.integer and value != int(value):
            raise P2PError(node, input_name, f"{where}{value!r} is not a whole number.", fix)
        if not self.low <= value <= self.high:
            raise P2PError(node, input_name, f"{where}{value:g} is outside {self.low:g}..{self.high:g}.", fix)
        return int(value) if self.integer else float(value)


FRACTION = Range(0.0, 1.0)  # fractions of the schedule, blend thresholds
REWEIGHT_SCALE = Range(-10.0, 10.0)  # factors on attention: far beyond this the softmax's rows blow up
