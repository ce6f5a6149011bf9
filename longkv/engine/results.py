"""What a generation returns: the text with its token ids (:class:`Generation`) and what it cost (:class:`Stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """What one generation cost. Times in seconds, memory in bytes."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    peak_kv_bytes: int = 0
    kv_disk_bytes: int = 0  # KV pages in a disk tier (block_topk with resident=...)
    policy: str = ""
    weights: str = ""  # the weights decode steps read: int4, int8 or none
    compression: str = ""  # how an eviction policy scored: question-aware, question-agnostic, or re-read (KVzip)
    batch_prompt_tokens: int = 0  # generate_batch: prompt tokens of the whole batch, prefilled together in prefill_s

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of prefill (of the whole batch, for a sequence of a batch)."""
        tokens = self.batch_prompt_tokens or self.prompt_tokens
        return tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second after the first one."""
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def line(self) -> str:
        """One human-readable line."""
        return (
            f"prompt {self.prompt_tokens} tokens | prefill {self.prefill_tok_s:.0f} tok/s"
            + (f" (batch of {self.batch_prompt_tokens} tokens)" if self.batch_prompt_tokens else "")
            + " | "
            f"TTFT {self.ttft_s:.2f} s | {self._decode_part()} | "
            f"peak KV {_fmt_bytes(self.peak_kv_bytes)}"
            + (f" (+ {_fmt_bytes(self.kv_disk_bytes)} on disk)" if self.kv_disk_bytes else "")
            + (f" | weights {self.weights}" if self.weights else "")
            + f" | policy {self.policy}"
            + (f" {self.compression}" if self.compression else "")
        )

    def _decode_part(self) -> str:
        if self.generated_tokens < 2:  # no rate: the first token comes from the prefill
            return f"decode - ({self.generated_tokens} token{'' if self.generated_tokens == 1 else 's'})"
        return f"decode {self.decode_tok_s:.1f} tok/s ({self.generated_tokens} tokens)"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict with derived rates (``compression`` None where no eviction scored; ``batch_prompt_tokens``
        only for a sequence of a batch)."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 1),
            "ttft_s": round(self.ttft_s, 4),
            "decode_s": round(self.decode_s, 4),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "peak_kv_bytes": self.peak_kv_bytes,
            "kv_disk_bytes": self.kv_disk_bytes,
            "policy": self.policy,
            "weights": self.weights or None,
            "compression": self.compression or None,
        }
        if self.batch_prompt_tokens:
            out["batch_prompt_tokens"] = self.batch_prompt_tokens
        return out


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@dataclass
class Generation:
    """A finished completion: text, token ids, why it stopped ("stop" or "length"), and stats."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats = field(default_factory=Stats)
