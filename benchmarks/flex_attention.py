"""Sparse prefill kernel choice: gather + scaled_dot_product_attention against FlexAttention.

block_topk's prefill chunk attends to the sink pages and its local window (and
the question to a few selected pages on top). Two ways to compute that:

* **gather + SDPA** (what ``longkv.attention.sparse.attend_pages`` does): copy
  the attended keys/values (sinks + window + chunk, ~1.6 K tokens) next to each
  other and call ``torch.nn.functional.scaled_dot_product_attention``;
* **FlexAttention** (``torch.nn.attention.flex_attention``, compiled through
  ``torch.compile``): keep the whole cache in place and describe the pattern
  with a block mask, so blocks outside sinks + window are skipped.

Dense SDPA over the whole cache is the reference. Shapes are SmolLM2-135M's
(9 query heads, 3 KV heads, head dim 64); one 512-token chunk at the end of a
context of N tokens; milliseconds per layer call (median of ``--repeat``).

    python benchmarks/flex_attention.py --lengths 2048 32768 131072 --out benchmarks/results/flex_attention.json
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

H, HKV, D, SINKS, WINDOW, CHUNK, PAGE = 9, 3, 64, 64, 1024, 512, 64


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(n: int, dtype: torch.dtype, repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, CHUNK, D, generator=g).to(dtype)
    k = torch.randn(1, HKV, n, D, generator=g).to(dtype)
    v = torch.randn(1, HKV, n, D, generator=g).to(dtype)
    q0 = n - CHUNK  # first query's cache index
    w0 = max(SINKS, (q0 - WINDOW) // PAGE * PAGE)

    def gather() -> torch.Tensor:
        idx = torch.cat((torch.arange(SINKS), torch.arange(w0, n)))
        kk, vv = k[:, :, idx], v[:, :, idx]
        qpos = torch.arange(q0, n)
        mask = idx[None, :] <= qpos[:, None]
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=True)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qa = qi + q0
        return (kv <= qa) & ((kv < SINKS) | (kv >= w0))

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, 1, 1, CHUNK, n, device="cpu", BLOCK_SIZE=PAGE)
    mask_ms = (time.perf_counter() - t0) * 1e3
    flex = torch.compile(flex_attention, dynamic=False)

    def flexed() -> torch.Tensor:
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    def dense() -> torch.Tensor:
        qpos = torch.arange(q0, n)
        mask = torch.arange(n)[None, :] <= qpos[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    ref = gather().float()
    err = (flexed().float() - ref).abs().max().item()
    row = {"n": n, "dtype": str(dtype).removeprefix("torch."), "gather_sdpa_ms": round(timed(gather, repeat), 2),
           "flex_ms": round(timed(flexed, repeat), 2), "flex_block_mask_ms": round(mask_ms, 2),
           "dense_sdpa_ms": round(timed(dense, repeat), 2), "flex_vs_gather_max_abs_diff": err}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 32768, 131072])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'tokens':>8} {'dtype':>9} {'gather+SDPA ms':>15} {'Flex ms':>9} {'(mask ms)':>10} {'dense SDPA ms':>14} {'max |diff|':>10}")
    for n in args.lengths:
        for dt in args.dtypes:
            r = run(n, getattr(torch, dt), args.repeat)
            rows.append(r)
            print(f"{n:>8} {r['dtype']:>9} {r['gather_sdpa_ms']:>15} {r['flex_ms']:>9} {r['flex_block_mask_ms']:>10} "
                  f"{r['dense_sdpa_ms']:>14} {r['flex_vs_gather_max_abs_diff']:>10.2e}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
