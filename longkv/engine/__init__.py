"""The engine: chunked prefill, decode, sampling and the public LLM class."""

from longkv.engine.llm import LLM
from longkv.engine.results import Generation, Stats
from longkv.engine.runner import Runner, Sequence
from longkv.engine.sampling import SamplingParams

__all__ = ["LLM", "Generation", "Runner", "SamplingParams", "Sequence", "Stats"]
