"""NVIDIA kvpress on the same needle samples as ``compression.py``, for the methods both have.

kvpress (https://github.com/NVIDIA/kvpress) runs on Hugging Face
``transformers``; it needs ``transformers<5.3``, so it lives in its own
virtual environment, which this script builds on first use (``--venv``).
The model is the same GGUF file, dequantized by ``transformers``; the samples
(context, question, answer prefix) are those ``compression.py --dump-samples``
wrote, so every cell compares like with like. kvpress's pipeline prefills the
whole context in one forward and compresses each layer's KV right after it
(``compression_ratio`` = share removed, so keep-ratio 25 % is 0.75);
question-aware puts the question inside the compressed context, as kvpress
documents.

    python benchmarks/compression.py --length 4096 --samples 20 --dump-samples /tmp/samples.json
    python benchmarks/kvpress_compare.py --samples-file /tmp/samples.json \
        --presses snapkv@question-aware,expected_attention@question-agnostic \
        --out benchmarks/results/kvpress-smollm2-4k.json

Rows use the method names of ``compression.py`` prefixed ``kvpress:``, so
``compression.py --report a.json,b.json`` puts both in one table and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ["torch==2.13.0", "transformers>=4.56,<5.3", "kvpress==0.5.5", "accelerate", "gguf", "sentencepiece"]


def ensure_venv(venv: Path) -> None:
    """Re-run this script inside ``venv`` (created with kvpress on first use) unless already there."""
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} with {' '.join(REQUIREMENTS)} (a few minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    os.execv(str(py), [str(py), *sys.argv])


def make_press(method: str, ratio: float):  # type: ignore[no-untyped-def]
    """The kvpress press for one of our method names at keep-ratio ``ratio`` (``dense``: none)."""
    import kvpress

    if method == "dense":
        return None

    cr = 1.0 - ratio
    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=cr),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=cr),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=cr),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=cr),
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=cr),
        "random": lambda: kvpress.RandomPress(compression_ratio=cr, seed=0),
        "pyramid": lambda: kvpress.PyramidKVPress(compression_ratio=cr),
        "adakv": lambda: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=cr)),
        "kvzip": lambda: kvpress.KVzipPress(compression_ratio=cr),
    }
    if method not in presses:
        raise SystemExit(f"no kvpress press for {method!r}: choose from {', '.join(presses)}")
    return presses[method]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples-file", type=Path, required=True, help="JSON written by compression.py --dump-samples")
    ap.add_argument("--presses", default="snapkv@question-aware", help="method@mode pairs, comma-separated")
    ap.add_argument("--ratios", default="0.5,0.25,0.1", help="keep-ratios (dense@question-agnostic runs at 1.0 only)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-kvpress")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kvpress.json")
    ap.add_argument("--rss", default="", help="instead: peak RSS of one SnapKV (25 %% kept, question-aware) answer per context length, e.g. 4096,16384, each in a fresh process")
    ap.add_argument("--rss-one", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.samples_file.exists():
        raise SystemExit(f"no samples file {args.samples_file}: write one with compression.py --dump-samples")
    ensure_venv(args.venv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)

    torch.set_num_threads(args.threads)
    data = json.loads(args.samples_file.read_text())
    if args.rss:  # parent: one fresh process per length
        rows = []
        for n in (int(x) for x in args.rss.split(",")):
            cmd = [sys.executable, __file__, "--samples-file", str(args.samples_file), "--venv", str(args.venv), "--threads", str(args.threads), "--dtype", args.dtype, f"--rss-one={n}"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
        return
    gguf = Path(data["meta"]["model_path"])
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, args.dtype)).eval()
    # some presses (KVzip) reload the tokenizer from the model's name: point it at a saved copy
    import tempfile

    tokdir = tempfile.mkdtemp(prefix="kvpress-tokenizer-")
    tok.save_pretrained(tokdir)
    model.config.name_or_path = tokdir
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    if args.rss_one:  # child: the first sample's text stretched to --rss-one tokens
        s = data["samples"][0]
        book = (ROOT.parent / "shared" / "data" / "books" / data["meta"]["book"]).read_text()
        filler = tok.decode(tok.encode(book)[: args.rss_one])
        context = filler[: len(filler) // 2] + s["context"][-2000:] + filler[len(filler) // 2 :]
        n = len(tok.encode(context))
        t0 = time.perf_counter()
        out = pipe(context + "\n\n" + s["question"], question="", answer_prefix=s["answer_prefix"], press=make_press("snapkv", 0.25), max_new_tokens=4)
        print(json.dumps({"tool": "kvpress", "policy": "SnapKVPress(compression_ratio=0.75)", "tokens": n, "seconds": round(time.perf_counter() - t0, 1),
                          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "answer": out["answer"]}))
        return
    rows: list[dict] = []
    pairs = [tuple(p.split("@")) for p in args.presses.split(",")]
    failed: dict[str, str] = {}
    for method, mode in pairs:
        for ratio in [1.0] if method == "dense" else [float(r) for r in args.ratios.split(",")]:
            for s in data["samples"]:
                if method in failed:
                    break
                press = make_press(method, ratio)
                t0 = time.perf_counter()
                try:
                    if mode == "question-aware":  # the question is part of what is compressed
                        out = pipe(s["context"] + "\n\n" + s["question"], question="", answer_prefix=s["answer_prefix"], press=press, max_new_tokens=6)
                    else:
                        out = pipe(s["context"], question="\n\n" + s["question"], answer_prefix=s["answer_prefix"], press=press, max_new_tokens=6)
                except Exception as exc:  # a press that breaks on this model: say so, go on with the others
                    failed[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    print(f"kvpress:{method} failed on this model, skipped: {failed[method]}", flush=True)
                    break
                text = out["answer"]
                rows.append({
                    "method": "kvpress:dense" if method == "dense" else f"kvpress:{method}", "ratio": ratio, "mode": mode, "seed": s["seed"], "correct": s["answer"] in text,
                    "text": text, "seconds": round(time.perf_counter() - t0, 2),
                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                })
            if method in failed:
                break
            acc = 100.0 * sum(r["correct"] for r in rows[-len(data["samples"]) :]) / len(data["samples"])
            print(f"kvpress:{method:18s} {mode:18s} {ratio:5.2f}: {acc:5.1f} %", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": data["meta"], "rows": rows, "failed": failed}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": data["meta"], "rows": rows, "failed": failed}, indent=1))


if __name__ == "__main__":
    main()
