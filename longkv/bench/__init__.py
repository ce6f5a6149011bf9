"""Long-context evaluation harness: needle-in-a-haystack, RULER-style tasks, perplexity, speed (see docs/bench.md)."""
