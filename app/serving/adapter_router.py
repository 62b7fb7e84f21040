"""An adapter-affine Ray Serve request router for the engine deployment (the `affinity` routing of
app.serving.ray_app), the alternative to routing by Ray's model multiplexing.

Each request carries its adapter as the multiplexed model id. The router prefers replicas that hold
the adapter — what each replica reports on its device (`EngineDeployment.record_routing_stats`), plus
where this router sent the adapter lately (the report lags by its period) — and takes the less loaded
of two of them (power of two choices by Ray's queue lengths). When those holders are busier than the
least loaded replica without the adapter by `spill_queue_len` requests or more, that replica competes
too, so a hot adapter spreads to a second replica instead of pinning one (and load that is merely high
everywhere spills nothing); once the adapter has been sent there, that replica counts as a holder. An
adapter held nowhere goes to its home replica (rendezvous hashing of adapter and replica ids), under
the same spill rule: the long tail of adapters is partitioned over the replicas' device slots instead
of every replica caching the same cold adapters.

No torch here: this runs inside the ingress's deployment handle."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

HELD_STAT = "adapters"  # the routing-stats key a replica reports its device-resident adapters under


class Replica(Protocol):
    replica_id: Any
    routing_stats: dict[str, Any]


class AffinityPolicy:
    """The ranking, apart from Ray (unit-tested on its own). `rank` returns replicas best first, in
    groups: Ray takes the least loaded replica of the first group with one that accepts."""

    def __init__(
        self, *, spill_queue_len: int = 8, remember_s: float = 10.0, rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.spill_queue_len = max(1, spill_queue_len)
        self.remember_s = remember_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._sent: dict[str, dict[Any, float]] = {}  # adapter -> replica id -> when last sent there

    def rank(
        self, adapter: str, replicas: Sequence[Replica], queue_len: Callable[[Replica], int | None]
    ) -> list[list[Replica]]:
        if not adapter or len(replicas) < 2:
            return [self._two(replicas)]
        holders = [r for r in replicas if self.holds(r, adapter)] or [_home(adapter, replicas)]
        others = [r for r in replicas if r not in holders]
        first = self._two(holders)
        if others:
            idlest = min(others, key=lambda r: queue_len(r) or 0)
            if min(queue_len(r) or 0 for r in first) - (queue_len(idlest) or 0) >= self.spill_queue_len:
                first = [*first, idlest]  # spill: Ray then picks it, its queue being the shortest
        return [first, self._two(others)] if others else [first]

    def holds(self, replica: Replica, adapter: str) -> bool:
        if adapter in (replica.routing_stats or {}).get(HELD_STAT, ()):
            return True
        sent = self._sent.get(adapter, {}).get(replica.replica_id)
        return sent is not None and self._clock() - sent <= self.remember_s

    def sent(self, adapter: str, replica_id: Any) -> None:
        self._sent.setdefault(adapter, {})[replica_id] = self._clock()

    def _two(self, replicas: Sequence[Replica]) -> list[Replica]:
        return self._rng.sample(list(replicas), 2) if len(replicas) > 2 else list(replicas)


def _home(adapter: str, replicas: Sequence[Replica]) -> Replica:
    """The replica an adapter held nowhere goes to: highest hash of (adapter, replica id). Stable as
    replicas come and go — only the adapters whose home left move."""

    def score(replica: Replica) -> bytes:
        rid = getattr(replica.replica_id, "unique_id", replica.replica_id)
        return hashlib.blake2b(f"{adapter}|{rid}".encode(), digest_size=8).digest()

    return max(replicas, key=score)


class AdapterAffinityRouter(RequestRouter):
    """Ray Serve's RequestRouter with AffinityPolicy. Without FIFOMixin on purpose: with it, a replica
    chosen for one request may be handed to the oldest pending request instead, whatever its adapter."""

    def initialize_state(self, spill_queue_len: int = 8, remember_s: float = 10.0, **_: Any) -> None:
        self.policy = AffinityPolicy(spill_queue_len=spill_queue_len, remember_s=remember_s)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter = ""
        if pending_request is not None:
            adapter = pending_request.metadata.multiplexed_model_id
            # Every group tried and none accepted: back off before the next round (Ray spins otherwise).
            pending_request.routing_context.should_backoff = True
        return self.policy.rank(adapter, candidate_replicas, self._queue_len)  # type: ignore[return-value]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self.policy.sent(adapter, replica_id)

    def _queue_len(self, replica: Replica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)
