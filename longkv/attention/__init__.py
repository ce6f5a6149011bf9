"""Attention over cached keys and values."""

from longkv.attention.dense import attend

__all__ = ["attend"]
