"""Agent memory in the KV cache: a session's context as typed spans that can be compressed, cut out and saved.

A :class:`KVMemory` holds one session's sequence (its KV pages and tokens) and
the spans it was built from, in order: the system prompt, the task, each
assistant turn, each tool result. Every span keeps the tokens the client sent
(its *logical* ids, what the next request must repeat to reuse it) and counts
how many of them still have KV (``kept``). Three edits change the KV without a
new prefill:

* :meth:`KVMemory.compress` keeps a share of a span's tokens, chosen
  question-agnostically (KVzip's premise, Kim et al. 2025, arXiv:2505.23416: a
  token is worth keeping when the model attends to it while repeating the text):
  the span's tokens are fed once more as a probe after the cache, and each
  token is rated by the largest attention any probe query gives it (max over
  KV heads, as a share of each layer's total, max over layers, max-pooled over
  15 neighbours so a number or a name stays whole); the span's first
  :data:`HEAD` tokens and last :data:`EDGE` always stay (a span keeps at
  least that many);
* :meth:`KVMemory.stub` keeps only a span's first :data:`HEAD` and last
  :data:`EDGE` tokens: the role marker and first line, which for a numbered
  tool result is its number and command, so the model still sees what was
  there and can ask for it again (the agent's ``recall`` tool);
* :meth:`KVMemory.drop` cuts whole spans out (a failed call and its error, a
  loop, the oldest turns of a long run);
* :meth:`KVMemory.truncate` forgets everything after a logical length.

After an edit the KV is kept *compact*: the token at KV index ``i`` is at
position ``i``. Keys are cached rotated at their position, and rotations
compose, so the keys after a removed token are rotated back by the number of
tokens removed before them (:meth:`longkv.kv.cache.LayerKV.remap`); nothing is
prefilled again, and positions never grow past the KV length however long the
run. What the edit does not change: a later token's KV was computed while the
removed tokens were in view (in every layer after the first), so an edited
cache is close to, not equal to, a cold prefill of the edited text; with one
layer, or when nothing follows the edit, it is equal.

:meth:`KVMemory.align` turns the next request's prompt into edits: spans the
prompt repeats are kept, unpinned spans it leaves out are dropped, and the
prompt's tokens after the last kept span are new. :meth:`KVMemory.fit` is the
memory manager: it compresses, then stubs, then drops, the oldest unpinned
spans until the session fits the room it is given, and never touches a pinned
span.
:meth:`KVMemory.save` / :meth:`KVMemory.load` write a session to one
safetensors file (atomically: a temporary file, fsynced, renamed) and read it
back bit for bit, without a prefill.

Not thread-safe: the engine thread alone runs a session's edits.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from longkv.engine.runner import Runner, Sequence
from longkv.engine.step import run_batch
from longkv.errors import LongKVError
from longkv.policies.base import Observation, window_attention

SPAN_KINDS = ("system", "user", "assistant", "tool", "text")
SNAPSHOT_VERSION = 1
POOL_KERNEL = 15  # tokens: a kept token keeps its neighbours (whole numbers and names)
EDGE = 4  # tokens at the end of a compressed span that are always kept (the role marker after it)
HEAD = 24  # tokens at the start of a span a stub keeps: its role marker and first line (a tool result's number and command)


@dataclass
class Span:
    """One piece of a session's context.

    Attributes:
        id: unique within the session (never reused).
        kind: one of :data:`SPAN_KINDS` (chat roles, or ``text``).
        ids: the span's tokens as the client sent them (what a later prompt repeats).
        kept: how many of them have KV (``len(ids)`` unless compressed).
        pinned: never compressed or dropped (system prompt, task, plan).
    """

    id: int
    kind: str
    ids: list[int]
    kept: int
    pinned: bool = False

    @property
    def compressed(self) -> bool:
        return self.kept < len(self.ids)

    def report(self) -> dict[str, Any]:
        """What a client sees of the span: id, kind, tokens, kept, pinned."""
        return {"id": self.id, "kind": self.kind, "tokens": len(self.ids), "kept": self.kept, "pinned": self.pinned}


@dataclass
class Alignment:
    """What :meth:`KVMemory.align` did.

    Attributes:
        matched: logical tokens of the prompt the session now holds.
        left_out: ids of the spans the prompt left out (gone from the session).
        cut: ids of the spans after the point where the prompt differs (gone).
        partial: id of the span cut inside (its first tokens kept), or None.
        freed: KV tokens freed.
    """

    matched: int
    left_out: list[int]
    cut: list[int] = field(default_factory=list)
    partial: int | None = None
    freed: int = 0


class KVMemory:
    """A session: spans over one sequence's KV (see the module docstring).

    Args:
        runner: runs the session's model under the dense policy (its pools are where the pages live).
        seq: the sequence to build on (default: a fresh one). Its tokens must be the spans' KV tokens.

    Invariant: ``seq.tokens`` is the concatenation, over the spans, of each span's
    kept tokens, and the token at KV index ``i`` is at position ``i``.
    """

    def __init__(self, runner: Runner, seq: Sequence | None = None) -> None:
        if runner.policy.budget_tokens is not None or runner.policy.per_head or runner.policy.name not in ("", "dense"):
            raise LongKVError(f"KV memory runs under the dense policy, got {runner.policy.describe()}: leave the policy out")
        if runner.sliding_layers:
            raise LongKVError(
                f"KV memory needs every layer to attend globally; {runner.model.config.arch} has sliding-window layers "
                "(an edit would need keys their ring has already freed): use a Llama, Qwen or Phi model"
            )
        self.runner = runner
        self.seq = seq if seq is not None else runner.new_sequence()
        self.spans: list[Span] = []
        self._next_id = 1
        self.compressed_tokens = 0  # KV tokens freed by compression, over the session's life
        self.dropped_tokens = 0  # KV tokens freed by drops and cuts

    # ------------------------------------------------------------------ sizes
    @property
    def tokens(self) -> int:
        """Tokens with KV (the session's positions are 0 .. tokens - 1)."""
        return len(self.seq.tokens)

    @property
    def logical_tokens(self) -> int:
        """Tokens of the spans as the client sent them."""
        return sum(len(s.ids) for s in self.spans)

    def logical_ids(self) -> list[int]:
        """The spans' ids, in order (what a prompt must start with to reuse every span)."""
        return [t for s in self.spans for t in s.ids]

    def bytes(self) -> int:
        """Bytes of KV pages the session holds."""
        return self.seq.cache.bytes()

    def span(self, span_id: int) -> Span:
        """The span with this id. Raises LongKVError when the session has none."""
        for s in self.spans:
            if s.id == span_id:
                return s
        known = ", ".join(str(s.id) for s in self.spans) or "none"
        raise LongKVError(f"no span {span_id} in this session (its spans: {known}): use an id a reply listed")

    def kv_start(self, span: Span) -> int:
        """KV index of the span's first kept token."""
        at = 0
        for s in self.spans:
            if s is span:
                return at
            at += s.kept
        raise AssertionError("span not in this session")

    def report(self) -> list[dict[str, Any]]:
        """Every span's :meth:`Span.report`, in order."""
        return [s.report() for s in self.spans]

    # ------------------------------------------------------------------ growth
    def record(self, kind: str, ids: list[int], pinned: bool = False, extend: bool = False) -> Span:
        """Name the sequence's next ``len(ids)`` tokens after the last span (already fed) as a new span,
        or with ``extend`` as more of the last span (a message whose start the session held).

        Raises LongKVError for an unknown kind; asserts the sequence holds ``ids`` there.
        """
        if kind not in SPAN_KINDS:
            raise LongKVError(f"unknown span kind {kind!r}: use one of {', '.join(SPAN_KINDS)}")
        held = sum(s.kept for s in self.spans)
        assert self.seq.tokens[held : held + len(ids)] == list(ids), "record tokens the sequence holds after the last span"
        if extend:
            last = self.spans[-1]
            assert last.kind == kind and not last.compressed
            last.ids += list(ids)
            last.kept += len(ids)
            return last
        span = Span(self._next_id, kind, list(ids), len(ids), pinned)
        self._next_id += 1
        self.spans.append(span)
        return span

    @torch.inference_mode()
    def append(self, kind: str, ids: list[int], pinned: bool = False) -> tuple[Span, torch.Tensor]:
        """Prefill ``ids`` after the session and record them as a span; returns it and the logits (V,) after it."""
        if not ids:
            raise LongKVError("a span needs at least one token")
        logits = self.runner.prefill(self.seq, list(ids))
        return self.record(kind, ids, pinned), logits

    # ------------------------------------------------------------------ edits
    def _compact(self, keep: torch.Tensor, kept_spans: dict[int, int], forget: frozenset[int] = frozenset()) -> None:
        """Keep the KV tokens where ``keep`` ((tokens,) bool) is set, positions made contiguous again;
        ``kept_spans``: span id -> tokens it keeps; ``forget``: spans that leave the session."""
        seq, runner = self.seq, self.runner
        kept = keep.nonzero().squeeze(1).to(seq.cache[0].device)
        for i, lkv in enumerate(seq.cache.layers):
            lkv.remap(kept, runner.ropes[i].rotate)
            lkv.shrink()
        seq.tokens = [seq.tokens[j] for j in kept.tolist()]
        seq.queries.clear()
        for s in self.spans:
            s.kept = kept_spans.get(s.id, s.kept)
        self.spans = [s for s in self.spans if s.id not in forget]
        assert sum(s.kept for s in self.spans) == len(seq.tokens)

    @torch.inference_mode()
    def drop(self, span_ids: list[int], forget: bool = False) -> int:
        """Free these spans' KV (later keys moved back, nothing prefilled); returns the KV tokens freed.

        A dropped span stays in the session with no KV (``kept == 0``): a prompt that
        still repeats its text reuses everything around it. ``forget``: the span leaves
        the session too (the client left its text out).

        Raises LongKVError for an unknown id or a pinned span (nothing is changed then).
        """
        spans = [self.span(i) for i in dict.fromkeys(span_ids)]
        for s in spans:
            if s.pinned:
                raise LongKVError(f"span {s.id} ({s.kind}) is pinned: pinned spans are never dropped")
        keep = torch.ones(self.tokens, dtype=torch.bool)
        freed = 0
        for s in spans:
            a = self.kv_start(s)
            keep[a : a + s.kept] = False
            freed += s.kept
        self._compact(keep, {s.id: 0 for s in spans}, frozenset(s.id for s in spans) if forget else frozenset())
        self.dropped_tokens += freed
        return freed

    @torch.inference_mode()
    def truncate(self, n_logical: int) -> None:
        """Forget everything after the first ``n_logical`` logical tokens; a compressed span cut inside goes whole."""
        assert 0 <= n_logical <= self.logical_tokens
        at, kv = 0, 0
        kept: list[Span] = []
        for s in self.spans:
            if at + len(s.ids) <= n_logical:
                kept.append(s)
                at += len(s.ids)
                kv += s.kept
                continue
            part = n_logical - at
            if part > 0 and not s.compressed:  # a dense span keeps its first ``part`` tokens
                s.ids, s.kept = s.ids[:part], part
                kept.append(s)
                kv += part
            break
        self.dropped_tokens += self.tokens - kv
        self.seq.cache.truncate(kv)
        for lkv in self.seq.cache.layers:
            lkv.shrink()
        self.seq.tokens = self.seq.tokens[:kv]
        self.spans = kept

    @torch.inference_mode()
    def compress(self, span_id: int, keep: float) -> int:
        """Keep about ``keep`` (0 < keep < 1) of a span's KV tokens, chosen by a question-agnostic probe; the
        first :data:`HEAD` and last :data:`EDGE` always stay, so a span keeps at least ``HEAD + EDGE`` tokens.

        Cost: one forward of the span's kept tokens after the cache (the probe's KV
        is not stored). Returns the KV tokens freed.

        Raises LongKVError: unknown id, pinned span, or ``keep`` outside (0, 1).
        """
        if not 0.0 < keep < 1.0:
            raise LongKVError(f"keep must be a share in (0, 1), got {keep}: e.g. 0.5 keeps half of the span")
        span = self.span(span_id)
        if span.pinned:
            raise LongKVError(f"span {span.id} ({span.kind}) is pinned: pinned spans are never compressed")
        n = span.kept
        target = max(min(HEAD + EDGE, n), math.ceil(keep * n))
        if target >= n:
            return 0
        lo = self.kv_start(span)
        chosen = self._choose(lo, lo + n, target, min(HEAD, target - EDGE))
        mask = torch.ones(self.tokens, dtype=torch.bool)
        mask[lo : lo + n] = False
        mask[lo + chosen] = True
        self._compact(mask, {span.id: target})
        self.compressed_tokens += n - target
        return n - target

    @torch.inference_mode()
    def stub(self, span_id: int) -> int:
        """Keep only the span's first :data:`HEAD` and last :data:`EDGE` KV tokens; returns the KV tokens freed.

        Only a span that keeps more than ``HEAD + EDGE`` tokens is stubbed; its first ``HEAD`` KV tokens are its
        first tokens as sent (:meth:`compress` always keeps them).

        Raises LongKVError: unknown id, pinned span, or a span too short to stub.
        """
        span = self.span(span_id)
        if span.pinned:
            raise LongKVError(f"span {span.id} ({span.kind}) is pinned: pinned spans are never compressed")
        if span.kept <= HEAD + EDGE:
            raise LongKVError(f"span {span.id} keeps {span.kept} tokens: only spans of over {HEAD + EDGE} are stubbed")
        lo, n = self.kv_start(span), span.kept
        mask = torch.ones(self.tokens, dtype=torch.bool)
        mask[lo + HEAD : lo + n - EDGE] = False
        self._compact(mask, {span.id: HEAD + EDGE})
        self.compressed_tokens += n - HEAD - EDGE
        return n - HEAD - EDGE

    def _choose(self, lo: int, hi: int, target: int, head: int) -> torch.Tensor:
        """Sorted (target,) indices within KV tokens [lo, hi) to keep: the first ``head`` and last :data:`EDGE`,
        the rest by score (see the module docstring)."""
        runner, seq = self.runner, self.seq
        ids = seq.tokens[lo:hi]
        queries: dict[int, torch.Tensor] = {}
        run_batch(runner.model, [runner.probe_work(seq, ids, queries.update)])
        p0 = seq.next_position
        qpos = torch.arange(p0, p0 + len(ids), dtype=torch.int64, device=runner.model.device)
        shares = []
        for layer in runner.global_layers:
            k, _, kpos = seq.cache[layer].read(lo, hi, values=False)
            att = window_attention(k, Observation(queries[layer], qpos), kpos, reduce="max").amax(1).amax(0)  # (N,)
            shares.append(att / att.sum().clamp_min(1e-30))
        score = torch.stack(shares).amax(0)
        score = torch.nn.functional.max_pool1d(score[None, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[0, 0]
        score[:head] = math.inf
        score[-EDGE:] = math.inf
        return score.topk(target).indices.sort().values.cpu()

    # ------------------------------------------------------------------ requests
    @torch.inference_mode()
    def align(self, ids: list[int]) -> Alignment:
        """Edit the session so that its logical ids are a prefix of ``ids`` (the next prompt).

        Spans the prompt repeats in order are kept; an unpinned span the prompt
        leaves out (the next kept span follows at once) leaves the session
        (``left_out``); from the first span that matches neither way on, the
        session is cut (``cut``), keeping the part of that span the prompt repeats
        when it was not compressed (``partial``). At least one token of ``ids`` is
        always left to feed (its logits are needed).
        """
        pos, i = 0, 0
        drop: list[Span] = []
        spans = self.spans
        while i < len(spans):
            s = spans[i]
            if ids[pos : pos + len(s.ids)] == s.ids:
                if pos + len(s.ids) == len(ids):
                    break  # the prompt ends with this span: its last token is fed again
                pos += len(s.ids)
                i += 1
                continue
            if s.pinned:
                break
            j = next(
                (j for j in range(i + 1, len(spans)) if len(spans[j].ids) >= 4 and ids[pos : pos + len(spans[j].ids)] == spans[j].ids),
                None,
            )
            if j is None or any(x.pinned for x in spans[i:j]):
                break
            drop.extend(spans[i:j])
            i = j
        out = Alignment(0, [s.id for s in drop])
        if drop:
            out.freed += self.drop(out.left_out, forget=True)
        kept = i - len(drop)  # spans[:i] that were kept are now self.spans[:kept]
        matched = sum(len(s.ids) for s in self.spans[:kept])
        if kept < len(self.spans):
            first = self.spans[kept]
            lcp = 0
            if not first.compressed:
                limit = min(len(first.ids), len(ids) - 1 - matched)
                while lcp < limit and first.ids[lcp] == ids[matched + lcp]:
                    lcp += 1
            out.cut = [s.id for s in self.spans[kept + (1 if lcp else 0) :]]
            out.partial = first.id if lcp else None
            before = self.tokens
            self.truncate(matched + lcp)
            out.freed += before - self.tokens
            matched += lcp
        out.matched = matched
        return out

    @torch.inference_mode()
    def fit(self, limit: int, recent: int = 2, keep: float | None = 0.25) -> list[dict[str, Any]]:
        """Make the session hold at most ``limit`` KV tokens: compress, then stub, then drop, the oldest unpinned spans.

        The newest ``recent`` spans are left alone while anything older can go. Every old
        span with over 32 KV tokens is compressed to ``keep`` once, then every old span that
        still keeps over ``HEAD + EDGE`` is stubbed (:meth:`stub`), before any span is
        dropped (its text stays, see :meth:`drop`; ``keep=None``: drop only); every action
        frees tokens, so the loop ends. Returns the edits, in order:
        ``{"compress": span id, "tokens": freed}``, ``{"stub": span id, "tokens": freed}`` or
        ``{"drop": [span id], "tokens": freed}``.

        Raises LongKVError when the pinned spans alone exceed ``limit``.
        """
        actions: list[dict[str, Any]] = []
        while self.tokens > limit:
            live = [s for s in self.spans if not s.pinned and s.kept]
            old = live[: max(len(live) - recent, 0)] or live  # the newest go last, when nothing older is left
            if not old:
                pinned = sum(s.kept for s in self.spans if s.pinned)
                raise LongKVError(
                    f"the session cannot fit {limit} tokens: its pinned spans (system prompt, task) hold {pinned}: "
                    "shorten them, or give the session more room (a lower max_tokens, a model with a larger window)"
                )
            dense = [s for s in old if not s.compressed and s.kept > 32]
            long = [s for s in old if s.kept > HEAD + EDGE]
            if keep is not None and dense:  # every old span is compressed once, then stubbed, before any is dropped
                actions.append({"compress": dense[0].id, "tokens": self.compress(dense[0].id, keep)})
            elif keep is not None and long:
                actions.append({"stub": long[0].id, "tokens": self.stub(long[0].id)})
            else:
                actions.append({"drop": [old[0].id], "tokens": self.drop([old[0].id])})
        return actions

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | Path, fingerprint: str = "") -> int:
        """Write the session to ``path`` (one safetensors file) atomically; returns its size in bytes.

        The file is written beside ``path`` under a temporary name, fsynced, then
        renamed over ``path`` (and the folder fsynced): a crash leaves the old file
        or the new one, never a part. ``fingerprint`` names what decided the KV
        bytes (model, dtype, weights); :meth:`load` refuses a file with another.
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for i, lkv in enumerate(self.seq.cache.layers):
            planes, pos = lkv.export()
            for name, t in planes.items():
                tensors[f"{i}.{name}"] = t.cpu()
            tensors[f"{i}.pos"] = pos.cpu()
        meta = {
            "version": SNAPSHOT_VERSION,
            "fingerprint": fingerprint,
            "tokens": self.seq.tokens,
            "next_id": self._next_id,
            "spans": [asdict(s) for s in self.spans],
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"longkv": json.dumps(meta)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | Path, runner: Runner, fingerprint: str = "") -> KVMemory:
        """A session read back from :meth:`save`'s file: the same spans, tokens and KV bytes, no prefill.

        Raises LongKVError: a missing or unreadable file, another snapshot version,
        another fingerprint, or KV of another shape than ``runner``'s model.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LongKVError(f"no session snapshot at {path}: save one first")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["longkv"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception as exc:
            raise LongKVError(f"{path} is not a longkv session snapshot ({type(exc).__name__}): save it again") from None
        if meta.get("version") != SNAPSHOT_VERSION:
            raise LongKVError(f"{path} is a version {meta.get('version')} snapshot, this longkv reads {SNAPSHOT_VERSION}: save it again")
        if meta.get("fingerprint") != fingerprint:
            raise LongKVError(f"{path} was saved with another model file or settings ({meta.get('fingerprint')}), not ({fingerprint}): "
                              "load it with the same model and settings")
        with torch.inference_mode():
            mem = cls._from(tensors, meta, runner, path)
        return mem

    @classmethod
    def _from(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], runner: Runner, path: Path) -> KVMemory:
        mem = cls(runner)
        layers = mem.seq.cache.layers
        for i, lkv in enumerate(layers):
            pos = tensors.get(f"{i}.pos")
            if pos is None:
                raise LongKVError(f"{path} holds no layer {i}: it was saved from another model")
            planes = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".", 1)[0] == str(i) and not k.endswith(".pos")}
            lkv.load(planes, pos)
        if f"{len(layers)}.pos" in tensors:
            raise LongKVError(f"{path} holds more layers than this model's {len(layers)}: it was saved from another model")
        mem.seq.tokens = list(meta["tokens"])
        mem.spans = [Span(**s) for s in meta["spans"]]
        mem._next_id = int(meta["next_id"])
        if sum(s.kept for s in mem.spans) != len(mem.seq.tokens) or any(lkv.n != len(mem.seq.tokens) for lkv in layers):
            raise LongKVError(f"{path} is inconsistent (spans, tokens and KV disagree): save it again")
        return mem
