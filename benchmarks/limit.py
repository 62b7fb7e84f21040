"""The in-process limit: the merged model, no server, no LoRA, length-sorted batches of the pairs.

It is the best this machine does with that model in-process: `calibrate` times every configuration
(HF's padded forward and loraswap's padding-free one, several batch sizes, the servers' thread count
and all cores) on the warm-up pairs and keeps the fastest at the servers' thread count; the whole
sweep goes into the results, so an all-cores figure is on record too."""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from app.inference.base_model import encoder_of, head_of, load_tokenizer, resolve_base
from app.inference.packed import PackedEncoder, pack
from benchmarks.workload import Pair

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LimitResult:
    pairs: int
    duration_s: float
    cpu_s: float  # this process's CPU seconds over the timed loops, all threads

    @property
    def pairs_s(self) -> float:
        return self.pairs / self.duration_s if self.duration_s else 0.0

    @property
    def cpu_ms_per_pair(self) -> float:
        return 1000.0 * self.cpu_s / self.pairs if self.pairs else 0.0

    def __add__(self, other: LimitResult) -> LimitResult:
        return LimitResult(self.pairs + other.pairs, self.duration_s + other.duration_s, self.cpu_s + other.cpu_s)


def _sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the clock would stop before the GPU does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = ("padded", "packed")


class LimitRunner:
    """The merged model loaded once in this process (bf16 on CUDA, SDPA attention like the server).

    `run` sorts the pairs it is given by token length (known ahead, as a limit may), cuts them into
    batches, and times tokenizing and running them. The batches go in a shuffled order, so stopping
    at a time limit leaves a fair sample of short and long ones. `mode` padded: HF's forward on
    padded batches; packed: loraswap's padding-free forward (app/inference/packed.py) on the same model.
    """

    def __init__(self, model_dir: Path, *, device: str, batch_size: int, max_seq_len: int, torch_threads: int):
        self.torch_threads = torch_threads or torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.mode = "padded"
        self.max_seq_len = max_seq_len
        self.sweep: list[dict] = []
        self.tokenizer = load_tokenizer(resolve_base(str(model_dir)))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="sdpa")
        self.model.eval().to(self.device, dtype)
        self.packed = PackedEncoder(encoder_of(self.model), self.model.config)
        self.uses_pooler = self.model.config.model_type == "bert"

    @property
    def config(self) -> dict:
        return {"mode": self.mode, "batch": self.batch_size, "torch_threads": self.torch_threads}

    def calibrate(self, pairs: list[Pair], *, batch_sizes=(16, 32), modes=MODES, thread_counts=()) -> dict:
        """Time every forward and batch size on `pairs` (after an untimed pass each) at this runner's
        thread count and keep the fastest; then time that one at each of `thread_counts` too, for the
        record (not chosen: the servers are held to this runner's count)."""
        best: tuple[float, str, int] | None = None
        for mode in modes:
            for batch in batch_sizes:
                pairs_s = self._time(pairs, mode, batch, self.torch_threads)
                if best is None or pairs_s > best[0]:
                    best = (pairs_s, mode, batch)
        assert best is not None
        _, self.mode, self.batch_size = best
        for threads in thread_counts:
            if threads != self.torch_threads:
                self._time(pairs, self.mode, self.batch_size, threads)
        torch.set_num_threads(self.torch_threads)
        logger.info("limit: the fastest at %d threads is %s", self.torch_threads, self.config)
        return self.config

    def _time(self, pairs: list[Pair], mode: str, batch: int, threads: int) -> float:
        saved = self.mode, self.batch_size
        self.mode, self.batch_size = mode, batch
        torch.set_num_threads(threads)
        try:
            self.warm_up(pairs)
            pairs_s = self.run(pairs, max_duration_s=float("inf")).pairs_s
        finally:
            self.mode, self.batch_size = saved
            torch.set_num_threads(self.torch_threads)
        self.sweep.append({"mode": mode, "batch": batch, "torch_threads": threads, "pairs_s": round(pairs_s, 1)})
        return pairs_s

    def _batches(self, pairs: list[Pair]) -> list[list[Pair]]:
        lengths = self.tokenizer(
            [p.premise for p in pairs], [p.hypothesis for p in pairs], truncation=True, max_length=self.max_seq_len
        )["input_ids"]
        order = sorted(range(len(pairs)), key=lambda i: len(lengths[i]))
        return [[pairs[i] for i in order[s : s + self.batch_size]] for s in range(0, len(order), self.batch_size)]

    def _forward(self, batch: list[Pair]) -> list[list[float]]:
        if self.mode == "packed":
            encoded = self.tokenizer(
                [p.premise for p in batch], [p.hypothesis for p in batch], truncation=True, max_length=self.max_seq_len
            )
            packed = pack(encoded["input_ids"], encoded.get("token_type_ids"),
                          position_offset=self.packed.position_offset, device=self.device)
            logits = head_of(self.model)(self.packed(packed, use_pooler=self.uses_pooler))
            return torch.softmax(logits.float(), dim=-1).cpu().tolist()
        inputs = self.tokenizer(
            [p.premise for p in batch],
            [p.hypothesis for p in batch],
            truncation=True,
            max_length=self.max_seq_len,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        logits = self.model(**inputs).logits  # [batch, labels]
        return torch.softmax(logits.float(), dim=-1).cpu().tolist()

    def warm_up(self, pairs: list[Pair]) -> None:
        batches = self._batches(pairs)
        with torch.inference_mode():
            # The longest batch first, so the allocator has grown to its size before any clock starts.
            for batch in (batches[-1], batches[len(batches) // 2]):
                self._forward(batch)
        _sync(self.device)

    def run(self, pairs: list[Pair], *, max_duration_s: float, seed: int = 0) -> LimitResult:
        batches = self._batches(pairs)
        random.Random(seed).shuffle(batches)
        done = 0
        with torch.inference_mode():
            _sync(self.device)
            cpu_started, started = time.process_time(), time.perf_counter()
            for batch in batches:
                self._forward(batch)
                done += len(batch)
                if time.perf_counter() - started > max_duration_s:
                    break
            _sync(self.device)
            duration, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        logger.info("limit: %d pairs in %.2f s = %.1f pairs/s", done, duration, done / duration)
        return LimitResult(pairs=done, duration_s=duration, cpu_s=cpu)


def time_single_pair(runner: LimitRunner, pair: Pair, mode: str) -> float:
    """Milliseconds for one pair alone in-process (tokenize, forward, softmax) in forward `mode`."""
    saved = runner.mode
    runner.mode = mode
    try:
        with torch.inference_mode():
            _sync(runner.device)
            started = time.perf_counter()
            runner._forward([pair])
            _sync(runner.device)
            return (time.perf_counter() - started) * 1000.0
    finally:
        runner.mode = saved


def single_pair_summary(times_by_mode: dict[str, list[float]]) -> dict:
    """p50/p99 of the single-pair times per forward; the faster forward's are the reference for a
    server's concurrency-1 latency."""
    by_mode = {}
    for mode, times in times_by_mode.items():
        ordered = sorted(times)
        by_mode[mode] = {
            "p50_ms": round(statistics.median(ordered), 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
        }
    best = min(by_mode, key=lambda m: by_mode[m]["p50_ms"])
    return {"mode": best, **by_mode[best], "by_mode": by_mode}
