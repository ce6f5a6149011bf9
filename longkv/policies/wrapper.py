"""Base of the methods that wrap another method's scorer (PyramidKV, AdaKV).

The wrapper decides how much each layer or head keeps; the inner policy, named by
its spec in ``scorer``, decides which tokens are best.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longkv.errors import LongKVError
from longkv.policies.base import EvictionPolicy


@dataclass
class ScorerWrapper(EvictionPolicy):
    """An eviction policy ranking tokens with the scorer of the policy spec ``scorer``.

    Raises:
        LongKVError: ``scorer`` is not a token-scoring policy (or is this same wrapper).
    """

    scorer: str = "snapkv"
    inner: EvictionPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from longkv.policies import make_policy

        try:
            inner = make_policy(self.scorer)
        except LongKVError as e:
            raise LongKVError(f"{self.name} scorer {self.scorer!r}: {e}") from None
        if not isinstance(inner, EvictionPolicy) or isinstance(inner, type(self)):
            raise LongKVError(f"{self.name} scorer {self.scorer!r} is not a token scorer: use e.g. scorer=snapkv")
        self.inner = inner

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.inner.needs_queries

    @property
    def reconstruct(self) -> bool:  # type: ignore[override]
        """Whether the scorer rates tokens by a repeat of each chunk (KVzip)."""
        return self.inner.reconstruct

    def protected(self, budget: int) -> tuple[int, int]:
        return self.inner.protected(budget)

    @property
    def chunk(self) -> int:
        """The scorer's ``chunk``: tokens are kept in whole runs of this many (see :meth:`EvictionPolicy.top`)."""
        return int(getattr(self.inner, "chunk", 1))
