"""Sparse attention kernel choice: gather + scaled_dot_product_attention against FlexAttention, CPU or CUDA.

block_topk's prefill chunk attends to the sink pages and its local window (and
the question to a few selected pages on top). Two ways to compute that:

* **gather + SDPA** (what ``longkv.attention.sparse.attend_pages`` does): copy
  the attended keys/values (sinks + selected pages + window + block, ~1.6 K
  tokens) next to each other and call
  ``torch.nn.functional.scaled_dot_product_attention``;
* **FlexAttention** (``torch.nn.attention.flex_attention``, compiled through
  ``torch.compile``: C++ on the CPU, a Triton kernel on CUDA): keep the whole
  cache in place and describe the pattern with a block mask, so blocks outside
  sinks + pages + window are skipped.

Dense SDPA over the whole cache is the reference. Shapes are SmolLM2-135M's
(9 query heads, 3 KV heads, head dim 64); one block of ``--block`` queries (512:
a prefill chunk; 1: a decode step) at the end of a context of N tokens, with
``--pages`` selected pages between the sinks and the window; milliseconds per
layer call (median of ``--repeat``, after a warm-up that includes compilation).
The block mask is built twice and the second build is timed.

    python benchmarks/flex_attention.py --lengths 2048 32768 131072 --out benchmarks/results/flex_attention.json
    python benchmarks/flex_attention.py --device cuda --lengths 32768 131072 1048576 --repeat 20 \
        --out benchmarks/results/flex_attention_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

H, HKV, D, SINKS, WINDOW, PAGE = 9, 3, 64, 64, 1024, 64


def timed(fn, repeat: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls, after one warm-up call."""
    fn()  # warm-up (and compile)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(n: int, dtype: torch.dtype, repeat: int, device: str, block: int, n_pages: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, block, D, generator=g).to(device, dtype)
    k = torch.randn(1, HKV, n, D, generator=g).to(device, dtype)
    v = torch.randn(1, HKV, n, D, generator=g).to(device, dtype)
    q0 = n - block  # first query's cache index
    w0 = max(SINKS, (q0 - WINDOW) // PAGE * PAGE)
    candidates = torch.arange(SINKS // PAGE, w0 // PAGE)
    pages = candidates[torch.randperm(candidates.numel(), generator=g)[:n_pages]].sort().values
    page_tok = (pages[:, None] * PAGE + torch.arange(PAGE)).flatten()
    idx = torch.cat((torch.arange(SINKS), page_tok, torch.arange(w0, n))).to(device)
    qpos = torch.arange(q0, n, device=device)
    selected = torch.zeros(n // PAGE + 1, dtype=torch.bool, device=device)
    selected[pages.to(device)] = True

    def gather() -> torch.Tensor:
        kk, vv = k[:, :, idx], v[:, :, idx]
        mask = idx[None, :] <= qpos[:, None]
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qa = qi + q0
        return (kv <= qa) & ((kv < SINKS) | (kv >= w0) | selected[kv // PAGE])

    def build() -> object:
        return create_block_mask(mask_mod, 1, 1, block, n, device=device, BLOCK_SIZE=PAGE if device == "cpu" else 128)

    build()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    block_mask = build()
    if device == "cuda":
        torch.cuda.synchronize()
    mask_ms = (time.perf_counter() - t0) * 1e3
    flex = torch.compile(flex_attention, dynamic=False)

    def flexed() -> torch.Tensor:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    def dense() -> torch.Tensor:
        mask = torch.arange(n, device=device)[None, :] <= qpos[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ref = gather().float()
    row: dict = {"n": n, "block": block, "pages": n_pages, "attended": int(idx.numel()),
                 "dtype": str(dtype).removeprefix("torch."), "device": device}
    row["gather_sdpa_ms"] = round(timed(gather, repeat, device), 3)
    try:
        row["flex_vs_gather_max_abs_diff"] = (flexed().float() - ref).abs().max().item()
        row["flex_ms"] = round(timed(flexed, repeat, device), 3)
        row["flex_block_mask_ms"] = round(mask_ms, 3)
    except Exception as e:
        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row["dense_sdpa_ms"] = round(timed(dense, repeat, device), 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 32768, 131072])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[512], help="queries per call: 512 = a prefill chunk, 1 = decode")
    ap.add_argument("--pages", type=int, default=0, help="selected pages attended besides sinks and window")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (fix: install a CUDA build of torch, or use --device cpu)")
    torch.set_num_threads(args.threads)
    # Every (length, block, dtype) is a new shape and a new mask function: let dynamo keep them all
    # compiled instead of falling back to eager FlexAttention after its default 8 recompiles.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    rows = []
    print(f"{'tokens':>8} {'block':>5} {'dtype':>9} {'gather+SDPA ms':>15} {'Flex ms':>9} {'(mask ms)':>10} "
          f"{'dense SDPA ms':>14} {'max |diff|':>10}")
    for n in args.lengths:
        for blk in args.blocks:
            for dt in args.dtypes:
                r = run(n, getattr(torch, dt), args.repeat, args.device, blk, args.pages)
                rows.append(r)
                print(f"{n:>8} {blk:>5} {r['dtype']:>9} {r['gather_sdpa_ms']:>15} {r.get('flex_ms', 'n/a'):>9} "
                      f"{r.get('flex_block_mask_ms', 'n/a'):>10} {r['dense_sdpa_ms']:>14} "
                      f"{r.get('flex_vs_gather_max_abs_diff', float('nan')):>10.2e} {r.get('flex_error', '')}", flush=True)
                if args.out:  # written after every row: a killed run keeps what it measured
                    meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads,
                            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
                    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
