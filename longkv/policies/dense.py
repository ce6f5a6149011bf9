"""Dense attention: every token is kept and attended to (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

from longkv.policies.base import KVPolicy


@dataclass
class DensePolicy(KVPolicy):
    """Keep the whole KV cache. Inputs must fit the model's trained window."""

    name = "dense"
