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
from concurrent.futures import Future, ThreadPoolExecutor
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

        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._grammar = LLMatcher.grammar_from_lark(lark)
        failed, messages = LLMatcher.validate_grammar_with_warnings(self._grammar, tokenizer)
        if failed:
            first = "; ".join(messages).strip().splitlines()[0] if messages else "unknown error"
            raise LongKVError(f"the grammar does not compile: {first[:300]}")
        self._start = LLMatcher(tokenizer, self._grammar, log_level=0)  # copied per request: ~10 us, not ~2 ms

    def constraint(self) -> GrammarConstraint:
        """A fresh matcher at the grammar's start, for one request."""
        return GrammarConstraint(self._start.deep_copy(), self.vocab_size)


class GrammarConstraint:
    """Per-request grammar state: masks logits, follows the sampled tokens.

    The mask of the next token depends only on the tokens so far, so it is computed
    ahead, in a background thread (llguidance releases the GIL), as soon as the last
    token is accepted: it overlaps the model's next forward, and :meth:`mask` only
    waits for it (normally not at all) and applies it.

    Attributes:
        mask_s: seconds :meth:`mask` added to the steps (waiting for the mask, applying it).
        compute_s: seconds spent computing masks (in the background).
        masks: masks applied.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.mask_s = self.compute_s = 0.0
        self.masks = 0
        self._done, self._accepting = bool(matcher.is_stopped()), bool(matcher.is_accepting())
        self._next: Future[_Mask] = _POOL.submit(self._compute)

    def _compute(self) -> _Mask:
        t0 = time.perf_counter()
        m = self._m
        if m.is_error():
            raise LongKVError(f"grammar error: {m.get_error()}")
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        plan = _Mask.of(self._bits, self.vocab_size)
        self.compute_s += time.perf_counter() - t0
        return plan

    def mask(self, logits: torch.Tensor, end_ids: Iterable[int] = (), temperature: float = 1.0) -> torch.Tensor:
        """``logits`` (V,) float32 with every token the grammar forbids at -inf (a new tensor).

        Args:
            logits: the model's logits, (V,) float32.
            end_ids: the tokens that end the generation. Where the output so far is complete
                (the grammar may end here), the probability the model gives to tokens the
                grammar forbids goes to ending: one of ``end_ids`` gets the logit of the whole
                ending mass, the forbidden tokens' and its own (at ``temperature``; its largest
                logit when greedy). A model held to a tool call that would now write prose
                ends the reply rather than open another call it never meant.
            temperature: the sampling temperature (0: greedy), so that the mass is summed as
                the sampler will weigh it.

        Raises:
            LongKVError: the matcher is in an error state (no token is allowed).
        """
        t0 = time.perf_counter()
        plan = self._next.result()
        out = plan.apply(logits)
        if self._accepting and out is not logits:
            out = _fold_into_end(logits, out, end_ids, temperature, plan.idx if plan.kind == "forbid" else None)
        self.mask_s += time.perf_counter() - t0
        self.masks += 1
        return out

    def accept(self, token: int) -> None:
        """Advance past the sampled ``token`` (and start computing the next mask).

        Raises:
            LongKVError: the grammar does not allow ``token`` (only when the logits were not masked).
        """
        self._next.result()  # the matcher is not shared with a running computation
        if not self._m.consume_token(token):
            raise LongKVError(f"grammar error: token {token} is not allowed here ({self._m.get_error()})")
        self._done, self._accepting = bool(self._m.is_stopped()), bool(self._m.is_accepting())
        self._next = _POOL.submit(self._compute)  # from here on the matcher belongs to the computation

    @property
    def done(self) -> bool:
        """The grammar allows nothing more (its output is complete); read when the last token was accepted,
        since the matcher must not be touched while the next mask is computed in the background."""
        return self._done

    @property
    def accepting(self) -> bool:
        """What was generated so far is a complete sentence of the grammar (read as :attr:`done` is)."""
        return self._accepting


_SPARSE_WORDS = 256  # masks with fewer 32-token words holding an allowed (or a forbidden) token go by index
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longkv-grammar")


class _Mask:
    """A token mask made ready to apply: ``kind`` "all" (nothing forbidden), "allow" (only ``idx``),
    "forbid" (all but ``idx``) or "dense" (``allowed``, a (V,) bool array).

    Most masks are either nearly empty (inside JSON: a few allowed tokens) or nearly full
    (free text): both are applied by index, so applying costs a few tens of microseconds,
    not a pass over every token with a torch op.
    """

    __slots__ = ("allowed", "idx", "kind")

    def __init__(self, kind: str, idx: np.ndarray | None = None, allowed: np.ndarray | None = None) -> None:
        self.kind, self.idx, self.allowed = kind, idx, allowed

    @classmethod
    def of(cls, bits: np.ndarray, vocab: int) -> _Mask:
        """From llguidance's bitmask ((V + 31) // 32 int32, bit i of word w: token 32 w + i allowed)."""
        pad = 32 * len(bits) - vocab  # bits past the vocabulary count as allowed
        full = bits.copy()
        if pad:
            full[-1] |= np.int32(np.uint32(0xFFFFFFFF << (32 - pad) & 0xFFFFFFFF).view(np.int32))
        partial = np.flatnonzero(full != -1)  # words with a forbidden token
        if len(partial) == 0:
            return cls("all")
        words = np.flatnonzero(bits)  # words with an allowed token
        if len(words) < _SPARSE_WORDS:
            flags = np.unpackbits(bits[words].view(np.uint8), bitorder="little").reshape(-1, 32).view(np.bool_)
            idx = (words[:, None] * 32 + np.arange(32))[flags]
            return cls("allow", idx[idx < vocab])
        if len(partial) < _SPARSE_WORDS:
            flags = np.unpackbits(full[partial].view(np.uint8), bitorder="little").reshape(-1, 32).view(np.bool_)
            return cls("forbid", (partial[:, None] * 32 + np.arange(32))[~flags])
        return cls("dense", allowed=np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab].view(np.bool_))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) float32 with the forbidden tokens at -inf (``logits`` itself when none is)."""
        if self.kind == "all":
            return logits
        src = logits.detach().cpu().numpy()
        if self.kind == "allow":
            out = np.full(src.shape, -np.inf, dtype=src.dtype)
            out[self.idx] = src[self.idx]
        elif self.kind == "forbid":
            out = src.copy()
            out[self.idx] = -np.inf
        else:
            assert self.allowed is not None
            out = np.where(self.allowed, src, np.asarray(-np.inf, dtype=src.dtype))
        return torch.from_numpy(out).to(logits.device)


def _fold_into_end(
    raw: torch.Tensor, masked: torch.Tensor, end_ids: Iterable[int], temperature: float, forbidden: np.ndarray | None = None
) -> torch.Tensor:
    """``masked`` with one allowed end token carrying the mass of every forbidden and end token of ``raw``
    (``forbidden``: their ids where the mask lists them, free text's case, so no pass over the vocabulary)."""
    ends = sorted(i for i in end_ids if i < masked.shape[-1])
    allowed = [i for i in ends if not torch.isneginf(masked[i])]
    if not allowed:
        return masked
    if forbidden is not None:
        values = raw[torch.from_numpy(np.union1d(forbidden, ends)).to(raw.device)]
    else:
        ending = torch.isneginf(masked)
        ending[ends] = True
        values = raw[ending]
    masked[ends] = float("-inf")
    masked[allowed[0]] = values.max() if temperature == 0.0 else temperature * torch.logsumexp(values / temperature, 0)
    return masked


def _apply_bits(bits: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (V,) with the tokens whose bit is 0 in ``bits`` at -inf (see :class:`_Mask`)."""
    return _Mask.of(bits, logits.shape[-1]).apply(logits)
