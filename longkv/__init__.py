"""longkv: long-context LLM inference on the CPU with KV caches bounded by a budget.

Public API::

    from longkv import LLM, SamplingParams, DensePolicy, StreamingPolicy

The names load on first use, so ``import longkv`` (and the command line's help, ``longkv agent``) does not pay
for torch until an engine is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from longkv.errors import LongKVError

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
