"""The ingress's `/metrics` on Ray: its own series plus every live engine replica's, each engine series
labelled `replica="<replica id>"`, gathered at scrape time through `DeploymentHandle.broadcast`.

Why broadcast: Ray Serve 2.60's handle offers `broadcast(method)`, which sends one call to every replica
its router knows as running (`curr_replicas`), so a scrape sees each live replica once and a replica Ray
has replaced drops out by itself — no named actor to keep, no push interval, no stale text. Its public
result API has one timeout for all replicas together (`results_async(timeout_s=...)`), so one slow
replica would cost the whole fleet's series; the per-replica results are awaited one by one instead
(`_replica_results` below), and a replica that does not answer within `timeout_s` is skipped and counted.
A scrape never fails for an engine replica: at worst it serves the ingress's own series."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

REPLICA_LABEL = "replica"
METHOD = "metrics_text"  # EngineDeployment.metrics_text -> (replica id, Prometheus text)


async def _replica_results(handle: Any, timeout_s: float) -> list[Any]:
    """One pending result per replica live now. `_fetch_replica_results_async` is the step
    `results_async` takes before it gathers them all under one timeout (ray/serve/handle.py, 2.60)."""
    response = handle.broadcast(METHOD)
    return await asyncio.wait_for(response._fetch_replica_results_async(), timeout_s)


class FleetMetrics:
    """Renders the merged text. `skipped` counts replicas that did not answer a scrape in time (or
    failed it); the `loraswap_fleet_metrics_replicas{outcome}` gauge says how the last scrape went."""

    def __init__(self, handle: Any, registry: CollectorRegistry, *, timeout_s: float = 2.0):
        self._handle = handle
        self._registry = registry
        self.timeout_s = timeout_s
        self.skipped = Counter(
            "loraswap_fleet_metrics_skipped_replicas",
            "Engine replicas left out of an ingress /metrics scrape: no answer in time, or an error.",
            registry=registry,
        )

    async def render(self) -> bytes:
        answers, skipped = await self._gather()
        if skipped:
            self.skipped.inc(skipped)
        outcome = GaugeMetricFamily(
            "loraswap_fleet_metrics_replicas", "Engine replicas in the last /metrics scrape, by outcome.",
            labels=["outcome"],
        )
        outcome.add_metric(["answered"], len(answers))
        outcome.add_metric(["skipped"], skipped)
        families = merge(self._registry.collect(), answers)
        return generate_latest(_Fixed([*families, outcome]))  # type: ignore[arg-type]

    async def _gather(self) -> tuple[list[tuple[str, str]], int]:
        try:
            pending = await _replica_results(self._handle, self.timeout_s)
        except Exception as exc:  # no replica running yet, the router not ready: the ingress's own series
            logger.warning("engine replicas' metrics not gathered: %r", exc)
            return [], 0
        tasks = [asyncio.ensure_future(result.get_async()) for result in pending]
        if not tasks:
            return [], 0
        done, late = await asyncio.wait(tasks, timeout=self.timeout_s)
        for task in late:
            task.cancel()
        answers = []
        for task in done:
            if task.exception() is not None:
                logger.warning("an engine replica failed its metrics scrape: %r", task.exception())
                continue
            answers.append(task.result())
        return sorted(answers), len(tasks) - len(answers)


def merge(own: Iterable[Metric], replicas: list[tuple[str, str]]) -> list[Metric]:
    """The ingress's families and each replica's, one family per name. Replica samples get the
    `replica` label. An ingress family that a replica also reports and in which the ingress counted
    nothing (the engine's batch, queue and adapter series: no engine runs in the ingress) is left out,
    so those families hold only what the replicas measured."""
    parsed = [(rid, list(text_string_to_metric_families(text))) for rid, text in replicas]
    measured_by_replicas = {f.name for _, families in parsed for f in families if f.samples}
    merged: dict[str, Metric] = {}
    for family in own:
        if family.name in measured_by_replicas and all(s.value == 0 for s in family.samples):
            continue
        merged[family.name] = _copy(family, family.samples)
    for rid, families in parsed:
        for family in families:
            labelled = [s._replace(labels={**s.labels, REPLICA_LABEL: rid}) for s in family.samples]
            if family.name in merged:
                merged[family.name].samples.extend(labelled)
            else:
                merged[family.name] = _copy(family, labelled)
    return list(merged.values())


def _copy(family: Metric, samples: list) -> Metric:
    metric = Metric(family.name, family.documentation, family.type, family.unit)
    metric.samples = list(samples)
    return metric


class _Fixed:
    """A registry-like holder of ready families, for `generate_latest`."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)
