"""Grammar-constrained decoding: a token mask per step from llguidance.

A :class:`Grammar` is a compiled grammar (Lark syntax with llguidance's
extensions, e.g. ``%json {schema}`` and special tokens as ``<[id]>``) bound to
one tokenizer; :meth:`Grammar.constraint` starts a fresh :class:`GrammarConstraint`
for one request. The engine asks the constraint for the logits of the allowed
tokens before it samples, then tells it the token it took
(:class:`~longkv.engine.engine.Request` ``constraint``). Whatever the sampler
does (temperature, top-p, penalties), only tokens the grammar allows can come
out, so a JSON schema or a tool call always parses.

llguidance (Moskal et al., guidance-ai/llguidance) computes a mask over the
whole vocabulary in tens of microseconds on this kind of CPU; each constraint
counts the seconds it spends so the cost per token can be reported.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from longkv.errors import LongKVError

_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


def grammar_tokenizer(tokenizer: Any, eos_ids: Iterable[int], vocab_size: int) -> Any:
    """The llguidance view of a Hugging Face tokenizer (built once per tokenizer object: ~1 s).

    Args:
        tokenizer: a fast ``transformers`` tokenizer.
        eos_ids: token ids that end a generation (the grammar allows them where it may end).
        vocab_size: the model's vocabulary (logits width), may exceed the tokenizer's.

    Raises:
        LongKVError: llguidance is not installed, or the tokenizer is not a fast one.
    """
    try:
        import llguidance
        import llguidance.hf
    except ImportError:  # pragma: no cover - a dependency of the package
        raise LongKVError("grammar-constrained decoding needs llguidance: pip install llguidance") from None
    with _LOCK:
        key = id(tokenizer)
        if key not in _TOKENIZERS:
            try:
                _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
            except ValueError as exc:
                raise LongKVError(f"grammar-constrained decoding needs a fast tokenizer ({exc})") from None
        return _TOKENIZERS[key]


class Grammar:
    """A grammar compiled for one tokenizer.

    Args:
        lark: the grammar in llguidance's Lark syntax (``start`` is the top rule).
        tokenizer: from :func:`grammar_tokenizer`.
        vocab_size: width of the logits the mask applies to.

    Raises:
        LongKVError: the grammar does not compile (the message says where).
    """

    def __init__(self, lark: str, tokenizer: Any, vocab_size: int) -> None:
        from llguidance import LLMatcher

        self.lark = lark
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._grammar = LLMatcher.grammar_from_lark(lark)
        failed, messages = LLMatcher.validate_grammar_with_warnings(self._grammar, tokenizer)
        if failed:
            raise LongKVError(f"the grammar does not compile: {'; '.join(messages)[:400]}")
        self._start = LLMatcher(tokenizer, self._grammar, log_level=0)  # copied per request: ~10 us, not ~2 ms

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any], tokenizer: Any, vocab_size: int) -> Grammar:
        """Output that is one JSON value matching ``schema``."""
        import json

        return cls(f"start: %json {json.dumps(schema)}\n", tokenizer, vocab_size)

    def constraint(self) -> GrammarConstraint:
        """A fresh matcher at the grammar's start, for one request."""
        return GrammarConstraint(self._start.deep_copy(), self.vocab_size)


class GrammarConstraint:
    """Per-request grammar state: masks logits, follows the sampled tokens.

    Attributes:
        mask_s: seconds spent computing masks (and applying them).
        masks: masks computed.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        words = (vocab_size + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)
        self.mask_s = 0.0
        self.masks = 0

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) float32 with every token the grammar forbids at -inf (a new tensor).

        Raises:
            LongKVError: the matcher is in an error state (no token is allowed).
        """
        t0 = time.perf_counter()
        m = self._m
        if m.is_error():
            raise LongKVError(f"grammar error: {m.get_error()}")
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        out = _apply_bits(self._bits, logits)
        self.mask_s += time.perf_counter() - t0
        self.masks += 1
        return out

    def accept(self, token: int) -> None:
        """Advance past the sampled ``token``.

        Raises:
            LongKVError: the grammar does not allow ``token`` (only when the logits were not masked).
        """
        if not self._m.consume_token(token):
            raise LongKVError(f"grammar error: token {token} is not allowed here ({self._m.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (its output is complete)."""
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was generated so far is a complete sentence of the grammar."""
        return bool(self._m.is_accepting())


_SPARSE_WORDS = 256  # masks with fewer non-zero 32-token words are applied by index


def _apply_bits(bits: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (V,) float32 with the tokens whose bit is 0 in ``bits`` ((V + 31) // 32 int32) set to -inf.

    Most masks are either nearly empty (inside JSON: a few allowed tokens) or nearly full
    (free text): the first are applied by index, a full one not at all, so a mask costs
    tens of microseconds, not a pass over every token with a torch op.
    """
    vocab = logits.shape[-1]
    pad = 32 * len(bits) - vocab  # bits past the vocabulary count as allowed
    full = bits.copy()
    if pad:
        full[-1] |= np.int32(np.uint32(0xFFFFFFFF << (32 - pad) & 0xFFFFFFFF).view(np.int32))
    partial = np.flatnonzero(full != -1)  # words with a forbidden token
    if len(partial) == 0:
        return logits
    src = logits.detach().cpu().numpy()
    words = np.flatnonzero(bits)  # words with an allowed token
    if len(words) < _SPARSE_WORDS:  # a few tokens allowed
        flags = np.unpackbits(bits[words].view(np.uint8), bitorder="little").reshape(-1, 32).view(np.bool_)
        idx = (words[:, None] * 32 + np.arange(32))[flags]
        idx = idx[idx < vocab]
        out = np.full(vocab, -np.inf, dtype=src.dtype)
        out[idx] = src[idx]
    elif len(partial) < _SPARSE_WORDS:  # a few tokens forbidden
        flags = np.unpackbits(full[partial].view(np.uint8), bitorder="little").reshape(-1, 32).view(np.bool_)
        idx = (partial[:, None] * 32 + np.arange(32))[~flags]
        out = src.copy()
        out[idx] = -np.inf
    else:
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab].view(np.bool_)
        out = np.where(allowed, src, np.asarray(-np.inf, dtype=src.dtype))
    return torch.from_numpy(out).to(logits.device)
