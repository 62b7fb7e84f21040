"""Fraud scoring rules: batch limits, the manifest's threshold, and running the scorer off the event loop."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio.to_thread

from app.errors import InvalidInput, NotReady
from app.services.metrics import Metrics

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """What the service needs of a loaded model (app.inference.fraud_scorer.FraudScorer is one)."""

    model_version: str
    threshold: float
    features: list[str]

    def score(self, rows: Sequence[Mapping[str, float]]) -> list[float]: ...


@dataclass(frozen=True)
class FraudVerdict:
    fraud_probability: float
    is_fraud: bool


@dataclass(frozen=True)
class FraudScores:
    """Verdicts in input order, with the threshold and model version that produced them."""

    verdicts: list[FraudVerdict]
    threshold: float
    model_version: str


class FraudService:
    """Scores transactions with the model loaded at startup, or answers NotReady naming why there is none."""

    def __init__(
        self,
        scorer: Scorer | None,
        unavailable_reason: str | None = None,
        *,
        max_batch_transactions: int | None = None,
        metrics: Metrics | None = None,
    ):
        self._scorer = scorer
        self._unavailable_reason = unavailable_reason or "no fraud model is loaded"
        self._max_batch = max_batch_transactions
        self._metrics = metrics

    @property
    def ready(self) -> bool:
        """Whether a model is loaded (the v2 protocol and /info report it per model)."""
        return self._scorer is not None

    async def score(self, transactions: Sequence[Mapping[str, float]]) -> FraudScores:
        """Scores 1..max_batch_transactions transactions in one call to the model, in a worker thread."""
        max_batch = self._max_batch
        if not transactions:
            raise InvalidInput("no transactions to score", details=_field_error("transactions", "too_short", "at least 1 transaction"))
        if max_batch is not None and len(transactions) > max_batch:
            raise InvalidInput(
                f"{len(transactions)} transactions exceed the limit of {max_batch} per request",
                details=_field_error("transactions", "too_long", f"at most {max_batch} transactions per request"),
            )
        scorer = self._scorer
        if scorer is None:
            raise NotReady(
                f"fraud model unavailable: {self._unavailable_reason}",
                details={"component": "fraud", "reason": self._unavailable_reason},
            )
        # predict_proba is CPU work; running it inline would stall every other request on the event loop.
        probabilities = await anyio.to_thread.run_sync(scorer.score, transactions)
        threshold = scorer.threshold
        if self._metrics is not None:
            flagged = sum(p >= threshold for p in probabilities)
            self._metrics.fraud_scored.labels("fraud").inc(flagged)
            self._metrics.fraud_scored.labels("not_fraud").inc(len(probabilities) - flagged)
        return FraudScores(
            verdicts=[FraudVerdict(p, p >= threshold) for p in probabilities],
            threshold=threshold,
            model_version=scorer.model_version,
        )


def _field_error(field: str, kind: str, message: str) -> dict[str, list[dict[str, str]]]:
    # Same shape as the validation handler's details, so clients read one format for every 422.
    return {"fields": [{"field": field, "type": kind, "message": message}]}
