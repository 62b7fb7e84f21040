"""The padding-free forward: its layout, where it applies, and that it answers as the padded forward
does on batches whose rows differ wildly in length (the case padding is worst at)."""

from __future__ import annotations

import pytest
import torch

from app.inference.base_model import build_classifier, encoder_of
from app.inference.engine import NLIEngine
from app.inference.packed import _attention_blocks, pack, packable
from tests.conftest import SYNTHETIC_ADAPTERS

NAMES = [name for name, *_ in SYNTHETIC_ADAPTERS]


def test_pack_lays_sequences_end_to_end_and_blocks_cover_every_token_once():
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14], [15, 16]]
    types = [[0, 0, 1], [0], [0, 0, 0, 1, 1, 1], [0, 1]]
    batch = pack(sequences, types, position_offset=2, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert batch.token_type_ids.tolist() == [[0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0, 1]]
    assert batch.position_ids.tolist() == [[2, 3, 4, 2, 2, 3, 4, 5, 6, 7, 2, 3]]  # restart per sequence
    assert batch.starts.tolist() == [0, 3, 4, 10]
    # Every real token is gathered exactly once across the blocks, and `unblock` undoes the order.
    gathered = torch.cat([
        torch.arange(b.first, b.first + b.sequences * b.width) if b.gather is None else b.gather.index_select(0, b.real)
        for b in batch.blocks
    ])
    assert sorted(gathered.tolist()) == list(range(12))
    assert gathered.index_select(0, batch.unblock).tolist() == list(range(12))
    for block in batch.blocks:
        assert block.gather is None or int(block.mask.sum()) == block.real.numel()


def test_a_lone_sequence_or_a_run_of_equal_lengths_is_attended_as_a_slice():
    lone = pack([[5, 6, 7]], None, position_offset=0, device=torch.device("cpu"))
    assert [(b.gather, b.mask, b.first) for b in lone.blocks] == [(None, None, 0)] and lone.unblock is None
    same = pack([[1, 2], [3, 4], [5, 6, 7, 8, 9, 10, 11]], None, position_offset=0, device=torch.device("cpu"))
    assert [(b.sequences, b.gather, b.first) for b in same.blocks] == [(2, None, 0), (1, None, 4)]
    assert same.unblock is None


def test_attention_blocks_keep_padding_under_the_fill_bound():
    lengths = [3, 40, 4, 41, 5, 200, 39]
    blocks = _attention_blocks(lengths, 0.8)
    assert sorted(s for block in blocks for s in block) == list(range(len(lengths)))
    for block in blocks:
        real = sum(lengths[s] for s in block)
        assert real >= 0.8 * len(block) * max(lengths[s] for s in block) or len(block) == 1
    assert [5] in blocks  # the one long row is attended alone, padding nobody


@pytest.mark.parametrize(
    "change",
    [{"is_decoder": True}, {"position_embedding_type": "relative_key"}, {"add_cross_attention": True}],
)
def test_other_layouts_keep_the_padded_forward(tiny_roberta_spec, change):
    model = build_classifier(tiny_roberta_spec, num_labels=2)
    assert packable(encoder_of(model), model.config)
    for key, value in change.items():
        setattr(model.config, key, value)
    assert not packable(encoder_of(model), model.config)


@pytest.fixture(scope="module", params=["tiny-roberta", "embedded"])
def engines(request, tiny_roberta_spec, roberta_adapters, embedded_spec, embedded_adapters):
    spec, root = (
        (tiny_roberta_spec, roberta_adapters) if request.param == "tiny-roberta" else (embedded_spec, embedded_adapters)
    )
    packed, padded = NLIEngine(spec, device="cpu"), NLIEngine(spec, device="cpu", packed=False)
    assert packed.packed is not None and padded.packed is None
    return [(engine, {n: engine.read_adapter(n, root / n) for n in NAMES}) for engine in (packed, padded)]


def test_packed_forward_answers_as_the_padded_one_for_ragged_mixed_batches(engines):
    short = ("Yes.", "No.")
    medium = ("Two dogs run through a field of tall grass.", "Animals are outside.")
    long = (" ".join(["The committee met again to discuss the budget"] * 60), "A meeting happened.")  # truncated
    rows = [(pair, NAMES[i % len(NAMES)]) for i, pair in enumerate([short, long, medium, short, medium, long, short])]
    answers = []
    for engine, adapters in engines:
        encoded = engine.encode([p for (p, _), _ in rows], [h for (_, h), _ in rows])
        assert max(len(e) for e in encoded) == engine.max_seq_len and min(len(e) for e in encoded) < 10
        answers.append(engine.run(encoded, [adapters[name] for _, name in rows]))
    packed, padded = answers
    worst = max(abs(a - b) for row_p, row_q in zip(packed, padded) for a, b in zip(row_p, row_q))
    assert worst < 1e-5, worst
    assert len({tuple(round(x, 3) for x in row) for row in packed}) > 3  # the rows really differ
