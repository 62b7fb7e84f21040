"""NLI domain rules: which adapter each pair uses, text limits, and mapping probabilities to labels."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import InvalidInput, ServiceError
from app.services.adapter_registry import AdapterRegistry, LoadedAdapter
from app.services.metrics import Metrics


class PairBatcher(Protocol):
    async def submit(self, premises: list[str], hypotheses: list[str], adapters: Any) -> list[list[float]]:
        """`adapters`: the per-pair adapters, or an awaitable of them (awaited once admitted)."""


@dataclass(frozen=True)
class PairInput:
    premise: str
    hypothesis: str
    adapter: str | None = None


@dataclass(frozen=True)
class Classification:
    label: str
    scores: dict[str, float]
    adapter: str


class NLIService:
    def __init__(
        self,
        registry: AdapterRegistry,
        batcher: PairBatcher,
        *,
        default_adapter: str | None,
        max_text_chars: int,
        max_pairs_per_request: int,
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics
        self.registry = registry
        self.batcher = batcher
        self.default_adapter = default_adapter
        self.max_text_chars = max_text_chars
        self.max_pairs_per_request = max_pairs_per_request

    def _check_text(self, pairs: list[PairInput], prefix: str) -> None:
        problems = []
        for i, pair in enumerate(pairs):
            where = f"{prefix}[{i}]." if prefix else ""
            for field_name, text in (("premise", pair.premise), ("hypothesis", pair.hypothesis)):
                if not text.strip():
                    problems.append({"field": where + field_name, "type": "empty", "message": "must not be blank"})
                elif len(text) > self.max_text_chars:
                    problems.append(
                        {
                            "field": where + field_name,
                            "type": "too_long",
                            "message": f"longer than {self.max_text_chars} characters",
                        }
                    )
        if problems:
            names = ", ".join(p["field"] for p in problems[:10])
            raise InvalidInput(f"invalid text: {names}", details={"fields": problems})

    async def classify(self, pairs: list[PairInput], *, batch_field: str = "") -> list[Classification]:
        """Classify pairs, each with its own adapter, in input order. `batch_field` names the list
        in error details (`pairs`), or is empty for a single pair."""
        if batch_field and len(pairs) > self.max_pairs_per_request:
            raise InvalidInput(
                f"at most {self.max_pairs_per_request} pairs per request",
                details={"fields": [{"field": batch_field, "type": "too_long", "message": f"{len(pairs)} pairs"}]},
            )
        self._check_text(pairs, batch_field)
        names = self._adapter_names(pairs, batch_field)
        lease = self.registry.lease(names)  # unknown or failed adapters are refused here
        adapters: list[LoadedAdapter] = []

        async def row_adapters() -> list[LoadedAdapter]:
            # Runs once the batcher has admitted the pairs: misses load off the event loop meanwhile.
            weights = await lease.weights()
            adapters.extend(weights[name] for name in names)
            return adapters

        started = time.perf_counter()
        try:
            probabilities = await self.batcher.submit(
                [p.premise for p in pairs], [p.hypothesis for p in pairs], row_adapters()
            )
        except ServiceError as exc:
            self._count(names, exc.code, None)
            raise
        finally:
            lease.release()
        self._count(names, "ok", time.perf_counter() - started)
        for adapter, count in Counter(adapters).items():
            self.registry.record_served(adapter, count)
        results = []
        for name, adapter, probs in zip(names, adapters, probabilities):
            scores = dict(zip(adapter.labels, probs))
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append(Classification(label=adapter.labels[best], scores=scores, adapter=name))
        return results

    def _adapter_names(self, pairs: list[PairInput], batch_field: str) -> list[str]:
        missing = [i for i, pair in enumerate(pairs) if not pair.adapter] if self.default_adapter is None else []
        if missing:
            where = [f"{batch_field}[{i}].adapter" if batch_field else "adapter" for i in missing]
            raise InvalidInput(
                "no default adapter is configured: name one in each request",
                details={"fields": [{"field": f, "type": "missing", "message": "required"} for f in where[:10]]},
            )
        return [pair.adapter or self.default_adapter for pair in pairs]  # type: ignore[misc]

    def _count(self, names: list[str], outcome: str, elapsed_s: float | None) -> None:
        if self.metrics is not None:
            self.metrics.adapter_labels.observe(Counter(names), outcome, elapsed_s)
