"""A selection policy's needs, run as work of the step loop.

At the question a selection policy (``block_topk``) chooses its pages through a
generator of needs (:mod:`longkv.policies.base`: :class:`ProbeQueries`,
:class:`EncodeText`, :class:`GreedyConfidence`); it never runs the model. The
sequence's :class:`~longkv.engine.runner.PrefillPlan` starts a :class:`NeedRun`
for each need: the need's tokens become :class:`~longkv.engine.step.Work`
items that join the engine's next batched forwards beside every other
sequence's tokens (the texts a ``verify`` reads go through the model together,
not one after another), and the result goes back to the policy.

Texts read on their own (``EncodeText``, ``GreedyConfidence``) get fresh dense
sequences whose pages come from the engine's pools and go back to them as soon
as the text is read, or when the need is dropped (:meth:`NeedRun.close`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from longkv.attention.dense import attend_segments
from longkv.engine.step import Work
from longkv.policies.base import EncodeText, GreedyConfidence, Need, ProbeQueries
from longkv.policies.dense import DensePolicy

if TYPE_CHECKING:
    from longkv.engine.runner import PrefillPlan, Runner, Sequence


class _Text:
    """One text read on its own: a fresh dense sequence, prefilled, then ``n`` greedy tokens scored."""

    def __init__(self, runner: Runner, ids: list[int], n: int) -> None:
        self.runner, self.n = runner, n
        self.seq: Sequence | None = runner.new_sequence(len(ids) + n)
        self.plan: PrefillPlan | None = runner.plan_prefill(self.seq, ids, compress=False)
        self.token: int | None = None  # greedy token to feed next
        self.scored = 0
        self.total = 0.0  # sum of the greedy tokens' log-probabilities
        self.busy = False  # a work of this text is in the running forward

    @property
    def done(self) -> bool:
        return self.seq is None

    def close(self) -> None:
        if self.seq is not None:
            self.seq.cache.clear()
            self.seq = None


class NeedRun:
    """One need in flight for ``seq``: hands out its works, collects the result.

    Attributes:
        done: the result is ready.
        result: what the policy is sent back (see the need's docstring).
    """

    def __init__(self, runner: Runner, seq: Sequence, need: Need) -> None:
        from longkv.engine.runner import Runner

        self.runner, self.seq, self.need = runner, seq, need
        self.done = False
        self.result: Any = None
        self._texts: list[_Text] = []
        self._queries: dict[int, torch.Tensor] = {}
        self._probe_out = False  # the probe's work is in the running forward
        self._marks: list[int] = []  # per layer, the tokens cached before the probe
        if isinstance(need, (EncodeText, GreedyConfidence)):
            dense = Runner(runner.model, DensePolicy(), runner.engine, runner.pools)
            texts, n = ([need.ids], 0) if isinstance(need, EncodeText) else (need.texts, need.n)
            self._texts = [_Text(dense, ids, n) for ids in texts]
            if not self._texts:
                self._finish()

    def peek(self) -> int:
        """Tokens of the first work :meth:`works` would hand out."""
        if isinstance(self.need, ProbeQueries):
            return len(self.need.ids)
        for t in self._texts:
            if not t.done and not t.busy:
                return t.plan.peek() if t.plan is not None else 1
        return 0

    def works(self, budget: int | None = None) -> list[Work]:
        """The works to run now: at least one, more while their tokens fit ``budget`` (None: all)."""
        if isinstance(self.need, ProbeQueries):
            if self._probe_out:
                return []
            self._probe_out = True
            self._queries.clear()
            self._marks = [lkv.n for lkv in self.seq.cache.layers]
            return [Work(self.runner, self.seq, list(self.need.ids), logits=False, keep=False,
                         attention=self._probe_attention, then=self._probe_done)]
        out: list[Work] = []
        left = budget
        for t in self._texts:
            if t.done or t.busy:
                continue
            if t.plan is not None:
                n = t.plan.peek()
                if out and left is not None and n > left:
                    break
                w = t.plan.next_works()[0]
                if t.n == 0:
                    w.logits = False  # only the keys and values are read
            else:
                n = 1
                if out and left is not None and n > left:
                    break
                assert t.seq is not None and t.token is not None
                w = Work(t.runner, t.seq, [t.token], decode=True)
            w.then = lambda logits, t=t: self._text_step(t, logits)
            t.busy = True
            out.append(w)
            if left is not None:
                left -= n
        return out

    def undo(self, work: Work) -> None:
        """``work``'s forward was cut short and rolled back: hand it out again."""
        if isinstance(self.need, ProbeQueries):
            self._probe_out = False
            return
        for t in self._texts:
            if t.seq is work.seq:
                t.busy = False
                if t.plan is not None and not work.decode:
                    t.plan.undo(work)

    def close(self) -> None:
        """Drop the need: every fresh sequence's pages go back to the pool."""
        for t in self._texts:
            t.close()

    # ------------------------------------------------------------------ probe
    def _probe_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.need, ProbeQueries)
        lkv = self.seq.cache[layer]
        lkv.append(k, v, pos)
        self._queries[layer] = q
        window = self.runner.windows[layer]
        if window is not None:  # a sliding layer reads its window, as in every other forward
            return attend_segments(q, lkv.segments(), pos, window)
        return self.need.read(layer, q, lkv, pos)

    def _probe_done(self, logits: torch.Tensor | None) -> None:
        for lkv, n0 in zip(self.seq.cache.layers, self._marks, strict=True):
            lkv.truncate(n0)
        self.result = [self._queries[i] for i in range(len(self.seq.cache.layers))]
        self._queries.clear()
        self._finish()

    # ------------------------------------------------------------------ texts
    def _text_step(self, t: _Text, logits: torch.Tensor | None) -> None:
        t.busy = False
        if t.plan is not None:
            if not t.plan.done:
                return
            t.plan = None
            if t.n == 0:  # EncodeText: its keys and values are the result
                assert t.seq is not None
                self.result = [(lkv.view()[0].clone(), lkv.view()[1].clone()) for lkv in t.seq.cache.layers]
                t.close()
                self._maybe_finish()
                return
        assert logits is not None
        logp = torch.log_softmax(logits.reshape(-1).float(), dim=-1)
        t.token = int(logp.argmax())
        t.total += float(logp[t.token])
        t.scored += 1
        if t.scored == t.n:
            t.close()
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if all(t.done for t in self._texts):
            if isinstance(self.need, GreedyConfidence):
                self.result = [t.total / t.n for t in self._texts]
            self._finish()

    def _finish(self) -> None:
        self.done = True
