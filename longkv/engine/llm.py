"""The public entry point: ``LLM(model, policy).generate(prompt)``.

Example::

    from longkv import LLM
    llm = LLM()                                   # default model, policy chosen per input
    print(llm.generate("Hello", max_new_tokens=8).text)
    out = llm.chat([{"role": "user", "content": "Summarise: ..."}], policy="streaming:budget=2048")
    print(out.text, out.stats.line())
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from longkv.config import ASK_DRY_MULTIPLIER, EngineConfig, ModelConfig
from longkv.engine.engine import Engine, Request, RequestOutput, TokenEvent
from longkv.engine.results import Generation
from longkv.engine.runner import ProgressFn
from longkv.engine.sampling import SamplingParams
from longkv.errors import LongKVError
from longkv.inputs import Document, build_prompt, collect
from longkv.loading import load
from longkv.models import build
from longkv.models.layers import DECODE_WEIGHTS
from longkv.policies import BlockTopKPolicy, EvictionPolicy, KVPolicy, StreamingPolicy, make_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LLM:
    """A model loaded once, generating under a KV policy.

    Args:
        model: model reference (``None``: SmolLM2-135M-Instruct; a ``.gguf`` path; a
            Hugging Face folder; a hub id).
        policy: a spec such as ``"dense"`` or ``"streaming:budget=2048"``, a
            :class:`~longkv.policies.KVPolicy`, or ``"auto"`` / ``None``: dense inside
            the trained window, else block_topk (:meth:`resolve_policy`; all pages in RAM
            while they fit in ``auto_block_topk_bytes``, 4 GiB; beyond that a
            tiered cache keeping 4 GiB resident and the other pages int8 on disk),
            or streaming for models whose window is too short for block_topk.
        budget: KV budget in tokens for eviction policies (overrides the spec).
        chunk_size: prefill chunk in tokens.
        dtype: ``"bfloat16"`` (fast, default) or ``"float32"`` (matches transformers
            to ~1e-4) compute and KV dtype.
        weights: the weights decode steps read: ``"int8"`` copies, ``"int4"`` copies
            (both in blocks of 32 input channels), ``"mixed"`` (each matrix int4 where the
            file stores it in 4 bits or fewer, else int8: a Q4_K_M file's Q6_K matrices), or
            ``"none"`` (the compute dtype itself); ``"auto"``: with bfloat16, int4 when the
            file stores every projection matrix in 4 bits or fewer (re-coding them in groups
            of 32 loses next to nothing: SmolLM2's Q4_1 decode perplexity 0.998x), mixed when
            it stores some of them so, else int8; with float32, none (the exact path); on
            CUDA, none (the coded formats are CPU kernels). Prefill always uses the compute
            dtype.
        threads: torch threads (``None``: torch's default, all physical cores).
        max_num_seqs: most sequences :meth:`generate_batch` runs in one batch (the others
            join as sequences finish).
        device: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``: weights, KV pages and every
            activation live there.
        kv_budget_bytes: most KV bytes the sequences of :meth:`generate_batch` reserve
            together (``None``: no limit); the others wait for pages, and one that
            cannot fit alone fails (see :class:`~longkv.engine.engine.Engine`).

    Raises:
        LongKVError: bad model reference, policy or settings.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        policy: str | KVPolicy | None = None,
        budget: int | None = None,
        chunk_size: int = 512,
        dtype: str = "bfloat16",
        threads: int | None = None,
        page_size: int = 64,
        weights: str = "auto",
        max_num_seqs: int = 8,
        device: str = "cpu",
        kv_budget_bytes: int | None = None,
    ) -> None:
        self.engine_config = EngineConfig(chunk_size=chunk_size, page_size=page_size, dtype=dtype, threads=threads, device=device)
        check_weights(weights)
        on_cpu = self.engine_config.device == "cpu"
        if weights in ("int8", "int4", "mixed") and not on_cpu:
            raise LongKVError(f"{weights} decode weights are a CPU format: on {device} use --weights none (or auto)")
        self.decode_weights = weights
        if max_num_seqs < 1:
            raise LongKVError(f"max_num_seqs must be at least 1, got {max_num_seqs}: pass e.g. 8")
        if kv_budget_bytes is not None and kv_budget_bytes < 1:
            raise LongKVError(f"kv_budget_bytes must be at least 1, got {kv_budget_bytes}: leave it None for no limit")
        if threads is not None:
            if threads < 1:
                raise LongKVError(f"threads must be at least 1, got {threads}: pass a positive count or leave it unset (all cores)")
            torch.set_num_threads(threads)
        self._default_policy = policy
        self._default_budget = budget
        if policy not in (None, "auto") or budget is not None:  # fail fast on a bad spec or budget, before loading weights
            spec = policy if policy not in (None, "auto") else "streaming"  # auto + budget means streaming
            if budget is not None and _is_dense(spec):
                raise _dense_with_budget(budget)
            early = make_policy(spec, budget=budget) if budget is not None else make_policy(spec)
            early.check_codec()
            if hasattr(early, "check_budget"):
                early.check_budget()
        loaded = load(model, DTYPES[dtype])
        self.config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.bos_id = _leading_bos(self.tokenizer)
        self.source = loaded.source
        if weights == "auto":
            self.decode_weights = auto_weights(dtype, loaded.weight_bits) if on_cpu else "none"
        try:
            self.model = build(loaded.config, loaded.weights, self.decode_weights, self.engine_config.device, loaded.weight_bits)
        except ValueError as exc:  # a matrix the chosen format cannot code
            raise LongKVError(str(exc)) from None
        eos = set(self.config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self.engine = Engine(self.model, self.tokenizer, self.eos_ids, self.engine_config, max_num_seqs, kv_budget_bytes=kv_budget_bytes)

    # ------------------------------------------------------------------ policy
    auto_block_topk_bytes = 4 << 30  # "auto": block_topk keeps at most this much KV in RAM (the rest on disk)

    def _kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * DTYPES[self.engine_config.dtype].itemsize

    def resolve_policy(
        self, n_tokens: int, policy: str | KVPolicy | None = None, budget: int | None = None
    ) -> KVPolicy:
        """The policy for an input of ``n_tokens`` (prompt + new tokens), validated.

        ``"auto"``: dense inside the trained window, block_topk beyond it (streaming
        for a window too short for block_topk). Inside the window block_topk prefills
        faster (1.3x at 8 K, 4.3x at 32 K with Qwen2.5-Coder-0.5B) and matches dense on
        the needle benchmark, but it answered 11 of 24 real questions over code and books
        where dense answered 17 (``benchmarks/questions.py`` at 8 K, docs/sparse.md), so
        there it is asked for by name (``policy="block_topk"``).

        Raises:
            LongKVError: the policy cannot serve this input (e.g. dense beyond the window).
        """
        spec = policy if policy is not None else self._default_policy
        budget = budget if budget is not None else self._default_budget
        window = self.config.max_position
        if spec in (None, "auto"):
            if n_tokens <= window and budget is None:
                spec = "dense"
            elif budget is None and BlockTopKPolicy().span(self.engine_config, self.config) <= window:
                # Beyond the window, retrieval answers what a sliding window has forgotten
                # (docs/sparse.md); it keeps every page: in RAM while they fit, else tiered.
                fits = n_tokens * self._kv_bytes_per_token() <= self.auto_block_topk_bytes
                spec = BlockTopKPolicy() if fits else BlockTopKPolicy(resident=str(self.auto_block_topk_bytes))
            else:
                # the largest budget whose span (budget + chunk) stays inside the trained window
                default_budget = min(4096, window - max(self.engine_config.chunk_size, StreamingPolicy.evict_every))
                if budget is None and default_budget <= StreamingPolicy.sinks:
                    raise LongKVError(
                        f"the model's trained window of {window} tokens leaves no room to stream a longer input in "
                        f"{self.engine_config.chunk_size}-token chunks: lower the chunk size (--chunk-size {max(16, window // 4)})"
                    )
                spec = StreamingPolicy(budget=budget if budget is not None else default_budget)
        if budget is not None and _is_dense(spec):
            raise _dense_with_budget(budget)
        pol = make_policy(spec, budget=budget) if budget is not None else make_policy(spec)
        pol = pol.resolve(self.config, self.engine_config)
        limit = pol.max_context(self.config)
        if limit is not None and n_tokens > limit:
            if isinstance(pol, EvictionPolicy):  # original positions grow past the window: renumbering keeps them in
                fix = ("drop positions=original (the default, contiguous, numbers the kept tokens 0 .. budget, "
                       "so the input may be longer than the window), or use the block_topk policy")
            else:
                fix = ("use the block_topk policy (or auto) to read beyond the window, streaming to keep only recent "
                       "tokens")
            raise LongKVError(
                f"input of {n_tokens} tokens (prompt + max new tokens) exceeds the model's trained window of "
                f"{limit} under the {pol.describe()} policy: ask for fewer new tokens (max_new_tokens, --max-new-tokens) if the prompt alone fits, {fix}, "
                "or a smaller input"
            )
        return pol

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added).

        Raises:
            LongKVError: ``text`` holds lone surrogates (bytes that were not UTF-8, decoded with ``surrogateescape``).
        """
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            at = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if at is None:
                raise
            raise LongKVError(f"the text is not valid UTF-8 (it holds {text[at]!r}, a byte that was not UTF-8): "
                              "decode the input as UTF-8, e.g. with errors='replace'") from None

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of a whole prompt: :meth:`encode` behind the BOS token where the tokenizer puts one
        before every text (:attr:`bos_id`: Gemma, Llama 3; not SmolLM2 or Qwen2.5), unless the text
        (a chat template's rendering) starts with it already. A model fed no BOS where it was trained
        with one answers worse (Gemma 3 270M: "The capital of Spain is" went on with "Rome")."""
        ids = self.encode(text)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the model's chat template, ready for the assistant's turn.

        Raises:
            LongKVError: the model has no chat template.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise LongKVError(f"{self.source} has no chat template: use generate() with a plain prompt")
        return str(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    # ------------------------------------------------------------------ generation
    def stream(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        policy: str | KVPolicy | None = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
        result: Generation | None = None,
        question_ids: list[int] | None = None,
        question_aware: bool = True,
    ) -> Iterator[str]:
        """Yield the completion's text piece by piece.

        ``result``, if given, is filled as it goes: token ids, finish reason and stats
        (its ``text`` is left to the caller, who sees every piece).
        ``question_ids``: the question. For an eviction policy that scores with
        queries, these tokens (the question, usually the prompt's tail) are probed
        over the cache after every prefill chunk and their queries choose what is
        kept (question-aware compression, see :mod:`longkv.policies.modes`) unless
        ``question_aware`` is False; ``None``: question-agnostic, each chunk scored by
        its own last queries. When they end the prompt (the question and the
        template's tail, :meth:`ask_ids`), a selection policy (block_topk) chooses
        its pages from their queries alone, whatever ``question_aware`` says.

        Raises:
            LongKVError: empty prompt, or a policy that cannot serve it.
        """
        t0 = time.perf_counter()
        params = sampling or SamplingParams()
        ids = self._ids_of(prompt, "the prompt")
        if not ids:
            raise LongKVError("the prompt is empty: pass some text")
        self.check_ids(ids)
        pol = self.resolve_policy(len(ids) + params.max_new_tokens, policy, budget)
        res = result if result is not None else Generation("", [], "length")
        res.stats.prompt_tokens, res.stats.policy = len(ids), pol.describe()
        res.stats.compression = _compression_label(pol, bool(question_ids) and question_aware)
        req = Request(ids, params, pol, question_ids=question_ids, question_aware=question_aware, progress=progress, arrival=t0)
        for ev in self._run([req]):
            if ev.text:
                yield ev.text
            if ev.finished:
                _fill(res, ev.output, pol, self.decode_weights)

    def _run(self, requests: list[Request]) -> Iterator[TokenEvent]:
        """Run ``requests`` on the step loop to the end; yield their events.

        Requests left running when the caller stops iterating are cancelled.
        """
        engine = self.engine
        assert not engine.has_unfinished(), "LLM is not re-entrant: finish one generation before starting another"
        for req in requests:
            engine.add_request(req)
        try:
            while engine.has_unfinished():
                yield from engine.step()
        finally:
            if engine.has_unfinished():  # the caller stopped early (or an error): free everything
                for req in requests:
                    engine.abort(req.request_id)
                while engine.has_unfinished():
                    engine.step()

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] = (),
        policy: str | KVPolicy | None = None,
        budget: int | None = None,
        progress: ProgressFn | None = None,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        repetition_penalty: float = 1.0,
        question_ids: list[int] | None = None,
        dry_multiplier: float = 0.0,
        question_aware: bool = True,
    ) -> Generation:
        """Complete ``prompt`` (text or token ids) and return the whole :class:`Generation`.

        ``on_text`` receives each new piece of text as soon as it is decoded.
        ``question_ids``, ``question_aware``: the question, and whether eviction compresses for it (see :meth:`stream`).
        ``dry_multiplier``: the loop guard (see :class:`~longkv.engine.sampling.SamplingParams`;
        0.0, off, here; :meth:`ask` turns it on).

        Raises:
            LongKVError: empty prompt, bad sampling values, or a policy that cannot serve the input.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop), ignore_eos, repetition_penalty, dry_multiplier)
        res = Generation("", [], "length")
        pieces: list[str] = []
        for piece in self.stream(prompt, params, policy, budget, progress, res, question_ids, question_aware):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        res.text = "".join(pieces)
        return res

    def generate_batch(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] = (),
        policy: str | KVPolicy | None = None,
        budget: int | None = None,
        ignore_eos: bool = False,
        repetition_penalty: float = 1.0,
        question_ids: list[list[int]] | None = None,
        dry_multiplier: float = 0.0,
    ) -> list[Generation]:
        """Complete several prompts (text or token ids, any lengths) together; one Generation each.

        The prompts run on the step loop (:class:`~longkv.engine.engine.Engine`): up to
        ``max_num_seqs`` at once, each step one forward for all of them (decode tokens
        and prompt chunks), each with its own KV cache compressed under ``policy``; a
        sequence that stops (end of sequence, a stop string, ``max_new_tokens``) leaves
        the batch and the next prompt joins. Results are those of :meth:`generate` on
        each prompt alone (up to float rounding), sampling included: every prompt has
        its own generator seeded by ``seed``.
        ``stats.prefill_s`` is the batch's prefill time, shared by all, and
        ``stats.prefill_tok_s`` the batch's rate (``stats.batch_prompt_tokens`` prompt tokens in that time).
        ``stats.decode_tok_s`` is each sequence's own tokens over the wall time from its first token to its
        last: a step it shared with another prompt's prefill chunk counts whole, so a short prompt decoding
        beside a long prefill reports a low rate (the batch's steps, not its own work).

        ``question_ids``: one list per prompt for question-aware compression
        (see :meth:`stream`); ``None``: question-agnostic.

        Raises:
            LongKVError: no prompts, an empty prompt, ``question_ids`` not one per
                prompt, bad sampling values, or a policy that cannot serve the
                longest input.
        """
        if not prompts:
            raise LongKVError("no prompts: pass a list with at least one prompt")
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop), ignore_eos, repetition_penalty, dry_multiplier)
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)):
            raise LongKVError(f"prompts must be a list of prompts (texts or lists of token ids), got {type(prompts).__name__}: "
                              "e.g. generate_batch(['first prompt', 'second prompt'])")
        ids = [self._ids_of(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if any(not x for x in ids):
            raise LongKVError(f"prompt {next(i for i, x in enumerate(ids) if not x)} is empty: pass some text for every prompt")
        for x in ids:
            self.check_ids(x)
        if question_ids is not None and len(question_ids) != len(ids):
            raise LongKVError(f"question_ids has {len(question_ids)} entries for {len(ids)} prompts: pass one list per prompt (or none)")
        t0 = time.perf_counter()
        pol = self.resolve_policy(max(map(len, ids)) + max_new_tokens, policy, budget)
        reqs = [
            Request(x, params, pol, question_ids=question_ids[i] if question_ids is not None else None, arrival=t0)
            for i, x in enumerate(ids)
        ]
        outs: dict[str, RequestOutput] = {}
        texts: dict[str, list[str]] = {r.request_id: [] for r in reqs}
        for ev in self._run(reqs):
            texts[ev.request_id].append(ev.text)
            if ev.finished:
                outs[ev.request_id] = ev.output
        prefill_end = max(o.prefill_end for o in outs.values())
        gens = []
        for i, r in enumerate(reqs):
            g = Generation("".join(texts[r.request_id]), [], "length")
            _fill(g, outs[r.request_id], pol, self.decode_weights)
            g.stats.compression = _compression_label(pol, bool(question_ids and question_ids[i]))
            g.stats.prefill_s = prefill_end - t0  # the batch's prompts were prefilled together
            g.stats.batch_prompt_tokens = sum(map(len, ids))
            gens.append(g)
        return gens

    @property
    def ask_stop(self) -> tuple[str, ...]:
        """Stop strings of an answer to :meth:`ask_ids`: a base model (no chat template) that has answered
        tends to go on with a new ``### Question`` or a paragraph of made-up facts after a blank line; a chat
        model mostly ends its turn itself, but a small one may go on in the prompt's own framing (a
        ``### Answer`` header and a second answer), which no answer needs."""
        if getattr(self.tokenizer, "chat_template", None):
            return ("\n### Question", "\n### Answer", "\n### File: ")
        return ("\n### ", "\n\n")

    def ask_text(self, docs: list[Document], question: str) -> str:
        """The prompt text of a question about ``docs``, framed as ``longkv ask`` frames it.

        Every document under its name, the question last under ``### Question``
        (:func:`longkv.inputs.build_prompt`), in the model's chat template when it
        has one, else followed by ``### Answer`` for a base model to go on from.
        """
        text = build_prompt(docs, question)
        if getattr(self.tokenizer, "chat_template", None):
            return self.apply_chat_template([{"role": "user", "content": text}])
        return text + "\n### Answer\n"  # a base model: the answer is what the text goes on with

    def ask_ids(self, docs: list[Document], question: str) -> tuple[list[int], list[int]]:
        """Token ids of :meth:`ask_text`: (prompt ids, the question's ids: the question and the
        template's tail, the prompt's last tokens). Question-aware compression probes them;
        block_topk chooses its pages from their queries."""
        return self.question_tail(self.ask_text(docs, question), question)

    def question_tail(self, text: str, question: str) -> tuple[list[int], list[int]]:
        """(:meth:`prompt_ids` of ``text``, its last ids from the last occurrence of ``question`` on:
        the question and what follows it, e.g. the chat template's tail). The question must start a
        line (a token boundary). Raises ValueError when ``question`` is not in ``text``."""
        ids = self.prompt_ids(text)
        tail = self.encode(text[text.rindex(question.strip()) :])
        return ids, ids[-len(tail) :]

    def ask(
        self,
        source: str | os.PathLike[str] | list[str | os.PathLike[str]],
        question: str,
        question_aware: bool = True,
        **kwargs: Any,
    ) -> Generation:
        """Answer ``question`` about a long text, a file, or files and folders, as ``longkv ask`` does.

        Args:
            source: the text itself (``str``; a one-line str that names an existing file is refused), or a
                path (``pathlib.Path``) or a list of paths to files and folders (read recursively, text files only).
            question: what to ask; it is placed after the documents.
            question_aware: with an eviction policy that scores with queries, let the
                question choose what each chunk keeps (``False``: question-agnostic; block_topk
                chooses its pages from the question either way).
            kwargs: :meth:`generate` keyword arguments (``max_new_tokens``, ``policy``, ...);
                the loop guard is on unless ``dry_multiplier=0.0`` (default
                :data:`ASK_DRY_MULTIPLIER`: small models otherwise loop on long inputs).

        Raises:
            LongKVError: an empty question or text, a str that names a file, a missing path, or what
                :meth:`generate` raises.
        """
        if not question.strip():
            raise LongKVError("the question is empty: pass the question as the second argument")
        if isinstance(source, str):
            if not source.strip():
                raise LongKVError("the text is empty: pass the document's text, or a pathlib.Path to read a file")
            if len(source) < 4096 and "\n" not in source and os.path.exists(source.strip()):
                raise LongKVError(f"ask() reads a str as the text itself, and {source.strip()!r} names a file: pass "
                                  f"Path({source.strip()!r}) (or a list of paths) to read it")
            docs = [Document("<stdin>", source)]
        else:
            docs, _ = collect([os.fspath(p) for p in (source if isinstance(source, list) else [source])])
        ids, question_ids = self.ask_ids(docs, question)
        kwargs.setdefault("dry_multiplier", ASK_DRY_MULTIPLIER)
        kwargs.setdefault("stop", self.ask_stop)
        return self.generate(ids, question_ids=question_ids, question_aware=question_aware, **kwargs)

    def _ids_of(self, prompt: Any, what: str) -> list[int]:
        """Token ids of a prompt given as text or as token ids. Raises LongKVError for any other type."""
        if isinstance(prompt, str):
            return self.prompt_ids(prompt) if prompt else []
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise LongKVError(f"{what} must be text (a str) or a list of token ids, got {type(prompt).__name__}: e.g. generate('Hello')")

    def check_ids(self, ids: list[Any]) -> None:
        """Raise LongKVError for a token id that is not an int in the model's vocabulary."""
        v = self.config.vocab_size
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v), None)
        if bad is not None:
            raise LongKVError(f"token id {bad!r} is outside the vocabulary [0, {v}): pass ids the model's tokenizer gave")

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Generation:
        """Render ``messages`` with the chat template, then :meth:`generate` (same keyword arguments)."""
        if not isinstance(messages, (list, tuple)):
            raise LongKVError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}: "
                              "e.g. chat([{'role': 'user', 'content': 'Hello'}])")
        if not messages:
            raise LongKVError("no messages: pass at least one {'role': 'user', 'content': ...}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise LongKVError(
                    f"message {i} is not a chat message: pass {{'role': ..., 'content': '...'}} with a role of "
                    f"{', '.join(CHAT_ROLES)} and text content, got {m!r:.80}"
                )
        return self.generate(self.apply_chat_template(messages), **kwargs)


def _fill(res: Generation, out: RequestOutput, pol: KVPolicy, weights: str) -> None:
    """Copy a finished request's tokens, finish reason and costs into ``res``."""
    res.token_ids[:] = out.token_ids
    res.finish_reason = "stop" if out.finish_reason == "stop" else "length"
    st = res.stats
    st.prompt_tokens, st.generated_tokens = out.prompt_tokens, len(out.token_ids)
    st.policy = pol.describe() + (", prompt read densely" if out.dense_read else "")
    st.weights = weights
    st.prefill_s, st.ttft_s, st.decode_s = out.prefill_s, out.ttft_s, out.decode_s
    st.peak_kv_bytes, st.kv_disk_bytes = out.peak_kv_bytes, out.kv_disk_bytes
    if out.error is not None:
        raise out.error


def _leading_bos(tokenizer: Any) -> int | None:
    """The token the tokenizer puts before every text by default (its BOS), or None (it adds nothing)."""
    try:
        plain = list(tokenizer.encode("a", add_special_tokens=False))
        full = list(tokenizer.encode("a", add_special_tokens=True))
    except Exception:  # a tokenizer without the keyword: nothing to add
        return None
    lead = full[: len(full) - len(plain)] if full[len(full) - len(plain) :] == plain else []
    return int(lead[0]) if len(lead) == 1 else None


def check_weights(weights: str) -> str:
    """``weights`` itself when it names a decode weight format (``"auto"`` or :data:`DECODE_WEIGHTS`).

    Raises:
        LongKVError: another name.
    """
    if weights not in ("auto", *DECODE_WEIGHTS):
        raise LongKVError(f"unknown weights {weights!r}: use auto, {', '.join(DECODE_WEIGHTS)}")
    return weights


def auto_weights(dtype: str, weight_bits: dict[str, int]) -> str:
    """The decode weight format ``weights="auto"`` picks (see :class:`LLM`)."""
    if dtype != "bfloat16":
        return "none"
    proj = [b for name, b in weight_bits.items() if name.endswith("proj.weight")]
    if proj and max(proj) <= 4:
        return "int4"
    return "mixed" if proj and min(proj) <= 4 else "int8"


def _compression_label(pol: KVPolicy, aware: bool) -> str:
    """How an eviction policy scores (``Stats.compression``); empty for other policies."""
    if pol.budget_tokens is None:
        return ""
    if pol.reconstruct:
        return "question-agnostic (re-read)"
    if not pol.needs_queries:
        return ""
    return "question-aware" if aware else "question-agnostic"


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _dense_with_budget(budget: int) -> LongKVError:
    return LongKVError(
        f"a budget ({budget} tokens) was given with the dense policy, which keeps every token: drop the budget, "
        "or pick a policy that keeps one (e.g. snapkv or streaming)"
    )


def _is_dense(spec: str | KVPolicy) -> bool:
    return (isinstance(spec, str) and spec.split(":")[0].strip().lower() == "dense") or (
        isinstance(spec, KVPolicy) and spec.name == "dense"
    )
