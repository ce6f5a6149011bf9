"""Dense attention: every token is kept and attended to (the reference)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from longkv.policies.base import KVPolicy


@dataclass
class DensePolicy(KVPolicy):
    """Keep the whole KV cache. Inputs must fit the model's trained window."""

    name = "dense"

    def dense_kv_upto(self) -> int:
        return sys.maxsize if self.kv_quant == "none" else 0  # int8/int4 codes are not the dense bytes
