"""Where a prefill and a decode step spend their time: torch.profiler's top operators by self time.

    python benchmarks/profile_step.py --model MODEL --device cuda --length 32768 --policy block_topk

Prefills ``--length`` book tokens in chunks of ``--chunk-size`` under ``--policy`` (after a warm-up), then decodes
``--steps`` greedy tokens; prints one table per phase (CPU self time, and device self time on CUDA).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparse_speed import BOOKS, book_ids, sync  # noqa: E402

from longkv import LLM  # noqa: E402
from longkv.engine.runner import Runner  # noqa: E402
from longkv.policies import make_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--policy", default="dense")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--books", type=Path, default=BOOKS)
    ap.add_argument("--rows", type=int, default=25, help="operators per table")
    args = ap.parse_args()
    llm = LLM(model=args.model, device=args.device, chunk_size=args.chunk_size)
    policy = make_policy(args.policy).resolve(llm.config, llm.engine_config)
    ids = book_ids(llm, args.length, args.books)
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    for warm in (True, False):
        runner = Runner(llm.model, policy, llm.engine_config)
        seq = runner.new_sequence(len(ids) + args.steps + 1)
        with profile(activities=acts) as prefill_prof:
            token = int(runner.prefill(seq, ids[:1024] if warm else ids).argmax())
            sync(args.device)
        with profile(activities=acts) as decode_prof:
            for _ in range(2 if warm else args.steps):
                token = int(runner.decode(seq, token).argmax())
            sync(args.device)
    for name, prof in (("prefill", prefill_prof), ("decode", decode_prof)):
        for key in ("self_cpu_time_total", *(["self_device_time_total"] if cuda else [])):
            print(f"\n== {name} of {args.length} tokens ({args.policy}, chunk {args.chunk_size}), by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
