"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Names follow Prometheus conventions (``_total`` counters, base units): requests,
tokens in and out, tokens actually prefilled and served from the prefix cache,
prefill and decode throughput, time to first token, cache hits, misses and
evictions, resident KV bytes and the queue.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from longkv.engine.engine import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """Every metric the server exports, in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("longkv_requests", "HTTP requests to the completion endpoints, by outcome.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("longkv_prompt_tokens", "Prompt tokens of finished generations.", registry=r)
        self.completion_tokens = Counter("longkv_completion_tokens", "Generated tokens.", registry=r)
        self.prefill_tokens = Counter("longkv_prefill_tokens", "Prompt tokens actually computed (not served from the prefix cache).", registry=r)
        self.cached_tokens = Counter("longkv_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", registry=r)
        self.prefill_seconds = Counter(
            "longkv_prefill_seconds", "Seconds from a request's admission until its prompt was in the cache (queueing not included).", registry=r
        )
        self.decode_seconds = Counter("longkv_decode_seconds", "Seconds spent in decode steps.", registry=r)
        self.prefill_tps = Gauge("longkv_prefill_tokens_per_second", "Prefill throughput of the last generation that prefilled.", registry=r)
        self.decode_tps = Gauge("longkv_decode_tokens_per_second", "Decode throughput of the last generation of 2+ tokens.", registry=r)
        self.ttft = Histogram(
            "longkv_time_to_first_token_seconds", "Seconds from a request's arrival to its first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "longkv_queue_time_seconds", "Seconds from a request's arrival until the engine admitted it.", buckets=TTFT_BUCKETS, registry=r
        )
        self.cache_hits = Counter("longkv_prefix_cache_hits", "Generations that reused a cached prefix.", registry=r)
        self.cache_misses = Counter("longkv_prefix_cache_misses", "Generations that could share the cache but found no prefix.", registry=r)
        self.cache_bypass = Counter(
            "longkv_prefix_cache_bypass", "Generations that could not share the cache (eviction policy, cache off).", registry=r
        )
        self.cache_evictions = Counter("longkv_prefix_cache_evictions", "Nodes evicted from the prefix cache.", registry=r)
        self.cache_evicted_tokens = Counter("longkv_prefix_cache_evicted_tokens", "Tokens evicted from the prefix cache.", registry=r)
        self.cache_bytes = Gauge("longkv_prefix_cache_bytes", "Bytes of KV resident in the prefix cache.", registry=r)
        self.cache_tokens = Gauge("longkv_prefix_cache_tokens", "Tokens resident in the prefix cache.", registry=r)
        self.active_kv_bytes = Gauge("longkv_active_kv_bytes", "Bytes of KV of the generations running now.", registry=r)
        self.kv_pages_used = Gauge(
            "longkv_kv_pages_used", "KV pages held (running sequences and the prefix cache; a shared page once), over all layers.", registry=r
        )
        self.kv_pages_free = Gauge("longkv_kv_pages_free", "KV pages allocated but held by nobody, over all layers.", registry=r)
        self.kv_pool_bytes = Gauge("longkv_kv_pool_bytes", "Bytes of KV page storage allocated (used and free pages), over all layers.", registry=r)
        self.kv_compactions = Counter(
            "longkv_kv_compactions", "Page pools compacted (used pages moved over the free ones, storage cut), one per layer.", registry=r
        )
        self.memory_sessions = Gauge("longkv_memory_sessions", "KV memory sessions in RAM.", registry=r)
        self.memory_bytes = Gauge("longkv_memory_bytes", "Bytes of KV the KV memory sessions in RAM hold.", registry=r)
        self.memory_loaded = Gauge("longkv_memory_loaded", "KV memory sessions read back from --memory-dir since start.", registry=r)
        self.queue_length = Gauge("longkv_queue_length", "Requests waiting for the engine.", registry=r)
        self.running = Gauge("longkv_requests_running", "Generations running now (in the batch).", registry=r)
        self.batch_size = Gauge("longkv_batch_size", "Sequences in the last batched step's forward.", registry=r)
        self.inter_token = Histogram(
            "longkv_inter_token_latency_seconds", "Seconds between two tokens of one request.", buckets=ITL_BUCKETS, registry=r
        )
        self.tool_calls = Counter(
            "longkv_tool_calls", "Tool calls in chat replies, by outcome (parsed, recovered, invalid, truncated).", ["outcome"], registry=r
        )
        self.grammar_mask_seconds = Counter(
            "longkv_grammar_mask_seconds", "Seconds grammar token masks added to decode steps (waiting for one, applying it).", registry=r
        )
        self.grammar_compute_seconds = Counter(
            "longkv_grammar_compute_seconds", "Seconds spent computing grammar token masks (ahead of the step that uses them).", registry=r
        )
        self.grammar_masks = Counter("longkv_grammar_masks", "Grammar token masks computed (one per constrained token).", registry=r)
        self.cancelled = Counter("longkv_requests_cancelled", "Generations stopped because the client went away.", registry=r)

    def observe_output(self, turn: RequestOutput) -> None:
        """Count one finished (or cancelled) generation."""
        self.prompt_tokens.inc(turn.prompt_tokens)
        self.completion_tokens.inc(len(turn.token_ids))
        self.prefill_tokens.inc(max(turn.prefilled_tokens, 0))
        self.cached_tokens.inc(turn.reused_tokens)
        self.prefill_seconds.inc(turn.prefill_s)
        self.decode_seconds.inc(turn.decode_s)
        if turn.prefilled_tokens > 0 and turn.prefill_s > 0:
            self.prefill_tps.set(turn.prefilled_tokens / turn.prefill_s)
        if len(turn.token_ids) > 1 and turn.decode_s > 0:
            self.decode_tps.set((len(turn.token_ids) - 1) / turn.decode_s)
        if turn.ttft_s > 0:
            self.ttft.observe(turn.ttft_s)
        if turn.admitted:
            self.queue_time.observe(turn.queue_s)
        if turn.finish_reason == "cancelled":
            self.cancelled.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
