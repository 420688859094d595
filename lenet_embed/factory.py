"""The FAISS factory strings this project builds and searches, checked before FAISS sees them.

FAISS parses a factory string itself, and some strings crash the process instead of raising
(``HNSW0`` aborts, ``HNSW1`` segfaults, ``IVF4,PQ84x0`` divides by zero), while others build
index types (``IDMap``, refinements, ...) that the snapshot does not know how to search. So every
factory, from ``build-index --factory`` or from a manifest, is parsed here first against a small
grammar, and its numbers are bounded. No FAISS import: the manifest checks use it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import LenetEmbedError

# What build-index chooses by itself (lenet_embed.ann.choose_index); not a FAISS factory.
AUTO = "auto"
# The grammar:
#   [OPQ<m>[_<d>],] Flat | HNSW<M>[,Flat|,SQ<b>] | IVF<n>,(Flat|SQ<b>|PQ<m>[x<bits>])
#                 | SQ<b> | PQ<m>[x<bits>]
_FACTORY = re.compile(
    r"(?:OPQ(?P<opq>\d{1,5})(?:_(?P<opq_dim>\d{1,5}))?,)?"
    r"(?:(?P<flat>Flat)|HNSW(?P<hnsw>\d{1,5})(?:,(?:Flat|(?P<hnsw_sq>SQ(?:4|6|8|fp16))))?"
    r"|(?:IVF(?P<ivf>\d{1,7}),)?(?:(?P<ivf_flat>Flat)|(?P<sq>SQ(?:4|6|8|fp16))"
    r"|PQ(?P<pq>\d{1,5})(?:x(?P<bits>\d{1,3}))?))",
    re.ASCII,  # digits are 0-9 only, as FAISS reads them
)
# Bounds of the numbers in a factory and of its search parameters: beyond them FAISS crashes
# (HNSW M < 2, 0 code bits) or allocates without bound (lists, code bits, search depth).
HNSW_M_RANGE = (2, 256)
MAX_LISTS = 1 << 18
PQ_BITS_RANGE = (1, 12)
MAX_OPQ_DIM = 4096
MAX_SEARCH_DEPTH = 1 << 16  # efSearch and nprobe


class BadFactory(LenetEmbedError, ValueError):
    """A factory string outside the grammar this project builds and searches."""


@dataclass(frozen=True)
class FactorySpec:
    """What a checked factory string builds: its search parameter (``efSearch``, ``nprobe`` or
    None) and, for IVF, its number of lists."""

    factory: str
    parameter: str | None
    lists: int | None


def parse_factory(factory: Any, dim: int) -> FactorySpec:
    """Check a factory string against the grammar of supported factories for vectors of
    ``dim``: ``Flat``, ``HNSW<M>`` (M in 2..256), ``IVF<n>,Flat|SQ<b>|PQ<m>[x<bits>]`` (n in
    1..2^18), ``SQ<b>``, ``PQ<m>[x<bits>]`` (m dividing the dimension, bits in 1..12), each
    optionally after an ``OPQ<m>[_<d>]`` rotation (m dividing its output dimension d). Whatever
    the string, this raises :class:`BadFactory` (one line) rather than let FAISS crash."""
    if not isinstance(factory, str):
        raise BadFactory(f"the FAISS factory must be a string, got {type(factory).__name__}")
    match = _FACTORY.fullmatch(factory)
    if match is None:
        raise _bad(factory, dim, "not a supported factory")
    numbers = {k: int(v) for k, v in match.groupdict().items() if v and v.isdigit()}
    width = dim
    if "opq" in numbers:
        width = numbers.get("opq_dim", dim)
        if not (1 <= width <= MAX_OPQ_DIM and numbers["opq"] >= 1
                and width % numbers["opq"] == 0):
            raise _bad(factory, dim, f"OPQ needs m dividing its output dimension, at most "
                                     f"{MAX_OPQ_DIM}")
    if "hnsw" in numbers and not HNSW_M_RANGE[0] <= numbers["hnsw"] <= HNSW_M_RANGE[1]:
        raise _bad(factory, dim, "HNSW needs M between {} and {}".format(*HNSW_M_RANGE))
    if "ivf" in numbers and not 1 <= numbers["ivf"] <= MAX_LISTS:
        raise _bad(factory, dim, f"IVF needs between 1 and {MAX_LISTS} lists")
    if "pq" in numbers:
        if not (numbers["pq"] >= 1 and width % numbers["pq"] == 0):
            raise _bad(factory, dim, f"PQ needs m dividing {width}")
        bits = numbers.get("bits", 8)
        if not PQ_BITS_RANGE[0] <= bits <= PQ_BITS_RANGE[1]:
            raise _bad(factory, dim, "PQ needs {}..{} bits a code".format(*PQ_BITS_RANGE))
    if "hnsw" in numbers:
        return FactorySpec(factory, "efSearch", None)
    if "ivf" in numbers:
        return FactorySpec(factory, "nprobe", numbers["ivf"])
    return FactorySpec(factory, None, None)


def _bad(factory: str, dim: int, reason: str) -> BadFactory:
    divisors = [m for m in range(dim // 2, 3, -1) if dim % m == 0][:3] or [dim]
    examples = ", ".join(f"PQ{m}" for m in divisors)
    return BadFactory(
        f"FAISS factory {factory[:60]!r} is not supported for dim {dim} ({reason}); use Flat, "
        f"HNSW<M>, IVF<n>,Flat, IVF<n>,SQ8, IVF<n>,PQ<m>[x<bits>] or PQ<m> (m dividing {dim}, "
        f"e.g. {examples}), optionally after OPQ<m>[_<d>]"
    )


def check_search_params(params: Any, spec: FactorySpec) -> None:
    """Check stored search parameters against the factory they were tuned for: its own
    parameter only (a whole number in 1..2^16), and ``tuned_recall_at_10`` in [0, 1];
    ValueError otherwise."""
    if not isinstance(params, dict):
        raise ValueError("search_params must be an object")
    for name, value in params.items():
        if name == "tuned_recall_at_10":
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError("search_params tuned_recall_at_10 must be between 0 and 1")
        elif name != spec.parameter:
            raise ValueError(f"search_params {str(name)[:40]!r} does not apply to {spec.factory}")
        elif not (isinstance(value, int) and not isinstance(value, bool)
                  and 1 <= value <= MAX_SEARCH_DEPTH):
            raise ValueError(f"search_params {name} must be a whole number in "
                             f"1..{MAX_SEARCH_DEPTH}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
