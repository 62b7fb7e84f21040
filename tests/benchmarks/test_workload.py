"""The load plan: popularity laws, the seeded sampler, and plans every system receives identically."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks.workload import AdapterSampler, build_plan, load_pairs, popularity_weights, retarget


def test_zipf_weights_follow_one_over_rank():
    weights = popularity_weights(4, "zipf")
    assert sum(weights) == pytest.approx(1.0)
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert weights == pytest.approx([1 / harmonic, 1 / 2 / harmonic, 1 / 3 / harmonic, 1 / 4 / harmonic])


def test_uniform_weights_are_equal():
    assert popularity_weights(5, "uniform") == pytest.approx([0.2] * 5)


@pytest.mark.parametrize("count, law", [(0, "zipf"), (3, "pareto")])
def test_bad_popularity_is_refused(count, law):
    with pytest.raises(ValueError):
        popularity_weights(count, law)


def test_zipf_sampler_draws_ranks_in_proportion():
    names = ["a", "b", "c"]
    sampler = AdapterSampler(names, "zipf", seed=3)
    draws = Counter(sampler.draw() for _ in range(30_000))
    assert set(draws) == set(names)
    shares = {name: draws[name] / 30_000 for name in names}
    # 1 : 1/2 : 1/3 normalised is 6/11, 3/11, 2/11.
    assert shares["a"] == pytest.approx(6 / 11, abs=0.015)
    assert shares["b"] == pytest.approx(3 / 11, abs=0.015)
    assert shares["c"] == pytest.approx(2 / 11, abs=0.015)


def test_sampler_is_deterministic_per_seed():
    first = AdapterSampler(["a", "b", "c"], "uniform", seed=7)
    second = AdapterSampler(["a", "b", "c"], "uniform", seed=7)
    assert [first.draw() for _ in range(50)] == [second.draw() for _ in range(50)]


def test_shipped_text_has_real_pairs():
    pairs = load_pairs()
    assert len(pairs) >= 500
    assert all(p.premise.strip() and p.hypothesis.strip() for p in pairs)
    lengths = {len(p.premise) for p in pairs}
    assert max(lengths) > 3 * min(lengths)  # real length spread, not one padded shape


def test_plan_is_reproducible_and_well_formed():
    pairs = load_pairs()
    plan = build_plan(pairs, ["mnli", "snli", "rte"], "zipf", 1200, seed=1)
    again = build_plan(pairs, ["mnli", "snli", "rte"], "zipf", 1200, seed=1)
    assert [r.body for r in plan] == [r.body for r in again]
    body = json.loads(plan[0].body)
    assert body == {"premise": plan[0].pair.premise, "hypothesis": plan[0].pair.hypothesis, "adapter": plan[0].adapter}
    # More requests than pairs: the text cycles through every pair before repeating.
    assert len({r.pair for r in plan[: len(pairs)]}) == len(set(pairs))


def test_retarget_keeps_pairs_and_changes_only_the_adapter():
    plan = build_plan(load_pairs(), ["mnli", "rte"], "uniform", 50, seed=2)
    merged = retarget(plan, "mnli")
    assert [r.pair for r in merged] == [r.pair for r in plan]
    assert {json.loads(r.body)["adapter"] for r in merged} == {"mnli"}
