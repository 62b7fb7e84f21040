"""The load plan: real MNLI/SNLI pairs, each with an adapter drawn by popularity (uniform or Zipf)."""

from __future__ import annotations

import bisect
import json
import logging
import random
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT_FILES = (REPO_ROOT / "data/nli/mnli_sample.jsonl", REPO_ROOT / "data/nli/snli_sample.jsonl")
POPULARITIES = ("uniform", "zipf")


@dataclass(frozen=True)
class Pair:
    premise: str
    hypothesis: str


@dataclass(frozen=True)
class PlannedRequest:
    """One POST /nli body. `body` is the serialized JSON, encoded once so the client spends no
    time on it during the measurement."""

    pair: Pair
    adapter: str
    body: bytes


def load_pairs(files: tuple[Path, ...] = DEFAULT_TEXT_FILES) -> list[Pair]:
    """Every usable (premise, hypothesis) row of the jsonl files, in file order."""
    pairs: list[Pair] = []
    for path in files:
        with Path(path).open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                premise, hypothesis = row.get("premise"), row.get("hypothesis")
                if isinstance(premise, str) and isinstance(hypothesis, str) and premise.strip() and hypothesis.strip():
                    pairs.append(Pair(premise, hypothesis))
    if not pairs:
        raise ValueError(f"no premise/hypothesis rows in {', '.join(map(str, files))}")
    return pairs


def popularity_weights(count: int, law: str, alpha: float = 1.0) -> list[float]:
    """Normalised request shares of adapters ranked 1..count: equal, or Zipf (share of rank k ∝ 1/k^alpha)."""
    if count < 1:
        raise ValueError("need at least one adapter")
    if law == "uniform":
        raw = [1.0] * count
    elif law == "zipf":
        raw = [1.0 / (rank**alpha) for rank in range(1, count + 1)]
    else:
        raise ValueError(f"popularity must be one of {POPULARITIES}, not {law!r}")
    total = sum(raw)
    return [w / total for w in raw]


class AdapterSampler:
    """Draws adapter names with the given popularity; the first name is the most popular under Zipf."""

    def __init__(self, names: list[str], law: str, *, alpha: float = 1.0, seed: int = 0):
        self.names = list(names)
        self.weights = popularity_weights(len(self.names), law, alpha)
        self._cumulative = list(accumulate(self.weights))
        self._rng = random.Random(seed)

    def draw(self) -> str:
        # min(): the last cumulative weight can round to just under 1.0.
        index = bisect.bisect_right(self._cumulative, self._rng.random())
        return self.names[min(index, len(self.names) - 1)]


def build_plan(pairs: list[Pair], adapters: list[str], law: str, count: int, *, seed: int = 0) -> list[PlannedRequest]:
    """`count` requests: pairs shuffled once with `seed` (cycled if there are fewer), each with an
    adapter drawn independently. The same arguments always give the same plan."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    sampler = AdapterSampler(adapters, law, seed=seed + 1)
    plan = []
    for i in range(count):
        pair = pairs[order[i % len(order)]]
        adapter = sampler.draw()
        body = json.dumps({"premise": pair.premise, "hypothesis": pair.hypothesis, "adapter": adapter}).encode()
        plan.append(PlannedRequest(pair, adapter, body))
    return plan


def retarget(plan: list[PlannedRequest], adapter: str) -> list[PlannedRequest]:
    """The same pairs, every request sent to one adapter (the merged ceiling serves only one)."""
    return [
        PlannedRequest(
            r.pair,
            adapter,
            json.dumps({"premise": r.pair.premise, "hypothesis": r.pair.hypothesis, "adapter": adapter}).encode(),
        )
        for r in plan
    ]
