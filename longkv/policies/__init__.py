"""KV policies: one file per method, a name -> class registry, and a spec parser.

A policy spec is ``NAME`` or ``NAME:knob=value,knob=value``, e.g.
``streaming:budget=2048,sinks=4``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from longkv.errors import LongKVError
from longkv.policies.adakv import AdaKVPolicy
from longkv.policies.base import EvictionPolicy, KVPolicy, SelectionPolicy
from longkv.policies.block_topk import BlockTopKPolicy
from longkv.policies.dense import DensePolicy
from longkv.policies.expected_attention import ExpectedAttentionPolicy
from longkv.policies.h2o import H2OPolicy
from longkv.policies.knorm import KNormPolicy
from longkv.policies.kvzip import KVzipPolicy
from longkv.policies.pyramid import PyramidPolicy
from longkv.policies.random import RandomPolicy
from longkv.policies.snapkv import SnapKVPolicy
from longkv.policies.streaming import StreamingPolicy
from longkv.policies.tova import TOVAPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    "dense": DensePolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "tova": TOVAPolicy,
    "snapkv": SnapKVPolicy,
    "pyramid": PyramidPolicy,
    "adakv": AdaKVPolicy,
    "knorm": KNormPolicy,
    "expected_attention": ExpectedAttentionPolicy,
    "kvzip": KVzipPolicy,
    "random": RandomPolicy,
    "block_topk": BlockTopKPolicy,
}


def _coerce(value: str, field_type: Any) -> Any:
    t = str(field_type)
    if "int" in t:
        if value.lower() in ("auto", "none", "null") and "None" in t:
            return None
        return int(value.replace("_", "").lower().replace("k", "000"))
    if "float" in t:
        return float(value)
    if "bool" in t:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    return value


def _expected(field_type: Any) -> str:
    """What a knob's value must look like, in words, for an error message."""
    t = str(field_type)
    if "int" in t:
        return "a whole number, or auto" if "None" in t else "a whole number"
    if "float" in t:
        return "a number"
    if "bool" in t:
        return "true or false"
    return "text"


def _has_example(f: dataclasses.Field[Any]) -> bool:
    """Whether a knob's default can be shown as an example value (not auto, empty or missing)."""
    return f.default not in (None, "", dataclasses.MISSING)


def _example_knob(fields: dict[str, dataclasses.Field[Any]]) -> str:
    """One knob=value of a policy for an error message: its budget if it has one, else its first knob with a default."""
    for f in sorted(fields.values(), key=lambda f: f.name != "budget"):
        if _has_example(f):
            return f"{f.name}={f.default}"
    return "knob=value"


def name_hint(name: str) -> str:
    """``"did you mean NAME? "`` for the policy name (or ``auto``) closest to a mistyped ``name``, or ``""``."""
    close = difflib.get_close_matches(name.strip().lower(), [*POLICIES, "auto"], n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def make_policy(spec: str | KVPolicy, **overrides: Any) -> KVPolicy:
    """Build a policy from a spec string (or return a policy object unchanged, with overrides applied).

    Args:
        spec: ``"dense"``, ``"streaming:budget=2048"``, ...
        overrides: knob values that win over the spec (``None`` values are ignored).

    Raises:
        LongKVError: unknown policy name, unknown knob or a value of the wrong type.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(spec, KVPolicy):
        return dataclasses.replace(spec, **overrides) if overrides else spec
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name == "auto":
        raise LongKVError(
            f"the auto policy takes no knobs (got {spec!r}): use auto alone (with a budget given apart: streaming with that "
            "budget), or name a policy with its knobs, e.g. streaming:budget=2048"
        )
    if name not in POLICIES:
        raise LongKVError(f"unknown policy {name!r}: {name_hint(name)}choose auto or one of {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    knobs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq and key in fields:
            raise LongKVError(f"policy {name} knob {key!r} needs a value: write {name}:{key}=VALUE")
        if not eq or key not in fields:
            known = ", ".join(fields) or "none"
            close = difflib.get_close_matches(key.lower(), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {name}:{close[0]}=...? " if close else ""
            raise LongKVError(f"policy {name} has no knob {key!r}: {hint}its knobs are {known} (e.g. {name}:{_example_knob(fields)})")
        if key in knobs:
            raise LongKVError(f"policy {name} knob {key!r} is given twice: keep one {key}=VALUE")
        try:
            knobs[key] = _coerce(value.strip(), fields[key].type)
        except ValueError:
            example = f" such as {name}:{key}={fields[key].default}" if _has_example(fields[key]) else ""
            sep = "; separate knobs with commas" if any(c in value for c in ";: ") else ""
            raise LongKVError(f"bad value {value!r} for {name}.{key}: expected {_expected(fields[key].type)}{example}{sep}") from None
    for key, value in overrides.items():
        if key not in fields:
            if key == "budget":  # --budget with a policy that keeps every token
                bound = f" (bound its resident KV in bytes instead: {name}:resident=1GiB)" if "resident" in fields else ""
                raise LongKVError(
                    f"policy {name} keeps every token, so a budget does not apply{bound}: drop the budget, or pick an "
                    f"eviction policy (streaming, snapkv, ...) to keep a budget of tokens"
                )
            raise LongKVError(f"policy {name} takes no {key!r} setting: its knobs are {', '.join(fields) or 'none'}")
        knobs[key] = value
    return cls(**knobs)


__all__ = [
    "POLICIES",
    "AdaKVPolicy",
    "BlockTopKPolicy",
    "DensePolicy",
    "EvictionPolicy",
    "ExpectedAttentionPolicy",
    "H2OPolicy",
    "KNormPolicy",
    "KVPolicy",
    "KVzipPolicy",
    "PyramidPolicy",
    "RandomPolicy",
    "SelectionPolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "TOVAPolicy",
    "make_policy",
]
