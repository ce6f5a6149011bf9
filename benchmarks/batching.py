"""Batching benchmark: aggregate decode tokens/s with N concurrent sequences, and TTFT behind a long prefill.

Runs the step loop (``longkv.engine.engine.Engine``) in process, the way the
server's engine thread does, so the numbers are the engine's, not HTTP's:

* **decode**: N requests of ``--prompt-tokens`` book tokens each (different
  passages: no shared prefix) and ``--new-tokens`` greedy tokens (EOS ignored),
  added together; once every request has its first token, the steps until the
  last one finishes are timed: aggregate decode tokens/s = tokens generated in
  that window / its seconds. N = 1 is the single-stream figure; each row prints
  its ratio to it, the bytes a step reads (weights once + every sequence's KV)
  and the GB/s that makes.
* **ttft**: a ``--short-tokens`` request sent while a ``--long-tokens`` prompt is
  prefilling (after its first chunk): its TTFT against the time of one prefill
  chunk and against the long prompt's whole prefill.
* **sharing**: one ``--doc-tokens`` document in the prefix cache (the radix tree
  over the page pool, as ``longkv serve`` keeps it), then 1 and ``--sessions``
  sessions each asking their own question about it at once: resident KV (pool
  pages held, a shared page once) and process RSS at their peak; and the time to
  attach a ``--attach-tokens`` cached prefix to a new sequence (median of 20).

Prints tables and writes JSON (``--out``). Example::

    python benchmarks/batching.py --model $(../shared/models/get-model smollm2-135m) --clients 1,2,4,8 \\
        --out benchmarks/results/batching-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longkv import LLM  # noqa: E402
from longkv.engine.engine import Engine, Request  # noqa: E402
from longkv.engine.runner import Runner  # noqa: E402
from longkv.engine.sampling import SamplingParams  # noqa: E402
from longkv.kv.radix import PrefixCache  # noqa: E402
from longkv.policies import DensePolicy  # noqa: E402

BOOK = ROOT.parent / "shared" / "data" / "books" / "moby-dick.txt"


def passages(llm: LLM, n: int, tokens: int) -> list[list[int]]:
    """``n`` prompts of ``tokens`` tokens from different parts of a book."""
    ids = llm.encode(BOOK.read_text()[20_000:])
    assert len(ids) >= n * tokens, "the book is too short for that many prompts"
    return [ids[i * tokens : (i + 1) * tokens] for i in range(n)]


def weight_bytes(llm: LLM) -> int:
    """Bytes a decode step reads from the weights (the int8/int4 copies where the model keeps them)."""
    total = 0
    for layer in llm.model.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            total += lin.decode_bytes()
    head = llm.model.lm_head
    total += head.decode_bytes()
    return total


def run_decode(llm: LLM, n: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    engine = Engine(llm.model, llm.tokenizer, llm.eos_ids, llm.engine_config, max_num_seqs=max(n, 1))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for p in passages(llm, n, prompt_tokens):
        engine.add_request(Request(p, params, DensePolicy()))
    started: set[str] = set()
    t_all = 0.0
    window_tokens = 0
    steps = 0
    while engine.has_unfinished():
        events = engine.step()
        if len(started) == n:
            window_tokens += sum(1 for e in events if e.token_id is not None)
            steps += 1
        for e in events:
            started.add(e.request_id)
        if len(started) == n and not t_all:
            t_all = time.perf_counter()
    seconds = time.perf_counter() - t_all
    kv_per_token = 2 * llm.config.n_layers * llm.config.n_kv_heads * llm.config.head_dim * 2  # bfloat16
    mean_ctx = prompt_tokens + new_tokens / 2
    step_bytes = weight_bytes(llm) + n * mean_ctx * kv_per_token
    tok_s = window_tokens / seconds
    return {
        "clients": n,
        "decode_tok_s": round(tok_s, 1),
        "step_ms": round(1000 * seconds / max(steps, 1), 2),
        "bytes_per_step": int(step_bytes),
        "gb_s": round(step_bytes * (steps / seconds) / 1e9, 2),
        "tokens": window_tokens,
        "seconds": round(seconds, 2),
    }


def run_ttft(llm: LLM, long_tokens: int, short_tokens: int) -> dict[str, Any]:
    engine = Engine(llm.model, llm.tokenizer, llm.eos_ids, llm.engine_config)
    long_ids, short_ids = passages(llm, 2, long_tokens)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    long_req = Request(long_ids, params, DensePolicy())
    engine.add_request(long_req)
    chunk_times: list[float] = []
    t = time.perf_counter()
    engine.step()  # the first chunk of the long prompt
    chunk_times.append(time.perf_counter() - t)
    short_req = Request(short_ids[:short_tokens], params, DensePolicy())
    engine.add_request(short_req)
    ttft = long_done = 0.0
    while engine.has_unfinished():
        t = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t
        for e in events:
            if e.request_id == short_req.request_id and not ttft:
                ttft = e.output.ttft_s
            if e.request_id == long_req.request_id and not long_done:
                long_done = e.output.prefill_s
        if not ttft:
            chunk_times.append(dt)
    chunk = statistics.median(chunk_times)
    return {
        "long_tokens": long_tokens,
        "short_tokens": short_tokens,
        "short_ttft_s": round(ttft, 3),
        "chunk_s": round(chunk, 3),
        "ttft_in_chunks": round(ttft / chunk, 2),
        "long_prefill_s": round(long_done, 2),
    }


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def run_sharing(llm: LLM, doc_tokens: int, sessions: int, new_tokens: int, attach_tokens: int) -> dict[str, Any]:
    engine = Engine(llm.model, llm.tokenizer, llm.eos_ids, llm.engine_config, max_num_seqs=sessions)
    runner = Runner(llm.model, DensePolicy(), llm.engine_config, engine.pools)
    text = llm.encode(BOOK.read_text()[300_000:])
    doc = text[: max(doc_tokens, attach_tokens)]
    questions = [llm.encode(f" Question {i}: who speaks in paragraph {i + 1}? Answer:") for i in range(sessions)]
    tree = PrefixCache(1 << 34)
    seq = runner.new_sequence()
    runner.prefill(seq, doc)
    tree.insert("bench", doc, seq.cache)
    seq.cache.clear()
    attach = []
    for _ in range(20):
        t = time.perf_counter()
        m = tree.match("bench", doc[:attach_tokens])
        warm = runner.new_sequence()
        tree.load(m, warm.cache, m.length)
        attach.append(time.perf_counter() - t)
        assert m.length == attach_tokens
        warm.cache.clear()
    tree.clear()
    doc = doc[:doc_tokens]
    seq = runner.new_sequence()
    runner.prefill(seq, doc)
    tree.insert("bench", doc, seq.cache)
    seq.cache.clear()
    doc_kv = engine.pools.used_bytes()  # the document's pages, held by the tree alone
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def serve(n: int) -> tuple[int, int, float]:
        for q in questions[:n]:
            warm = runner.new_sequence()
            m = tree.match("bench", doc + q)
            tree.load(m, warm.cache, m.length)
            warm.tokens = list(doc[: m.length])
            engine.add_request(Request(doc + q, params, DensePolicy(), sequence=warm))
        peak_kv = peak_rss = 0
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            peak_kv, peak_rss = max(peak_kv, engine.pools.used_bytes()), max(peak_rss, rss_bytes())
        return peak_kv, peak_rss, time.perf_counter() - t

    serve(1)  # warm-up
    kv1, rss1, s1 = serve(1)
    kvn, rssn, sn = serve(sessions)
    per_token = 2 * llm.config.n_layers * llm.config.n_kv_heads * llm.config.head_dim * 2
    return {
        "doc_tokens": doc_tokens,
        "sessions": sessions,
        "kv_doc_mb": round(doc_kv / 1e6, 1),
        "kv_one_mb": round(kv1 / 1e6, 1),
        "kv_all_mb": round(kvn / 1e6, 1),
        "kv_unshared_mb": round(sessions * (doc_tokens + 20 + new_tokens) * per_token / 1e6, 1),
        "rss_one_mb": round(rss1 / 1e6, 1),
        "rss_all_mb": round(rssn / 1e6, 1),
        "rss_ratio": round(rssn / rss1, 3),
        "seconds_one": round(s1, 2),
        "seconds_all": round(sn, 2),
        "attach_tokens": attach_tokens,
        "attach_ms": round(1000 * statistics.median(attach), 3),
    }


def main() -> None:
    global BOOK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file or HF folder")
    ap.add_argument("--clients", default="1,2,4,8", help="comma-separated numbers of concurrent sequences")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--long-tokens", type=int, default=7168, help="the long prompt of the TTFT test (0: skip it)")
    ap.add_argument("--short-tokens", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=8, help="sessions sharing one document (0: skip the sharing test)")
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--attach-tokens", type=int, default=6144, help="cached prefix whose attach time is measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="auto", help="decode weights: auto, int4, int8, none")
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--book", type=Path, default=BOOK, help="the .txt file prompts are cut from")
    args = ap.parse_args()

    BOOK = args.book
    llm = LLM(args.model, threads=args.threads, weights=args.weights, device=args.device)
    print(f"{llm.source}: {llm.config.arch}, {llm.config.n_layers} layers, torch {torch.__version__}, {args.threads} threads")
    run_decode(llm, 1, 256, 8)  # warm-up
    rows = []
    for n in [int(x) for x in args.clients.split(",") if x]:
        rows.append(run_decode(llm, n, args.prompt_tokens, args.new_tokens))
        print(f"  {n} clients: {rows[-1]['decode_tok_s']} tok/s", flush=True)
    base = rows[0]["decode_tok_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\naggregate decode, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each (greedy)")
    print("| clients | decode tok/s | vs 1 client | ms per step | MB read per step | GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['clients']} | {r['decode_tok_s']} | {ratio} | {r['step_ms']} | {r['bytes_per_step'] / 1e6:.0f} | {r['gb_s']} |")
    ttft = run_ttft(llm, args.long_tokens, args.short_tokens) if args.long_tokens else None
    if ttft:
        print(f"\nTTFT of a {ttft['short_tokens']}-token request sent while a {ttft['long_tokens']}-token prompt prefills:")
        print(f"  {ttft['short_ttft_s']} s = {ttft['ttft_in_chunks']} prefill chunks ({ttft['chunk_s']} s each); "
              f"the long prompt's whole prefill: {ttft['long_prefill_s']} s")  # fmt: skip
    sharing = run_sharing(llm, args.doc_tokens, args.sessions, 32, args.attach_tokens) if args.sessions else None
    if sharing:
        sh = sharing
        print(f"\n{sh['sessions']} sessions sharing one {sh['doc_tokens']}-token document (prefix cache, 32 new tokens each):")
        print(f"  resident KV (the document's pages + the sessions' own): {sh['kv_doc_mb']} MB cached, "
              f"{sh['kv_one_mb']} MB with 1 session, {sh['kv_all_mb']} MB with {sh['sessions']} "
              f"(unshared copies would be {sh['kv_unshared_mb']} MB); process RSS {sh['rss_one_mb']} -> {sh['rss_all_mb']} MB "
              f"({sh['rss_ratio']}x)")  # fmt: skip
        print(f"  attaching a cached {sh['attach_tokens']}-token prefix to a new sequence: {sh['attach_ms']} ms (median of 20)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": str(llm.source), "weights": llm.decode_weights, "threads": args.threads, "device": args.device, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        result = {"meta": meta, "decode": rows, "ttft": ttft, "sharing": sharing}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
