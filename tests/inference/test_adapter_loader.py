"""Every way an adapter can be bad is caught at load time, with the right kind of error."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.artifacts import sha256_tag as sha256_file
from app.inference.adapter_loader import AdapterLoadError, HostSlab, load_adapter
from app.inference.engine import NLIEngine
from training.synthetic_adapter import write_random_adapter


@pytest.fixture(scope="module")
def engine(tiny_roberta_spec):
    return NLIEngine(tiny_roberta_spec, device="cpu")


@pytest.fixture
def good(tmp_path, roberta_adapters) -> Path:
    target = tmp_path / "good"
    shutil.copytree(roberta_adapters / "alpha", target)
    return target


def _rewrite_metadata(path: Path, **changes) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(changes)
    (path / "metadata.json").write_text(json.dumps(meta))


def _rewrite_weights(path: Path, change) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    _refresh_checksums(path)


def _refresh_checksums(path: Path) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    meta["files"] = {name: sha256_file(path / name) for name in meta["files"]}
    (path / "metadata.json").write_text(json.dumps(meta))


def _first_key(tensors, part: str) -> str:
    return next(k for k in sorted(tensors) if f"lora_{part}" in k)


def corrupt_safetensors(p: Path) -> None:
    (p / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    _refresh_checksums(p)


def truncated_safetensors(p: Path) -> None:
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _refresh_checksums(p)


def pickle_instead(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, p / "adapter_model.bin")


def pickle_dressed_as_safetensors(p: Path) -> None:
    torch.save({"x": torch.zeros(1)}, p / "adapter_model.safetensors")
    _refresh_checksums(p)


def modified_after_training(p: Path) -> None:
    tensors = load_file(str(p / "adapter_model.safetensors"))
    key = _first_key(tensors, "B")
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(p / "adapter_model.safetensors"))  # checksums NOT refreshed


def other_base(p: Path) -> None:
    _rewrite_metadata(p, base={"id": "roberta-large", "fingerprint": "sha256:" + "0" * 64})


def wrong_rank_shapes(p: Path) -> None:
    def change(t):
        key = _first_key(t, "A")
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])

    _rewrite_weights(p, change)


def nan_weights(p: Path) -> None:
    def change(t):
        key = _first_key(t, "B")
        t[key] = torch.full_like(t[key], float("nan"))

    _rewrite_weights(p, change)


def infinite_head(p: Path) -> None:
    def change(t):
        key = next(k for k in sorted(t) if "classifier" in k and k.endswith("weight"))
        t[key][0, 0] = float("inf")

    _rewrite_weights(p, change)


def overflows_when_scaled(p: Path) -> None:
    # Finite in the file, infinite once B is multiplied by lora_alpha / r.
    def change(t):
        key = _first_key(t, "B")
        t[key][0, 0] = 3e38

    _rewrite_weights(p, change)
    config = json.loads((p / "adapter_config.json").read_text())
    config["lora_alpha"] = config["r"] * 4
    (p / "adapter_config.json").write_text(json.dumps(config))
    _refresh_checksums(p)


def unknown_tensor(p: Path) -> None:
    _rewrite_weights(p, lambda t: t.__setitem__("base_model.model.roberta.embeddings.word_embeddings.weight", torch.zeros(2, 2)))


def missing_lora_b(p: Path) -> None:
    _rewrite_weights(p, lambda t: t.pop(_first_key(t, "B")))


def no_head(p: Path) -> None:
    _rewrite_weights(p, lambda t: [t.pop(k) for k in [k for k in t if "classifier" in k]])


def labels_do_not_fit_head(p: Path) -> None:
    _rewrite_metadata(p, labels=["yes", "no"])


def duplicate_labels(p: Path) -> None:
    _rewrite_metadata(p, labels=["a", "a", "b"])


def dora(p: Path) -> None:
    config = json.loads((p / "adapter_config.json").read_text())
    config["use_dora"] = True
    (p / "adapter_config.json").write_text(json.dumps(config))
    _refresh_checksums(p)


def not_lora(p: Path) -> None:
    config = json.loads((p / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (p / "adapter_config.json").write_text(json.dumps(config))
    _refresh_checksums(p)


def no_labels_anywhere(p: Path) -> None:
    # A plain PEFT directory (no metadata.json) with no id2label and no labels in the request.
    (p / "metadata.json").unlink()
    (p / "config.json").unlink(missing_ok=True)


def metadata_not_json(p: Path) -> None:
    (p / "metadata.json").write_text("{not json")


def unknown_format(p: Path) -> None:
    _rewrite_metadata(p, format_version=99)


def missing_config(p: Path) -> None:
    (p / "adapter_config.json").unlink()
    meta = json.loads((p / "metadata.json").read_text())
    meta["files"].pop("adapter_config.json")
    (p / "metadata.json").write_text(json.dumps(meta))


BAD_ADAPTERS = [
    corrupt_safetensors,
    truncated_safetensors,
    pickle_instead,
    pickle_dressed_as_safetensors,
    modified_after_training,
    other_base,
    wrong_rank_shapes,
    nan_weights,
    infinite_head,
    overflows_when_scaled,
    unknown_tensor,
    missing_lora_b,
    no_head,
    labels_do_not_fit_head,
    duplicate_labels,
    dora,
    not_lora,
    no_labels_anywhere,
    metadata_not_json,
    unknown_format,
    missing_config,
]


def test_good_adapter_loads(engine, good):
    adapter = engine.read_adapter("good", good)
    assert adapter.labels == ("entailment", "neutral", "contradiction")
    assert adapter.rank == 16
    assert adapter.target_modules == ("query", "value")
    assert adapter.size_bytes == (good / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize("damage", BAD_ADAPTERS, ids=lambda f: f.__name__)
def test_bad_adapter_is_refused_at_load(engine, good, damage):
    damage(good)
    with pytest.raises(AdapterLoadError) as caught:
        engine.read_adapter("bad", good)
    assert caught.value.kind == "invalid"
    assert caught.value.message


def test_missing_directory_is_not_found(engine, tmp_path):
    with pytest.raises(AdapterLoadError) as caught:
        engine.read_adapter("gone", tmp_path / "does-not-exist")
    assert caught.value.kind == "not_found"


def test_adapter_of_the_embedded_base_is_refused_on_roberta(engine, embedded_adapters):
    with pytest.raises(AdapterLoadError) as caught:
        engine.read_adapter("alpha", embedded_adapters / "alpha")
    assert caught.value.kind == "invalid"


def test_rslora_scaling_is_honoured(engine, tiny_roberta_spec, tmp_path):
    path = write_random_adapter(tiny_roberta_spec, tmp_path / "rs", name="rs", rank=4, alpha=8, seed=5)
    plain = engine.read_adapter("rs", path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (path / "adapter_config.json").write_text(json.dumps(config))
    _refresh_checksums(path)
    scaled = engine.read_adapter("rs", path)
    module = next(iter(plain.b))
    # alpha/r = 2 versus alpha/sqrt(r) = 4
    assert torch.allclose(scaled.b[module], plain.b[module] * 2)


def test_loaded_adapter_does_not_depend_on_its_file(engine, good):
    """The weights are copied out of the file: rewriting or truncating it later changes nothing."""
    adapter = engine.read_adapter("good", good)
    encoded = engine.encode(["A man plays a guitar."], ["Someone makes music."])
    before = engine.run(encoded, [adapter])
    weights = good / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert engine.run(encoded, [adapter]) == before


def test_a_reload_of_unchanged_files_hashes_nothing(engine, good, monkeypatch):
    """Checksums are remembered per file version: reloading an evicted adapter whose files did not
    change hashes nothing."""
    engine.read_adapter("good", good)

    def no_hashing(*args, **kwargs):
        raise AssertionError("an unchanged file was hashed again")

    monkeypatch.setattr("app.inference.adapter_loader.sha256_tag", no_hashing)
    monkeypatch.setattr("app.inference.adapter_loader.sha256_tag_of", no_hashing)
    assert engine.read_adapter("good", good).labels == ("entailment", "neutral", "contradiction")


def test_a_changed_file_is_checked_again_even_with_its_old_size_and_mtime(engine, good):
    """The remembered checksum is keyed by the file's identity, ctime included: a same-size rewrite
    with its mtime set back is still caught by the checksum in metadata.json."""
    engine.read_adapter("good", good)
    weights = good / "adapter_model.safetensors"
    before = weights.stat()
    with open(weights, "r+b") as handle:  # in place: same inode, same size; one weight byte changed
        handle.seek(-3, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x01]))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(AdapterLoadError, match="does not match its sha256"):
        engine.read_adapter("good", good)


def _anonymous_memory() -> tuple[int, int]:
    """(bytes of anonymous private mappings, RssAnon bytes) of this process, from /proc."""
    mapped = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[1].endswith("p"):  # no path: anonymous, private
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped += end - start
    status = Path("/proc/self/status").read_text()
    rss_anon = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:"))
    return mapped, rss_anon


def _host_bytes(adapter) -> int:
    tensors = [*adapter.a.values(), *adapter.b.values(), *adapter.head.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _churn_in_a_fresh_process(base_source: str, adapter_dir: str) -> dict:
    """The host-tier churn of the test below, run in a child process of its own: it measures the whole
    process's anonymous memory, which another test's leftovers (a collected model, a server thread
    winding down) would move in the test runner's process."""
    from app.inference.base_model import resolve_base

    base_info = NLIEngine(resolve_base(base_source), device="cpu").base_info
    path = Path(adapter_dir)
    window: deque = deque(maxlen=4)  # the host tier
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="loader") as pool:
        for _ in range(4):  # first loads pay one-off costs (the threads' arenas, caches): not counted
            window.append(pool.submit(load_adapter, "big", path, base_info).result())
        window.clear()
        gc.collect()
        HostSlab.drop_spares()
        out = {"before": _anonymous_memory()}
        for _ in range(24):
            window.append(pool.submit(load_adapter, "big", path, base_info).result())
    out["size"] = _host_bytes(window[0])
    # Nothing of the file stays mapped: the weights were copied out of it.
    out["file_mapped"] = str(path / "adapter_model.safetensors") in Path("/proc/self/maps").read_text()
    out["held"] = _anonymous_memory()
    window.clear()
    gc.collect()
    out["kept"] = _anonymous_memory()
    HostSlab.drop_spares()
    out["after"] = _anonymous_memory()
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_evicted_adapters_give_their_memory_back(tiny_roberta_spec, tmp_path):
    """Host-tier churn as the registry does it (loads on loader threads, the least recently used
    dropped as a new one comes): an adapter's weights are mappings of their own, so dropping the
    adapters gives their bytes back to the kernel (all but the few spares kept for the next loads),
    where malloc's arenas would keep them."""
    targets = ("query", "key", "value", "dense")  # big enough to count: 1.8 MB a copy
    path = write_random_adapter(tiny_roberta_spec, tmp_path / "big", name="big", rank=512, target_modules=targets)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        m = child.submit(_churn_in_a_fresh_process, tiny_roberta_spec.source, str(path)).result(timeout=300)
    size = m["size"]
    (mapped_before, rss_before), (mapped_held, rss_held) = m["before"], m["held"]
    assert size > 1_500_000 and not m["file_mapped"]
    assert mapped_held - mapped_before > 3.5 * size  # the 4 held (to a few pages)
    assert rss_held - rss_before > 3.5 * size
    assert rss_held - rss_before < 6 * size  # the 20 dropped ones are not held too (the spares are)
    mapped_kept, rss_kept = m["kept"]
    assert mapped_kept - mapped_before < HostSlab.SPARES / 2 * size + size  # only the spares stay
    assert rss_kept - rss_before < HostSlab.SPARES / 2 * size + size
    mapped_after, rss_after = m["after"]
    assert mapped_after - mapped_before < size
    assert rss_after - rss_before < size
