"""Comparing two stores' answers: JSON data equal up to the float sums of their engines."""

from __future__ import annotations

from typing import Any

import numpy as np


def close(ours: Any, theirs: Any) -> bool:
    """Equal JSON data, numbers within a relative 1e-4 (what the solver's tolerance leaves)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(close(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(close, ours, theirs))
    if isinstance(ours, float) or isinstance(theirs, float):
        return bool(np.isclose(ours, theirs, rtol=1e-4, atol=1e-9))
    return bool(ours == theirs)
