"""The PEFT hot-swap baseline: adapters loaded on first use into one PeftModel, at most N kept (LRU).

What a practitioner writes for many adapters with PEFT alone, written to be fast: the naive server's
model and forward (eval mode, inference_mode, SDPA, bf16 on CUDA, one worker thread), plus
`load_adapter` on a miss, `delete_adapter` of the least recently used one beyond `--max-loaded`
(25 by default), and `set_adapter` per request when the adapter changes. Adapters are found by name
under `--adapters-dir` when first asked for; nothing is read for the others. PEFT's active adapter
is model-wide, so loads and forwards share one lock and a forward holds one request.

    python -m benchmarks.baselines.peft_lru --adapters-dir /tmp/pool --default synth-0000 --port 8101
"""

from __future__ import annotations

import argparse
import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException

from app.artifacts import METADATA_FILE, WEIGHTS_FILE, AdapterMetadata
from benchmarks.baselines.naive_peft import NaiveConfig, NaiveServer, NLIRequest, NLIResponse

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_LOADED = 25


class UnknownAdapter(LookupError):
    """No adapter directory of that name under the adapters directory."""


class IncompatibleAdapter(ValueError):
    """The adapter's head does not fit the model (another label count than the default's)."""


@dataclass
class LruStats:
    loads: int = 0  # misses: load_adapter calls
    hits: int = 0  # requests whose adapter was already loaded
    evictions: int = 0  # delete_adapter calls
    load_s: float = 0.0  # time inside load_adapter, all loads together
    loaded: list[str] = field(default_factory=list)  # least recently used first


class LruPeftServer(NaiveServer):
    """The naive server's model holding at most `max_loaded` adapters, least recently used evicted.

    Invariant: every adapter in `self.recent` is loaded in the PeftModel and vice versa; both change
    only under `self.lock` (re-entrant here, so the naive server's classify can run inside it).
    """

    def __init__(self, adapters_dir: Path, default: str, *, max_loaded: int, config: NaiveConfig):
        self.adapters_dir = Path(adapters_dir)
        super().__init__(NaiveConfig(**{**config.__dict__, "adapters": {default: self.adapters_dir / default}}))
        self.lock = threading.RLock()
        self.max_loaded = max_loaded
        self.recent: OrderedDict[str, None] = OrderedDict({default: None})
        self.stats = LruStats()

    def labels_of(self, name: str) -> tuple[str, ...]:
        """The adapter's labels from its metadata.json (read once per adapter); UnknownAdapter if absent."""
        if name in self.labels:
            return self.labels[name]
        directory = self.adapters_dir / name
        if not ADAPTER_NAME.match(name) or not (directory / WEIGHTS_FILE).is_file():
            raise UnknownAdapter(name)
        if not (directory / METADATA_FILE).is_file():
            raise UnknownAdapter(name)
        labels = tuple(AdapterMetadata.read(directory).labels)
        if len(labels) != len(self.labels[self.default]):
            raise IncompatibleAdapter(f"{name} has {len(labels)} labels, the model's head {len(self.labels[self.default])}")
        self.labels[name] = labels
        return labels

    def _ensure_loaded(self, name: str) -> None:
        """Caller holds the lock."""
        if name in self.recent:
            self.recent.move_to_end(name)
            self.stats.hits += 1
            return
        while len(self.recent) >= self.max_loaded:
            victim, _ = self.recent.popitem(last=False)
            self.model.delete_adapter(victim)
            self.stats.evictions += 1
        started = time.perf_counter()
        # PEFT puts the new LoRA weights on the base layer's device and switches the model to eval.
        self.model.load_adapter(str(self.adapters_dir / name), adapter_name=name, torch_device=str(self.device))
        self.stats.load_s += time.perf_counter() - started
        self.stats.loads += 1
        self.recent[name] = None

    def classify(self, premise: str, hypothesis: str, adapter: str) -> list[float]:
        with self.lock:
            self._ensure_loaded(adapter)
            return super().classify(premise, hypothesis, adapter)

    def snapshot(self) -> LruStats:
        with self.lock:
            return LruStats(
                loads=self.stats.loads, hits=self.stats.hits, evictions=self.stats.evictions,
                load_s=self.stats.load_s, loaded=list(self.recent),
            )


def create_app(adapters_dir: Path, default: str, *, max_loaded: int, config: NaiveConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.server = await anyio.to_thread.run_sync(
            lambda: LruPeftServer(adapters_dir, default, max_loaded=max_loaded, config=config)
        )
        yield

    app = FastAPI(title="peft-lru baseline", lifespan=lifespan)

    @app.get("/readyz")
    async def get_readyz() -> dict:
        return {"ready": True}

    @app.get("/stats")
    async def get_stats() -> dict:
        return app.state.server.snapshot().__dict__

    @app.post("/nli", response_model=NLIResponse)
    async def create_nli(body: NLIRequest) -> NLIResponse:
        server: LruPeftServer = app.state.server
        name = body.adapter or server.default
        try:
            # Known labels without a thread hop; a first request reads the adapter's metadata.json.
            labels = server.labels.get(name) or await anyio.to_thread.run_sync(server.labels_of, name)
        except UnknownAdapter:
            raise HTTPException(404, f"no adapter named {name!r}") from None
        except ValueError as exc:  # IncompatibleAdapter or an invalid metadata.json
            raise HTTPException(422, str(exc)) from None
        probabilities = await anyio.to_thread.run_sync(server.classify, body.premise, body.hypothesis, name)
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return NLIResponse(label=labels[best], scores=dict(zip(labels, probabilities)), adapter=name)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters-dir", type=Path, required=True, help="one sub-directory per adapter")
    parser.add_argument("--default", required=True, help="adapter loaded at start and used when a request names none")
    parser.add_argument("--max-loaded", type=int, default=DEFAULT_MAX_LOADED, help="adapters kept loaded (LRU)")
    parser.add_argument("--base", default="embedded", help="base id or directory (default: embedded)")
    parser.add_argument("--random-init", action="store_true", help="random base weights (seeded, like the server)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens a pair is truncated to")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.max_loaded < 1:
        parser.error("--max-loaded must be at least 1")
    logging.basicConfig(level=args.log_level.upper())
    config = NaiveConfig(
        base=args.base, random_init=args.random_init, device=args.device, torch_threads=args.torch_threads,
        max_seq_len=args.max_seq_len,
    )
    app = create_app(args.adapters_dir, args.default, max_loaded=args.max_loaded, config=config)
    # One worker: more would each load the model (and still serialise on their own lock).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
