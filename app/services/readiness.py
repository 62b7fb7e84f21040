"""Readiness of the configured components: what is loaded, and why the rest is not."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    ready: bool
    reason: str | None = None


class Readiness:
    """Each configured component reports here; `/readyz` is 200 only when all of them are ready.

    Invariant: a component that was never reported counts as not ready, so a component that
    crashed while loading cannot look healthy.
    """

    def __init__(self, expected: list[str]):
        self._lock = threading.Lock()
        self._status = {name: ComponentStatus(name, False, "loading") for name in expected}
        self._checks: dict[str, Callable[[], str | None]] = {}

    def set_check(self, name: str, check: Callable[[], str | None]) -> None:
        """From now on `name` is ready exactly when `check()` returns None (else it returns why not):
        for conditions that change at runtime, such as the default adapter being loaded."""
        with self._lock:
            self._checks[name] = check

    def set_ready(self, name: str) -> None:
        with self._lock:
            self._status[name] = ComponentStatus(name, True)

    def set_failed(self, name: str, reason: str) -> None:
        with self._lock:
            self._status[name] = ComponentStatus(name, False, reason)

    def snapshot(self) -> list[ComponentStatus]:
        with self._lock:
            statuses = dict(self._status)
            checks = dict(self._checks)
        for name, check in checks.items():
            reason = check()
            statuses[name] = ComponentStatus(name, reason is None, reason)
        return list(statuses.values())
