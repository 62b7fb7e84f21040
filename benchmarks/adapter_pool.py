"""A pool of many synthetic adapters on one base, generated once and cached on disk.

PEFT writes one template (training.synthetic_adapter.write_random_adapter); the others are clones of
it with their own random tensors (benchmarks.adapter_sets.write_synthetic), so 1,000 adapters take
seconds, not the minutes 1,000 PEFT models would. A pool is keyed by (count, rank, base fingerprint)
and reused by later runs; it is built in a scratch directory and renamed into place when complete,
so an interrupted build is never mistaken for a pool."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from app.artifacts import WEIGHTS_FILE, AdapterMetadata, write_json_atomic
from benchmarks.adapter_sets import AdapterSet, write_synthetic

logger = logging.getLogger(__name__)

POOL_ROOT = Path(tempfile.gettempdir()) / "loraswap-adapter-pool"
MANIFEST_FILE = "pool.json"  # written last: its presence means the pool is complete


def pool_names(count: int) -> list[str]:
    """synth-0000, synth-0001, ...: most popular first under Zipf."""
    return [f"synth-{i:04d}" for i in range(count)]


def pool_dir(count: int, rank: int, base_fingerprint: str, root: Path = POOL_ROOT) -> Path:
    return Path(root) / f"n{count}-r{rank}-{base_fingerprint.removeprefix('sha256:')[:16]}"


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def prepare_pool(spec, count: int, *, rank: int, base_fingerprint: str, root: Path = POOL_ROOT) -> AdapterSet:
    """`count` random adapters of rank `rank` for the base `spec`, all three-way NLI, under one
    directory (what LORASWAP_ADAPTERS_DIR points at); reused when a complete pool already exists."""
    directory = pool_dir(count, rank, base_fingerprint, root)
    names = pool_names(count)
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("names") == names:
        logger.info("reusing %d adapters (r=%d) in %s", count, rank, directory)
        return AdapterSet(root=directory, names=names, kind="synthetic")
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    started = time.perf_counter()
    try:
        write_synthetic(spec, scratch, names, rank=rank, base_fingerprint=base_fingerprint)
        for name in names:
            # What the server will parse: every clone must be a valid metadata.json of this rank.
            meta = AdapterMetadata.read(scratch / name)
            if meta.name != name or meta.lora is None or meta.lora.r != rank:
                raise RuntimeError(f"generated adapter {name} declares {meta.name!r}, rank {meta.lora}")
        seconds = time.perf_counter() - started
        write_json_atomic(scratch / MANIFEST_FILE, {
            "count": count,
            "rank": rank,
            "base_fingerprint": base_fingerprint,
            "adapter_file_bytes": (scratch / names[0] / WEIGHTS_FILE).stat().st_size,
            "generated_s": round(seconds, 1),
            "names": names,
        })
        if directory.exists():  # an incomplete pool from an interrupted run, or a concurrent build
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(scratch, directory)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("generated %d adapters (r=%d) in %.1f s under %s", count, rank, seconds, directory)
    return AdapterSet(root=directory, names=names, kind="synthetic")


def adapter_file_bytes(adapters: AdapterSet) -> int:
    """Size of one adapter's weights file (all adapters of a pool have the same shapes)."""
    return (adapters.path(adapters.names[0]) / WEIGHTS_FILE).stat().st_size
