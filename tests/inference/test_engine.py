"""The correctness oracle: the engine's probabilities equal PEFT's for that adapter alone and after
merge_and_unload(), within 1e-4 on CPU fp32, whether the adapter's rows run alone or mixed."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from app.inference.base_model import build_classifier, load_tokenizer
from app.inference.engine import NLIEngine
from tests.conftest import SYNTHETIC_ADAPTERS

PAIRS = [
    ("A man is playing a guitar on stage.", "A person plays music."),
    ("Two dogs run through a field.", "Animals are moving quickly across a field of tall grass near a river."),
    ("The cat sat on the mat while the sun was shining brightly outside.", "A cat is outside."),
    ("Nobody came.", "Everyone came to the party that was held at the old house on the hill last night."),
    ("Stocks fell sharply on Monday.", "Markets rose."),
    ("She reads.", "She is reading a book."),
]
NAMES = [name for name, *_ in SYNTHETIC_ADAPTERS]
TOLERANCE = 1e-4


def reference(spec, adapter_dir, labels, merged: bool) -> list[list[float]]:
    """What plain PEFT gives for every pair with this adapter alone, one pair at a time."""
    model = PeftModel.from_pretrained(build_classifier(spec, num_labels=len(labels)), str(adapter_dir))
    if merged:
        model = model.merge_and_unload()
    model.eval()
    tok = load_tokenizer(spec)
    out = []
    with torch.no_grad():
        for premise, hypothesis in PAIRS:
            encoded = tok(premise, hypothesis, truncation=True, max_length=256, return_tensors="pt")
            out.append(torch.softmax(model(**encoded).logits, dim=-1)[0].tolist())
    return out


@pytest.fixture(scope="module", params=["tiny-roberta", "embedded"])
def setup(request, tiny_roberta_spec, roberta_adapters, embedded_spec, embedded_adapters):
    spec, root = (
        (tiny_roberta_spec, roberta_adapters) if request.param == "tiny-roberta" else (embedded_spec, embedded_adapters)
    )
    engine = NLIEngine(spec, device="cpu", max_seq_len=256)
    adapters = {name: engine.read_adapter(name, root / name) for name in NAMES}
    references = {
        (name, merged): reference(spec, root / name, adapters[name].labels, merged)
        for name in NAMES
        for merged in (False, True)
    }
    return engine, adapters, references


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) < TOLERANCE, (got, want)


def test_references_are_not_trivial(setup):
    # Guards the oracle itself: distinct adapters must disagree, or equality would prove nothing.
    _, _, references = setup
    alpha, gamma = references[("alpha", False)], references[("gamma", False)]
    assert max(abs(a - b) for row_a, row_b in zip(alpha, gamma) for a, b in zip(row_a, row_b)) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_single_adapter_batch_matches_peft_and_merged(setup, name):
    engine, adapters, references = setup
    encoded = engine.encode([p for p, _ in PAIRS], [h for _, h in PAIRS])
    got = engine.run(encoded, [adapters[name]] * len(PAIRS))
    for row, probs in enumerate(got):
        assert_close(probs, references[(name, False)][row])
        assert_close(probs, references[(name, True)][row])


def use_layout(engine: NLIEngine, layout: str, monkeypatch) -> None:
    """packed: the padding-free forward with per-adapter spans (the default for BERT-family bases);
    segmented / gathered: HF's padded forward with segments at each adapter's own rank, or rows
    gathered and padded to r_max (the layout for many adapters a batch)."""
    assert engine.packed is not None, "both test bases are BERT-family: the engine packs by default"
    if layout != "packed":
        monkeypatch.setattr(engine, "packed", None)
        monkeypatch.setattr(engine, "segmented_max_adapters", 0 if layout == "gathered" else len(NAMES))


@pytest.mark.parametrize("layout", ["packed", "segmented", "gathered"])
def test_mixed_batch_matches_each_adapter_alone(setup, layout, monkeypatch):
    engine, adapters, references = setup
    use_layout(engine, layout, monkeypatch)
    # Every adapter appears on several rows, interleaved, with different ranks, label sets and targets.
    rows = [(i % len(PAIRS), NAMES[(i * 7) % len(NAMES)]) for i in range(len(PAIRS) * len(NAMES))]
    encoded = engine.encode([PAIRS[i][0] for i, _ in rows], [PAIRS[i][1] for i, _ in rows])
    got = engine.run(encoded, [adapters[name] for _, name in rows])
    for (pair_index, name), probs in zip(rows, got):
        assert_close(probs, references[(name, False)][pair_index])
        assert_close(probs, references[(name, True)][pair_index])


def test_base_is_never_modified(setup):
    engine, adapters, _ = setup
    before = {k: v.clone() for k, v in engine.encoder.state_dict().items()}
    encoded = engine.encode([PAIRS[0][0]], [PAIRS[0][1]])
    for name in NAMES:
        engine.run(encoded, [adapters[name]])
    after = engine.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_only_adapter_is_the_base_plus_its_head(tiny_roberta_spec, roberta_adapters, tmp_path):
    """An adapter with a head and no LoRA tensors (a linear probe; also how the merged ceiling is served)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from app.artifacts import sha256_tag as sha256_file

    source, target = roberta_adapters / "alpha", tmp_path / "probe"
    shutil.copytree(source, target)
    head = {k: v for k, v in load_file(str(source / "adapter_model.safetensors")).items() if ".classifier." in k}
    save_file(head, str(target / "adapter_model.safetensors"))
    config = json.loads((target / "adapter_config.json").read_text())
    config["target_modules"] = []
    (target / "adapter_config.json").write_text(json.dumps(config))
    meta = json.loads((target / "metadata.json").read_text())
    meta["files"] = {name: sha256_file(target / name) for name in meta["files"]}
    (target / "metadata.json").write_text(json.dumps(meta))

    engine = NLIEngine(tiny_roberta_spec, device="cpu")
    probe = engine.read_adapter("probe", target)
    assert probe.target_modules == () and probe.a == {}

    model = build_classifier(tiny_roberta_spec, num_labels=3).eval()
    model.classifier.load_state_dict({k.split(".classifier.", 1)[1]: v for k, v in head.items()})
    tok = load_tokenizer(tiny_roberta_spec)
    encoded = engine.encode([p for p, _ in PAIRS], [h for _, h in PAIRS])
    got = engine.run(encoded, [probe] * len(PAIRS))
    with torch.no_grad():
        for (premise, hypothesis), probs in zip(PAIRS, got):
            x = tok(premise, hypothesis, truncation=True, max_length=256, return_tensors="pt")
            assert_close(probs, torch.softmax(model(**x).logits, dim=-1)[0].tolist())


def test_slots_are_reused_and_answers_survive_eviction_and_reload(tiny_roberta_spec, roberta_adapters):
    """Two slots for three adapters: every batch evicts one; answers stay exactly those of PEFT."""
    engine = NLIEngine(tiny_roberta_spec, device="cpu", max_resident=2, max_rank=16)
    adapters = {name: engine.read_adapter(name, roberta_adapters / name) for name in NAMES}
    encoded = engine.encode([PAIRS[0][0]], [PAIRS[0][1]])
    first = {name: engine.run(encoded, [adapters[name]])[0] for name in NAMES}
    buffers = {m: t.data_ptr() for m, t in engine.slots.a.items()}
    assert engine.slots.counters() == (2, 3, 1)
    again = {name: engine.run(encoded, [adapters[name]])[0] for name in reversed(NAMES)}
    assert again == first  # evicted and moved back in: bit-identical
    assert {m: t.data_ptr() for m, t in engine.slots.a.items()} == buffers  # allocated once
    assert engine.slots.counters()[1:] == (4, 2)  # gamma and beta still held; alpha back, evicting gamma


def test_a_rank_over_the_slots_maximum_is_refused_at_load(tiny_roberta_spec, roberta_adapters):
    from app.inference.adapter_loader import AdapterLoadError

    engine = NLIEngine(tiny_roberta_spec, device="cpu", max_rank=8)
    with pytest.raises(AdapterLoadError) as caught:
        engine.read_adapter("alpha", roberta_adapters / "alpha")  # r=16
    assert caught.value.kind == "invalid"


BF16_TOLERANCE = 0.02


def test_bf16_engine_matches_fp32_peft_in_mixed_batches(tiny_roberta_spec, roberta_adapters, monkeypatch):
    """The CUDA dtype path, run on the CPU: base, slots and heads in bf16 against PEFT in fp32.
    bf16 keeps 8 bits of mantissa, so probabilities agree to about 1e-2, not 1e-4."""
    import app.inference.engine as engine_module

    monkeypatch.setattr(NLIEngine, "_dtype_for", staticmethod(lambda device: torch.bfloat16))
    engine = engine_module.NLIEngine(tiny_roberta_spec, device="cpu")
    assert engine.dtype == torch.bfloat16 and engine.slots.dtype == torch.bfloat16
    adapters = {name: engine.read_adapter(name, roberta_adapters / name) for name in NAMES}
    references = {name: reference(tiny_roberta_spec, roberta_adapters / name, adapters[name].labels, False) for name in NAMES}
    rows = [(i % len(PAIRS), NAMES[(i * 7) % len(NAMES)]) for i in range(len(PAIRS) * len(NAMES))]
    encoded = engine.encode([PAIRS[i][0] for i, _ in rows], [PAIRS[i][1] for i, _ in rows])
    for layout in ("packed", "segmented", "gathered"):
        with monkeypatch.context() as patch:
            use_layout(engine, layout, patch)
            got = engine.run(encoded, [adapters[name] for _, name in rows])
        worst = max(
            abs(a - b) for (i, name), probs in zip(rows, got) for a, b in zip(probs, references[name][i])
        )
        assert worst < BF16_TOLERANCE, (layout, worst)


def test_retired_slots_are_freed_outside_a_forward(tiny_roberta_spec, roberta_adapters):
    """The batcher frees retired slots from its idle loop, outside any forward (inference mode)."""
    engine = NLIEngine(tiny_roberta_spec, device="cpu", max_resident=2, max_rank=16)
    alpha = engine.read_adapter("alpha", roberta_adapters / "alpha")
    encoded = engine.encode([PAIRS[0][0]], [PAIRS[0][1]])
    engine.run(encoded, [alpha])
    held = engine.slots.bytes_held()
    engine.slots.retire(alpha)
    assert engine.free_retired() == 1
    assert engine.slots.counters()[0] == 0 and engine.slots.bytes_held() < held  # its head is gone
    assert all(not t.any() for t in engine.slots.a.values())  # and its slot zeroed


@pytest.mark.parametrize("layout", ["packed", "gathered"])
def test_a_slot_reused_by_adapters_of_other_ranks_and_modules_reads_only_the_new_one(
    tiny_roberta_spec, roberta_adapters, layout, monkeypatch
):
    """One slot, occupants of rank 16, 8, 16, 4 (other modules), 16: each answer is that adapter's
    alone, and past the occupant's rank (and outside its modules) the slot holds zeros — which the
    gathered layout, reading all r_max rows, depends on."""
    engine = NLIEngine(tiny_roberta_spec, device="cpu", max_resident=1, max_rank=16)
    use_layout(engine, layout, monkeypatch)
    adapters = {name: engine.read_adapter(name, roberta_adapters / name) for name in NAMES}
    references = {name: reference(tiny_roberta_spec, roberta_adapters / name, adapters[name].labels, False) for name in NAMES}
    encoded = engine.encode([p for p, _ in PAIRS], [h for _, h in PAIRS])
    for name in ("alpha", "beta", "alpha", "gamma", "alpha"):
        adapter = adapters[name]
        for got, want in zip(engine.run(encoded, [adapter] * len(PAIRS)), references[name]):
            assert_close(got, want)
        for module in engine.slots.a:
            a, b = engine.slots.a[module][0], engine.slots.b[module][0]
            written = adapter.rank if module in adapter.a else 0
            assert not a[written:].any() and not b[:, written:].any(), (name, module)
    assert engine.slots.counters()[1] == 5  # every step moved its adapter in
