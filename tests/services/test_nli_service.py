"""NLIService alone: which adapter each pair uses, the text and batch limits, input order, labels from
probabilities, and the per-adapter metrics. A real AdapterRegistry (with a fake loader) and a fake
batcher stand in for the engine: no model, no HTTP."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.errors import AdapterNotFound, InvalidInput, Overloaded, ServiceError
from app.services.adapter_registry import AdapterRegistry
from app.services.metrics import Metrics
from app.services.nli import NLIService, PairInput
from tests.services.fakes import FakeDevice

MAX_TEXT_CHARS = 20
MAX_PAIRS = 3
THREE = ("entailment", "neutral", "contradiction")
TWO = ("entailment", "not_entailment")
LABELS = {"three": THREE, "two": TWO, "other": THREE}


@dataclass(eq=False)
class FakeAdapter:
    name: str
    path: Path
    labels: tuple[str, ...]
    task: str = "nli"
    rank: int = 4
    target_modules: tuple[str, ...] = ("query",)
    base_id: str = "fake-base"
    size_bytes: int = 10
    metadata: dict = field(default_factory=dict)


class FakeLoader:
    """Loads any name in LABELS with that label set; a load is all in memory."""

    def read_adapter(self, name: str, path: Path, labels=None) -> FakeAdapter:
        return FakeAdapter(name, path, LABELS[name])



class FakeBatcher:
    """Records each submission. Pair i gets probabilities whose argmax is `i % len(labels)`, so every
    result says which input position it came from; `fail_with` makes the next submission raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str], list]] = []
        self.fail_with: ServiceError | None = None

    async def submit(self, premises, hypotheses, adapters):
        if self.fail_with is not None:  # refused at admission, before the adapters are asked for
            if inspect.iscoroutine(adapters):
                adapters.close()
            self.calls.append((list(premises), list(hypotheses), None))
            raise self.fail_with
        if inspect.isawaitable(adapters):  # the per-pair adapters, resolved once admitted
            adapters = await adapters
        self.calls.append((list(premises), list(hypotheses), list(adapters)))
        return [probabilities(i, len(adapter.labels)) for i, adapter in enumerate(adapters)]


def probabilities(position: int, width: int) -> list[float]:
    best = position % width
    rest = 0.1 / (width - 1)
    return [0.9 if j == best else rest for j in range(width)]


@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    registry = AdapterRegistry(FakeLoader(), FakeDevice())
    for name in LABELS:
        registry.load(name, tmp_path / name)
    return registry


@pytest.fixture
def batcher() -> FakeBatcher:
    return FakeBatcher()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def service(registry, batcher, metrics) -> NLIService:
    return NLIService(
        registry,
        batcher,
        default_adapter="three",
        max_text_chars=MAX_TEXT_CHARS,
        max_pairs_per_request=MAX_PAIRS,
        metrics=metrics,
    )


def classify(service: NLIService, pairs: list[PairInput], batch_field: str = "pairs"):
    return asyncio.run(service.classify(pairs, batch_field=batch_field))


def pairs_counted(metrics: Metrics, adapter: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value("loraswap_nli_pairs_total", {"adapter": adapter, "outcome": outcome})
    return value or 0.0


def latencies_observed(metrics: Metrics, adapter: str) -> float:
    value = metrics.registry.get_sample_value("loraswap_nli_request_seconds_count", {"adapter": adapter})
    return value or 0.0


def test_a_pair_without_an_adapter_uses_the_default(service, batcher):
    [result] = classify(service, [PairInput("p", "h")], batch_field="")
    assert result.adapter == "three"
    assert [a.name for a in batcher.calls[0][2]] == ["three"]
    assert set(result.scores) == set(THREE)


def test_each_pair_runs_with_its_own_adapter_and_gets_its_labels(service, batcher):
    pairs = [PairInput("p0", "h0", "two"), PairInput("p1", "h1"), PairInput("p2", "h2", "other")]
    results = classify(service, pairs)
    assert [r.adapter for r in results] == ["two", "three", "other"]
    assert [a.name for a in batcher.calls[0][2]] == ["two", "three", "other"]
    assert [tuple(r.scores) for r in results] == [TWO, THREE, THREE]
    assert len(batcher.calls) == 1  # one submission for the whole request, adapters mixed


def test_results_come_back_in_input_order_with_the_argmax_as_label(service, batcher):
    pairs = [PairInput(f"premise {i}", f"hypothesis {i}", "three") for i in range(MAX_PAIRS)]
    results = classify(service, pairs)
    premises, hypotheses, _ = batcher.calls[0]
    assert premises == [f"premise {i}" for i in range(MAX_PAIRS)]
    assert hypotheses == [f"hypothesis {i}" for i in range(MAX_PAIRS)]
    assert [r.label for r in results] == [THREE[i % 3] for i in range(MAX_PAIRS)]
    for i, result in enumerate(results):
        assert list(result.scores.values()) == probabilities(i, 3)


def test_the_same_adapter_named_twice_is_resolved_to_the_same_weights(service, batcher):
    classify(service, [PairInput("a", "b", "two"), PairInput("c", "d", "two")])
    first, second = batcher.calls[0][2]
    assert first is second


# (id, pairs, batch field, expected code, expected field problems as (field, type)).
LONG = "x" * (MAX_TEXT_CHARS + 1)
AT_LIMIT = "x" * MAX_TEXT_CHARS
INVALID = [
    ("empty premise", [PairInput("", "h")], "", "invalid_input", [("premise", "empty")]),
    ("blank hypothesis", [PairInput("p", " \t\n")], "", "invalid_input", [("hypothesis", "empty")]),
    ("unicode blank", [PairInput("\u2003\u3000", "h")], "", "invalid_input", [("premise", "empty")]),
    ("premise too long", [PairInput(LONG, "h")], "", "invalid_input", [("premise", "too_long")]),
    ("both too long", [PairInput(LONG, LONG)], "", "invalid_input", [("premise", "too_long"), ("hypothesis", "too_long")]),
    (
        "second pair of a batch",
        [PairInput("p", "h"), PairInput("p", LONG)],
        "pairs",
        "invalid_input",
        [("pairs[1].hypothesis", "too_long")],
    ),
    (
        "every bad pair is listed",
        [PairInput("", "h"), PairInput("p", "h"), PairInput(LONG, " ")],
        "pairs",
        "invalid_input",
        [("pairs[0].premise", "empty"), ("pairs[2].premise", "too_long"), ("pairs[2].hypothesis", "empty")],
    ),
    ("too many pairs", [PairInput("p", "h")] * (MAX_PAIRS + 1), "pairs", "invalid_input", [("pairs", "too_long")]),
    ("unknown adapter", [PairInput("p", "h", "nope")], "", "adapter_not_found", None),
    ("unknown adapter in a batch", [PairInput("p", "h"), PairInput("p", "h", "nope")], "pairs", "adapter_not_found", None),
    ("a path as adapter", [PairInput("p", "h", "../three")], "", "adapter_not_found", None),
]


@pytest.mark.parametrize(
    "pairs, batch_field, code, problems", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_requests_get_their_code_and_never_reach_the_batcher(service, batcher, metrics, pairs, batch_field, code, problems):
    with pytest.raises(ServiceError) as raised:
        classify(service, pairs, batch_field)
    assert raised.value.code == code
    if problems is not None:
        assert [(p["field"], p["type"]) for p in raised.value.details["fields"]] == problems
    assert batcher.calls == []
    assert all(pairs_counted(metrics, name, outcome) == 0 for name in LABELS for outcome in ("ok", code))


def test_an_unknown_adapter_names_the_ready_ones(service):
    with pytest.raises(AdapterNotFound) as raised:
        classify(service, [PairInput("p", "h", "nope")], "")
    assert raised.value.details == {"adapter": "nope", "available": sorted(LABELS)}


@pytest.mark.parametrize(
    "pairs",
    [
        [PairInput(AT_LIMIT, AT_LIMIT)],
        [PairInput("p", "h")] * MAX_PAIRS,
        [PairInput(" p ", "\u00e9" * MAX_TEXT_CHARS)],
    ],
    ids=["texts at the limit", "pairs at the limit", "padded and non-ASCII"],
)
def test_requests_at_the_limits_are_served(service, batcher, pairs):
    assert len(classify(service, pairs)) == len(pairs)
    assert len(batcher.calls) == 1


def test_served_pairs_are_counted_per_adapter_with_one_latency_each(service, metrics):
    classify(service, [PairInput("a", "b", "two"), PairInput("c", "d"), PairInput("e", "f", "two")])
    classify(service, [PairInput("a", "b")], "")
    assert pairs_counted(metrics, "two", "ok") == 2
    assert pairs_counted(metrics, "three", "ok") == 2
    assert pairs_counted(metrics, "other", "ok") == 0
    # One latency observation per adapter per request (a batch request counts once per adapter).
    assert latencies_observed(metrics, "two") == 1
    assert latencies_observed(metrics, "three") == 2


@pytest.mark.parametrize("error", [Overloaded("full"), InvalidInput("no")], ids=["overloaded", "invalid_input"])
def test_a_batcher_error_is_raised_as_is_and_counted_under_its_code(service, batcher, metrics, error):
    batcher.fail_with = error
    with pytest.raises(ServiceError) as raised:
        classify(service, [PairInput("a", "b", "two"), PairInput("c", "d")])
    assert raised.value is error
    assert pairs_counted(metrics, "two", error.code) == 1
    assert pairs_counted(metrics, "three", error.code) == 1
    assert pairs_counted(metrics, "two", "ok") == 0
    assert latencies_observed(metrics, "two") == 0  # a refusal is not a served latency


def test_without_metrics_the_service_still_serves_and_fails(registry, batcher):
    service = NLIService(registry, batcher, default_adapter="three", max_text_chars=10, max_pairs_per_request=2)
    assert classify(service, [PairInput("p", "h")])[0].adapter == "three"
    batcher.fail_with = Overloaded("full")
    with pytest.raises(Overloaded):
        classify(service, [PairInput("p", "h")])


def test_an_unloaded_adapter_is_no_longer_served(service, registry, batcher):
    registry.unload("two")
    with pytest.raises(AdapterNotFound):
        classify(service, [PairInput("p", "h", "two")], "")
    assert batcher.calls == []


def test_without_a_default_adapter_every_pair_must_name_one(registry, batcher):
    service = NLIService(registry, batcher, default_adapter=None, max_text_chars=10, max_pairs_per_request=3)
    with pytest.raises(ServiceError) as raised:
        classify(service, [PairInput("p", "h", "two"), PairInput("p", "h"), PairInput("p", "h")])
    assert raised.value.code == "invalid_input"
    assert [(f["field"], f["type"]) for f in raised.value.details["fields"]] == [
        ("pairs[1].adapter", "missing"),
        ("pairs[2].adapter", "missing"),
    ]
    with pytest.raises(ServiceError) as single:
        classify(service, [PairInput("p", "h")], "")
    assert [(f["field"], f["type"]) for f in single.value.details["fields"]] == [("adapter", "missing")]
    assert batcher.calls == []
    assert [r.adapter for r in classify(service, [PairInput("p", "h", "two")])] == ["two"]


def test_served_pairs_are_counted_on_the_weights_that_served_them(service, registry, batcher, tmp_path):
    classify(service, [PairInput("a", "b", "two"), PairInput("c", "d"), PairInput("e", "f", "two")])
    assert (registry.entry("two").served_pairs, registry.entry("three").served_pairs) == (2, 1)
    batcher.fail_with = Overloaded("full")
    with pytest.raises(Overloaded):
        classify(service, [PairInput("a", "b", "two")])
    assert registry.entry("two").served_pairs == 2  # a refused request served nothing
    batcher.fail_with = None
    registry.load("two", tmp_path / "two-v2")  # new weights start from zero
    classify(service, [PairInput("a", "b", "two")])
    assert registry.entry("two").served_pairs == 1
