"""Readiness alone: a configured component is not ready until it says so, a failure keeps its reason,
and a runtime check is asked again at every snapshot."""

from __future__ import annotations

from app.services.readiness import Readiness


def state(readiness: Readiness) -> dict[str, tuple[bool, str | None]]:
    return {s.name: (s.ready, s.reason) for s in readiness.snapshot()}


def test_components_never_reported_are_not_ready():
    readiness = Readiness(["nli", "fraud"])
    snapshot = readiness.snapshot()
    assert [s.name for s in snapshot] == ["nli", "fraud"]
    assert not any(s.ready for s in snapshot)
    assert all(s.reason for s in snapshot)  # each says why


def test_ready_and_failed_are_reported_per_component():
    readiness = Readiness(["nli", "fraud"])
    readiness.set_ready("nli")
    readiness.set_failed("fraud", "artifact missing")
    assert state(readiness) == {"nli": (True, None), "fraud": (False, "artifact missing")}
    readiness.set_ready("fraud")  # a later success replaces the failure
    assert state(readiness) == {"nli": (True, None), "fraud": (True, None)}
    readiness.set_failed("nli", "engine stopped")
    assert state(readiness)["nli"] == (False, "engine stopped")


def test_a_check_is_asked_at_every_snapshot_and_overrides_what_was_reported():
    readiness = Readiness(["nli", "fraud"])
    readiness.set_ready("fraud")
    readiness.set_ready("nli")
    reason: list[str | None] = ["default adapter 'alpha' is not loaded"]
    asked = []

    def check() -> str | None:
        asked.append(1)
        return reason[0]

    readiness.set_check("nli", check)
    assert state(readiness)["nli"] == (False, "default adapter 'alpha' is not loaded")
    reason[0] = None
    assert state(readiness)["nli"] == (True, None)
    reason[0] = "unloaded"
    assert state(readiness) == {"nli": (False, "unloaded"), "fraud": (True, None)}
    assert len(asked) == 3


def test_no_expected_components_is_ready():
    assert Readiness([]).snapshot() == []
