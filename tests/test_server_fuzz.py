"""Fuzz ``longkv serve`` with schemathesis over its own OpenAPI schema: no input may cause a 500.

Loopback only, a bounded number of examples per operation, and a server that
generates at most 8 tokens per request so every example stays fast. Skipped
where ../shared (the real model) or schemathesis is absent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_server import MODEL_ID, smollm2_path  # noqa: E402

from longkv.server.launch import ServerProcess  # noqa: E402

EXAMPLES = 30  # derandomized: the same examples every run, so a pass or a failure repeats


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    args = ("--dtype", "float32", "--max-tokens-default", "4", "--max-tokens-limit", "8", "--max-queue", "4", "--log-level", "warning")
    with ServerProcess(smollm2_path(), *args) as s:
        yield s


def served_model(case):  # type: ignore[no-untyped-def]
    """Name the served model in a generated body, so valid requests reach the engine."""
    if isinstance(case.body, dict):
        case.body["model"] = MODEL_ID
    return case


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_input_makes_a_server_error(fuzz_server: ServerProcess, mode: str) -> None:
    """Every operation of the schema, EXAMPLES generated requests each: valid ones (positive) and invalid ones."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    statuses: Counter[tuple[str, int]] = Counter()
    for op in operations:
        if mode == "negative" and op.method.upper() != "POST":
            continue  # a GET takes at most a free-form string: nothing to get wrong
        strategy = op.as_strategy(generation_mode=GenerationMode(mode))
        if mode == "positive" and op.method.upper() == "POST":
            strategy = strategy.map(served_model)  # else nearly every case stops at "unknown model"

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def call(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call_and_validate(checks=[not_a_server_error], timeout=120)
            statuses[(case.operation.path, response.status_code)] += 1

        call()
    print(sorted(statuses.items()))
    if mode == "positive":  # the engine itself was exercised, not only the validation
        assert statuses[("/v1/chat/completions", 200)] + statuses[("/v1/completions", 200)] > 0, statuses
