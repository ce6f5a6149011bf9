"""Prefill and decode throughput at several context lengths: longkv vs transformers vs llama.cpp.

Same machine, same GGUF file, same thread count, one run. For each context length L:

* prefill tokens/s: time to process an L-token prompt (book text) from an empty cache;
* decode tokens/s: single-token steps right after that prefill (context L .. L + steps);
* for longkv and llama.cpp, the bytes each decode token reads (weights as each engine
  stores them + the KV cache) and the implied GB/s, against a streaming-read probe of
  this machine (the sum of a 512 MiB tensor, median of 7 at the start and of 3 before
  every row; the best reading counts, since other tenants of the machine move it), so
  the distance to the hardware limit is visible.

Seeded, one warm-up per engine, median of ``--repeats`` runs. Prints a table with
ratios and writes JSON.

    python benchmarks/throughput.py --lengths 512,2048,8192 --out runs/throughput.json

``--kv-quant int8`` compares int8 caches: longkv's int8 pages (read as codes by its decode
kernel) against llama.cpp's q8_0 cache (with flash attention, which a quantized cache needs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longkv import LLM  # noqa: E402
from longkv.engine.runner import Runner  # noqa: E402
from longkv.kv.cache import page_format  # noqa: E402
from longkv.policies import DensePolicy  # noqa: E402

Timing = tuple[float, float]  # (prefill tok/s, decode tok/s)


def book_ids(llm: LLM, n: int) -> list[int]:
    """n token ids of real text (../shared books, or this file's own source repeated when absent)."""
    books = ROOT.parent / "shared" / "data" / "books"
    text = "".join(p.read_text() for p in sorted(books.glob("*.txt"))[:2]) if books.exists() else Path(__file__).read_text() * 200
    ids = llm.encode(text)
    assert len(ids) >= n, "not enough text"
    return ids[:n]


def median_of(fn: Callable[[], Timing], repeats: int) -> Timing:
    runs = [fn() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# ---------------------------------------------------------------------------------- engines


def run_longkv(llm: LLM, ids: list[int], steps: int, kv_quant: str = "none") -> Timing:
    runner = Runner(llm.model, DensePolicy(kv_quant=kv_quant), llm.engine_config)
    seq = runner.new_sequence(len(ids) + steps + 1)
    t0 = time.perf_counter()
    logits = runner.prefill(seq, ids)
    t1 = time.perf_counter()
    token = int(logits.argmax())
    t2 = time.perf_counter()
    for _ in range(steps):
        token = int(runner.decode(seq, token).argmax())
    t3 = time.perf_counter()
    return len(ids) / (t1 - t0), steps / (t3 - t2)


def make_transformers(gguf: Path, threads: int) -> Callable[[list[int], int], Timing]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    @torch.inference_mode()
    def run(ids: list[int], steps: int) -> Timing:
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        t1 = time.perf_counter()
        past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        t2 = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        t3 = time.perf_counter()
        return len(ids) / (t1 - t0), steps / (t3 - t2)

    return run


def make_llama_cpp(gguf: Path, threads: int, n_ctx: int, kv_quant: str = "none") -> Callable[[list[int], int], Timing]:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    # an int8 cache is llama.cpp's q8_0 (34 bytes per 32 values); its quantized V cache needs flash attention
    kv = {"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True} if kv_quant == "int8" else {}
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False, **kv)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # logits of the last evaluated token, read in place
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    def run(ids: list[int], steps: int) -> Timing:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        token = last_argmax()
        t2 = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = last_argmax()
        t3 = time.perf_counter()
        return len(ids) / (t1 - t0), steps / (t3 - t2)

    return run


# ---------------------------------------------------------------------------------- memory model


def decode_bytes_per_token(llm: LLM, context: int, kv_quant: str = "none") -> int:
    """Bytes a longkv decode step reads: the matrices it multiplies (int8 copies when enabled) + the KV cache
    (int8 pages: a code per value and a float16 step and minimum per 32)."""
    m = llm.model
    mats = [lin for layer in m.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [m.lm_head]
    weights = sum(lin.decode_bytes() for lin in mats)
    c = llm.config
    per_token = page_format(c.head_dim, m.dtype, kv_quant).bytes_per_slot(c.n_kv_heads) - 8  # every plane, not the position
    return weights + kv_tokens(llm, context) * per_token


def kv_tokens(llm: LLM, context: int) -> int:
    """Cached tokens a step reads, summed over layers: a sliding layer (Gemma 3) holds only its window."""
    return sum(min(context, spec.window) if spec.window is not None else context for spec in llm.config.layers)


def gguf_bytes_per_token(gguf: Path, llm: LLM, context: int, kv_quant: str = "none") -> int:
    """Bytes a llama.cpp decode step reads: the file's matrices as stored (the embedding only where it is
    also the LM head) + an f16 KV cache (q8_0 for an int8 cache: 34 bytes per 32 values)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(gguf).tensors}
    head = tensors.get("output.weight", tensors.get("token_embd.weight", 0))
    weights = sum(n for name, n in tensors.items() if name.startswith("blk.")) + head
    c = llm.config
    return weights + int(kv_tokens(llm, context) * 2 * c.n_kv_heads * c.head_dim * (2 if kv_quant == "none" else 34 / 32))


def bandwidth_probe(threads: int, repeats: int = 7) -> float:
    """GB/s of a streaming read on this machine: the sum of a 512 MiB float32 tensor, median of ``repeats``."""
    torch.set_num_threads(threads)
    big = torch.ones(128 * 1024 * 1024)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - t0)
    return big.nbytes / statistics.median(times[1:]) / 1e9


def main() -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2-135M-Instruct test model)")
    ap.add_argument("--lengths", default="512,2048,8192", help="context lengths in tokens, comma-separated")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell (median); 1 for lengths >= 8192")
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine")
    ap.add_argument("--engines", default="longkv,transformers,llama.cpp", help="which engines to run")
    ap.add_argument("--dtype", default="bfloat16", help="longkv compute dtype")
    ap.add_argument("--weights", default="auto", help="longkv decode weights: auto, int4, int8, mixed, none")
    ap.add_argument("--kv-quant", default="none", choices=["none", "int8"],
                    help="KV cache: none (bfloat16 / f16) or int8 (longkv's int8 pages, llama.cpp's q8_0 cache with flash attention)")
    ap.add_argument("--out", default="runs/throughput.json", help="JSON results (relative to the current folder)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model:
        gguf = Path(args.model)
    else:
        from longkv.loading import fetch_default_model

        gguf = fetch_default_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    engines = args.engines.split(",")
    llm = LLM(model=gguf, dtype=args.dtype, threads=args.threads, weights=args.weights)
    ids_all = book_ids(llm, max(lengths))
    runners: dict[str, Callable[[list[int], int], Timing]] = {"longkv": lambda ids, s: run_longkv(llm, ids, s, args.kv_quant)}
    if "transformers" in engines and args.kv_quant == "none":
        runners["transformers"] = make_transformers(gguf, args.threads)
    if "llama.cpp" in engines:
        runners["llama.cpp"] = make_llama_cpp(gguf, args.threads, max(lengths) + args.steps + 16, args.kv_quant)
    runners = {k: v for k, v in runners.items() if k in engines}

    # The probe runs again before every row: the cores share the machine's memory with other tenants, so
    # one reading can be far from what they stream at another moment. The run's bandwidth is the best
    # reading (the fractions are then the most conservative ones the run supports); every reading is kept.
    probes = [bandwidth_probe(args.threads)]
    print(f"streaming read: {probes[0]:.1f} GB/s ({args.threads} threads)", file=sys.stderr)
    for name, fn in runners.items():  # warm-up: allocator, kernels, caches
        print(f"warm-up {name} ...", file=sys.stderr)
        fn(ids_all[:256], 4)

    results: list[dict[str, object]] = []
    for length in lengths:
        ids = ids_all[:length]
        reps = args.repeats if length < 8192 else 1
        for name, fn in runners.items():
            probes.append(bandwidth_probe(args.threads, repeats=3))
            print(f"{name} @ {length} tokens (streaming read {probes[-1]:.1f} GB/s) ...", file=sys.stderr)
            pre, dec = median_of(lambda fn=fn, ids=ids: fn(ids, args.steps), reps)
            row: dict[str, object] = {"engine": name, "context": length, "prefill_tok_s": round(pre, 1), "decode_tok_s": round(dec, 1)}
            b = (
                decode_bytes_per_token(llm, length, args.kv_quant) if name == "longkv"
                else gguf_bytes_per_token(gguf, llm, length, args.kv_quant) if name == "llama.cpp" else 0
            )  # fmt: skip
            if b:
                row["decode_bytes_per_token"] = b
                row["decode_GB_s"] = round(b * dec / 1e9, 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    bw = max(probes)
    for row in results:
        if "decode_GB_s" in row:
            row["bandwidth_fraction"] = round(float(row["decode_GB_s"]) / bw, 3)  # type: ignore[arg-type]

    meta = {
        "model": str(gguf),
        "threads": args.threads,
        "longkv_dtype": args.dtype,
        "longkv_weights": llm.decode_weights,
        "kv_quant": args.kv_quant,
        "steps": args.steps,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "streaming_read_GB_s": round(bw, 2),  # the best of the probe's readings
        "streaming_read_readings_GB_s": [round(p, 2) for p in probes],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print_table(results)
    print(f"\nbytes read per decode token, GB/s achieved and the fraction of the streaming read (the best of {len(probes)} "
          f"readings, {min(probes):.1f}-{bw:.1f} GB/s: {bw:.1f} GB/s):\n")
    print("| context | engine | MB per token | GB/s | of bandwidth |\n|---|---|---|---|---|")
    for r in results:
        if "decode_GB_s" in r:
            print(f"| {r['context']} | {r['engine']} | {int(r['decode_bytes_per_token']) / 1e6:.0f} | {r['decode_GB_s']} | {100 * float(r['bandwidth_fraction']):.0f} % |")  # type: ignore[call-overload, arg-type]
    print(f"\nwrote {out}")


def print_table(results: list[dict[str, object]]) -> None:
    """Markdown table: one row per context length, ratios of longkv against each competitor."""
    by = {(r["engine"], r["context"]): r for r in results}
    engines = sorted({str(r["engine"]) for r in results}, key=lambda e: (e != "longkv", e))
    lengths = sorted({int(r["context"]) for r in results})  # type: ignore[call-overload]
    head = ["context"] + [f"{e} prefill" for e in engines] + [f"{e} decode" for e in engines]
    others = [e for e in engines if e != "longkv"]
    head += [f"prefill x {e}" for e in others] + [f"decode x {e}" for e in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n in lengths:
        cells = [str(n)]
        cells += [f"{by[(e, n)]['prefill_tok_s']}" if (e, n) in by else "-" for e in engines]
        cells += [f"{by[(e, n)]['decode_tok_s']}" if (e, n) in by else "-" for e in engines]
        for key in ("prefill_tok_s", "decode_tok_s"):
            for e in others:
                if ("longkv", n) in by and (e, n) in by:
                    cells.append(f"{float(by[('longkv', n)][key]) / float(by[(e, n)][key]):.2f}x")  # type: ignore[arg-type]
                else:
                    cells.append("-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
