"""longkv: long-context LLM inference on the CPU with KV caches bounded by a budget.

Public API::

    from longkv import LLM, SamplingParams, DensePolicy, StreamingPolicy

The names load on first use, so ``import longkv`` (and the command line's help, ``longkv agent``) does not pay
for torch until an engine is needed.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from longkv.errors import LongKVError

SPIN_COUNT = "1000"
"""``GOMP_SPINCOUNT`` set when the environment names neither it nor ``OMP_WAIT_POLICY`` (before torch loads: the
OpenMP runtime reads it once). A thread that waits at a barrier spins this many times, then sleeps. The runtime's
own default spins 300 000 times, and on a machine where another process keeps the cores busy a spinning thread
holds the core its partner needs: SmolLM2-135M's decode step took 12-1,180 ms (the slow case in 1 of 3 rounds) against
16-19 ms with 1 000 spins, and 4.4 ms with either on idle cores (Qwen2.5-Coder-0.5B: 1.02x; docs/performance.md)."""
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

if TYPE_CHECKING:
    from longkv.engine import LLM, Generation, SamplingParams, Stats
    from longkv.policies import DensePolicy, EvictionPolicy, KVPolicy, SelectionPolicy, StreamingPolicy, make_policy

__version__ = "0.1.0"

_LAZY = {
    "LLM": "longkv.engine", "Generation": "longkv.engine", "SamplingParams": "longkv.engine", "Stats": "longkv.engine",
    "DensePolicy": "longkv.policies", "EvictionPolicy": "longkv.policies", "KVPolicy": "longkv.policies",
    "SelectionPolicy": "longkv.policies", "StreamingPolicy": "longkv.policies", "make_policy": "longkv.policies",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longkv' has no attribute {name!r}")


__all__ = [
    "LLM",
    "DensePolicy",
    "EvictionPolicy",
    "Generation",
    "KVPolicy",
    "LongKVError",
    "SamplingParams",
    "SelectionPolicy",
    "Stats",
    "StreamingPolicy",
    "make_policy",
]
