"""longkv: long-context LLM inference on the CPU with KV caches bounded by a budget.

Public API::

    from longkv import LLM, SamplingParams, DensePolicy, StreamingPolicy
"""

from longkv.engine import LLM, Generation, SamplingParams, Stats
from longkv.errors import LongKVError
from longkv.policies import DensePolicy, EvictionPolicy, KVPolicy, SelectionPolicy, StreamingPolicy, make_policy

__version__ = "0.1.0"

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
