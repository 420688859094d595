"""Comparing two stores' answers: JSON data equal up to the float sums of their engines."""

from __future__ import annotations

from typing import Any

import numpy as np


def difference(ours: Any, theirs: Any, atol: float = 1e-9, where: str = "") -> str | None:
    """Where two JSON data first differ (None: nowhere), numbers compared within a relative
    1e-4 (what the solver's tolerance leaves) or ``atol`` (float32 distances near 0 differ by
    their rounding, some 1e-7)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        if ours.keys() != theirs.keys():
            return f"{where}: keys {sorted(ours)} != {sorted(theirs)}"
        found = (difference(ours[k], theirs[k], atol, f"{where}.{k}") for k in ours)
        return next((d for d in found if d is not None), None)
    if isinstance(ours, list) and isinstance(theirs, list):
        if len(ours) != len(theirs):
            return f"{where}: {len(ours)} items != {len(theirs)}"
        found = (difference(a, b, atol, f"{where}[{i}]")
                 for i, (a, b) in enumerate(zip(ours, theirs, strict=True)))
        return next((d for d in found if d is not None), None)
    if isinstance(ours, float) or isinstance(theirs, float):
        same = (ours is not None and theirs is not None
                and bool(np.isclose(ours, theirs, rtol=1e-4, atol=atol)))
    else:
        same = bool(ours == theirs)
    return None if same else f"{where}: {ours!r} != {theirs!r}"


def close(ours: Any, theirs: Any) -> bool:
    """Whether two JSON data are equal, numbers within a relative 1e-4."""
    return difference(ours, theirs) is None
