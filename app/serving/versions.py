"""Adapter version stamps: the ingress numbers every PUT and DELETE, replicas catch up before serving.

Invariant: once `PUT` or `DELETE /adapters/{name}` has returned, every later request carries a stamp
at least that new, and a replica applies every change it is behind on before it answers — so no
request issued after the change is answered by an older version, on any replica, whatever the timing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterChange:
    """The newest change to one adapter name: loaded from `path` (with `labels`), or deleted."""

    version: int
    path: str | None
    labels: tuple[str, ...] | None = None

    @property
    def deleted(self) -> bool:
        return self.path is None


class AdapterVersions:
    """The ingress's record of adapter changes made through it (adapters discovered at startup have
    no entry: every replica discovers the same directory). Versions grow across all names."""

    def __init__(self) -> None:
        self._changes: dict[str, AdapterChange] = {}
        self._reserved = 0
        self.committed = 0  # the newest version committed

    def reserve(self) -> int:
        """A version for a change about to be tried; one that fails leaves a harmless gap."""
        self._reserved += 1
        return self._reserved

    def commit(self, name: str, change: AdapterChange) -> None:
        self._reserved = max(self._reserved, change.version)
        self.committed = max(self.committed, change.version)
        self._changes[name] = change

    def snapshot(self) -> dict[str, AdapterChange]:
        """What a replica must have applied before it serves (a copy, safe to send)."""
        return dict(self._changes)


class AppliedVersions:
    """A replica's side: the version it has applied per name, and the changes it is behind on."""

    def __init__(self) -> None:
        self._applied: dict[str, int] = {}

    def behind(self, wanted: dict[str, AdapterChange]) -> list[tuple[str, AdapterChange]]:
        """The changes to apply, oldest first (a DELETE then a PUT of another name keep their order)."""
        pending = [(name, c) for name, c in wanted.items() if c.version > self._applied.get(name, 0)]
        return sorted(pending, key=lambda item: item[1].version)

    def applied(self, name: str, version: int) -> None:
        self._applied[name] = max(self._applied.get(name, 0), version)

    def version_of(self, name: str) -> int:
        return self._applied.get(name, 0)
