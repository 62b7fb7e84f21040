"""FraudService alone: batch limits and not-ready answers by code, verdicts in input order against the
manifest's threshold, the scorer run off the event loop, and the decisions counted. A fake scorer
stands in for the model."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.errors import ServiceError
from app.services.fraud import FraudService
from app.services.metrics import Metrics

THRESHOLD = 0.5
MAX_BATCH = 3


class FakeScorer:
    """Scores each transaction as its own `p` field; records the thread each call ran on."""

    model_version = "fake-7"
    threshold = THRESHOLD
    features = ["p"]

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []
        self.threads: list[int] = []

    def score(self, rows):
        self.calls.append(list(rows))
        self.threads.append(threading.get_ident())
        return [row["p"] for row in rows]


def rows(*probabilities: float) -> list[dict[str, float]]:
    return [{"p": p} for p in probabilities]


def score(service: FraudService, transactions):
    return asyncio.run(service.score(transactions))


def counted(metrics: Metrics, decision: str) -> float:
    return metrics.registry.get_sample_value("loraswap_fraud_transactions_total", {"decision": decision}) or 0.0


@pytest.fixture
def scorer() -> FakeScorer:
    return FakeScorer()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_verdicts_come_in_input_order_against_the_threshold(scorer, metrics):
    service = FraudService(scorer, max_batch_transactions=MAX_BATCH, metrics=metrics)
    result = score(service, rows(0.9, 0.1, THRESHOLD))
    assert [v.fraud_probability for v in result.verdicts] == [0.9, 0.1, THRESHOLD]
    assert [v.is_fraud for v in result.verdicts] == [True, False, True]  # the threshold itself is fraud
    assert (result.threshold, result.model_version) == (THRESHOLD, "fake-7")
    assert scorer.calls == [rows(0.9, 0.1, THRESHOLD)]  # one call to the model for the whole batch


def test_decisions_are_counted(scorer, metrics):
    service = FraudService(scorer, metrics=metrics)
    score(service, rows(0.9, 0.1, 0.2))
    score(service, rows(0.7))
    assert counted(metrics, "fraud") == 2
    assert counted(metrics, "not_fraud") == 2


def test_the_scorer_runs_off_the_event_loop_thread(scorer):
    service = FraudService(scorer)

    async def main() -> int:
        await service.score(rows(0.3))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert scorer.threads and scorer.threads[0] != loop_thread


# (id, scorer present, transactions, expected code or None when served)
CASES = [
    ("empty batch", True, [], "invalid_input"),
    ("one transaction", True, rows(0.2), None),
    ("at the batch limit", True, rows(*[0.2] * MAX_BATCH), None),
    ("over the batch limit", True, rows(*[0.2] * (MAX_BATCH + 1)), "invalid_input"),
    ("no model", False, rows(0.2), "not_ready"),
    ("no model, empty batch", False, [], "invalid_input"),  # input is judged before readiness
    ("no model, over the limit", False, rows(*[0.2] * (MAX_BATCH + 1)), "invalid_input"),
]


@pytest.mark.parametrize("has_scorer, transactions, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_limits_and_readiness_by_code(scorer, metrics, has_scorer, transactions, code):
    service = FraudService(
        scorer if has_scorer else None, "artifact missing", max_batch_transactions=MAX_BATCH, metrics=metrics
    )
    if code is None:
        assert len(score(service, transactions).verdicts) == len(transactions)
        return
    with pytest.raises(ServiceError) as raised:
        score(service, transactions)
    assert raised.value.code == code
    assert scorer.calls == []
    assert counted(metrics, "fraud") == counted(metrics, "not_fraud") == 0


@pytest.mark.parametrize(
    "transactions, kind",
    [([], "too_short"), (rows(*[0.2] * (MAX_BATCH + 1)), "too_long")],
    ids=["empty", "over the limit"],
)
def test_a_refused_batch_names_the_field_in_the_validation_shape(scorer, transactions, kind):
    service = FraudService(scorer, max_batch_transactions=MAX_BATCH)
    with pytest.raises(ServiceError) as raised:
        score(service, transactions)
    assert [(f["field"], f["type"]) for f in raised.value.details["fields"]] == [("transactions", kind)]


def test_not_ready_names_the_component_and_its_reason_and_asks_for_a_retry():
    service = FraudService(None, "sha256 mismatch")
    with pytest.raises(ServiceError) as raised:
        score(service, rows(0.2))
    assert raised.value.code == "not_ready"
    assert raised.value.details == {"component": "fraud", "reason": "sha256 mismatch"}
    assert raised.value.retry_after_s is not None and raised.value.retry_after_s >= 1


def test_without_a_batch_limit_any_size_is_scored(scorer):
    service = FraudService(scorer)
    assert len(score(service, rows(*[0.1] * 500)).verdicts) == 500
