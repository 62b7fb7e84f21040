"""The in-process limit: the merged model, no server, no LoRA, length-sorted batches of the pairs."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from app.inference.base_model import load_tokenizer, resolve_base
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


class LimitRunner:
    """The merged model loaded once in this process (bf16 on CUDA, SDPA attention like the server).

    `run` sorts the pairs it is given by token length (known ahead, as a limit may), cuts them into
    batches, and times tokenizing and running them. The batches go in a shuffled order, so stopping
    at a time limit leaves a fair sample of short and long ones.
    """

    def __init__(self, model_dir: Path, *, device: str, batch_size: int, max_seq_len: int, torch_threads: int):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.tokenizer = load_tokenizer(resolve_base(str(model_dir)))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="sdpa")
        self.model.eval().to(self.device, dtype)

    def _batches(self, pairs: list[Pair]) -> list[list[Pair]]:
        lengths = self.tokenizer(
            [p.premise for p in pairs], [p.hypothesis for p in pairs], truncation=True, max_length=self.max_seq_len
        )["input_ids"]
        order = sorted(range(len(pairs)), key=lambda i: len(lengths[i]))
        return [[pairs[i] for i in order[s : s + self.batch_size]] for s in range(0, len(order), self.batch_size)]

    def _forward(self, batch: list[Pair]) -> list[list[float]]:
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
