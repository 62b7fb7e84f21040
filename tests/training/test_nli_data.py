"""Tests for training.nli_data: the three file formats, integer labels, bad files and the stratified split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from training import nli
from training.nli_data import (
    NLI_LABELS,
    RTE_LABELS,
    DatasetError,
    PairExample,
    check_labels,
    infer_label_set,
    read_pairs,
    split_examples,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "nli"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_shared_jsonl_fixture():
    pairs = read_pairs(DATA / "mnli_sample.jsonl")
    assert pairs.format == "jsonl"
    assert len(pairs.examples) == 500
    assert {e.label for e in pairs.examples} == set(NLI_LABELS)
    assert pairs.examples[0].id.startswith("mnli_m_")
    assert pairs.description.startswith("mnli_sample.jsonl (sha256:")
    assert infer_label_set(pairs.examples, "mnli") == NLI_LABELS


def test_rte_fixture_is_two_way():
    pairs = read_pairs(DATA / "rte_sample.jsonl")
    assert infer_label_set(pairs.examples, "rte") == RTE_LABELS


def test_official_multinli_jsonl_skips_and_counts_unlabelled_rows(tmp_path):
    rows = [
        {"annotator_labels": ["neutral"], "genre": "government", "gold_label": "neutral", "pairID": "31193n",
         "promptID": "31193", "sentence1": "Conceptually cream skimming has two basic dimensions.",
         "sentence2": "Product and geography are what make cream skimming work. "},
        {"gold_label": "-", "pairID": "2n", "sentence1": "A man.", "sentence2": "A person."},
        {"gold_label": "contradiction", "pairID": "3c", "sentence1": "It is day.", "sentence2": "It is night."},
    ]
    pairs = read_pairs(write_jsonl(tmp_path / "multinli_1.0_dev_matched.jsonl", rows))
    assert pairs.format == "multinli-jsonl"
    assert pairs.skipped_no_gold == 1
    assert [(e.id, e.label) for e in pairs.examples] == [("31193n", "neutral"), ("3c", "contradiction")]


def test_glue_mnli_tsv_keeps_quotes_literal(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    lines = [
        header,
        '0\t1\t1e\tfiction\tHe said "go.\tHe spoke.\tentailment\tentailment',
        "1\t2\t2n\tfiction\tA dog runs.\tThe dog is happy.\tneutral\tneutral",
        "2\t3\t3x\tfiction\tA cat.\tA cat.\t-\t-",
    ]
    path = tmp_path / "dev_matched.tsv"
    path.write_text("\n".join(lines) + "\n")
    pairs = read_pairs(path)
    assert pairs.format == "glue-tsv"
    assert pairs.skipped_no_gold == 1
    assert pairs.examples[0] == PairExample(id="1e", premise='He said "go.', hypothesis="He spoke.", label="entailment")
    assert pairs.examples[1].label == "neutral"


@pytest.mark.parametrize(
    ("cells", "expected"),
    [(["entailment", "not_entailment"], ["entailment", "not_entailment"]), (["0", "1"], ["entailment", "not_entailment"])],
)
def test_glue_rte_tsv_string_and_integer_labels(tmp_path, cells, expected):
    path = tmp_path / "train.tsv"
    path.write_text(
        "index\tsentence1\tsentence2\tlabel\n"
        f"0\tParis is in France.\tParis is French.\t{cells[0]}\n"
        f"1\tIt rained.\tIt was dry.\t{cells[1]}\n"
    )
    pairs = read_pairs(path)
    assert [e.label for e in pairs.examples] == expected
    assert infer_label_set(pairs.examples, "rte") == RTE_LABELS


def test_integer_labels_in_premise_hypothesis_jsonl_follow_hf_snli_order(tmp_path):
    rows = [
        {"premise": "a", "hypothesis": "b", "label": 0},
        {"premise": "a", "hypothesis": "c", "label": 1},
        {"premise": "a", "hypothesis": "d", "label": 2},
        {"premise": "a", "hypothesis": "e", "label": -1},
    ]
    pairs = read_pairs(write_jsonl(tmp_path / "snli.jsonl", rows))
    assert [e.label for e in pairs.examples] == list(NLI_LABELS)
    assert pairs.skipped_no_gold == 1
    assert pairs.examples[0].id == "snli.jsonl:1"


BAD_FILES = {
    "unknown label": ([{"premise": "a", "hypothesis": "b", "label": "maybe"}], "unknown label 'maybe'"),
    "integer label out of range": ([{"premise": "a", "hypothesis": "b", "label": 3}], "unknown label '3'"),
    "missing hypothesis": ([{"premise": "a", "label": "neutral"}], "missing field 'hypothesis'"),
    "missing label": ([{"premise": "a", "hypothesis": "b"}], "missing field 'label'"),
    "no text fields": ([{"text": "a", "label": "neutral"}], "missing fields"),
    "only unlabelled rows": ([{"premise": "a", "hypothesis": "b", "label": "-"}], "no labelled rows"),
    "mixed label sets": (
        [{"premise": "a", "hypothesis": "b", "label": "neutral"}, {"premise": "a", "hypothesis": "c", "label": "not_entailment"}],
        "mixes RTE's not_entailment",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_training_file_ends_with_one_line_message(tmp_path, capsys, case):
    rows, message = BAD_FILES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SystemExit) as excinfo:
        nli.main(["--train", str(path), "--eval-fraction", "0.5"])
    text = str(excinfo.value.code)
    assert text.startswith("error: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("flag", ["--train", "--eval"])
def test_missing_file_ends_with_one_line_message(tmp_path, flag):
    existing = DATA / "rte_sample.jsonl"
    argv = ["--train", str(tmp_path / "nope.jsonl"), "--eval", str(existing)]
    if flag == "--eval":
        argv = ["--train", str(existing), "--eval", str(tmp_path / "nope.jsonl")]
    with pytest.raises(SystemExit) as excinfo:
        nli.main(argv)
    assert str(excinfo.value.code) == f"error: data file not found: {tmp_path / 'nope.jsonl'}"


def test_eval_labels_outside_the_training_task_are_refused():
    with pytest.raises(SystemExit) as excinfo:
        nli.main(["--train", str(DATA / "mnli_sample.jsonl"), "--eval", str(DATA / "rte_sample.jsonl")])
    assert "not_entailment" in str(excinfo.value.code)


def test_bad_line_number_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        read_pairs(path)


def test_check_labels_names_the_offenders():
    examples = [PairExample("1", "a", "b", "neutral")]
    with pytest.raises(DatasetError, match=r"neutral \(1\)"):
        check_labels(examples, RTE_LABELS, "rte.jsonl")


def test_split_is_stratified_disjoint_and_reproducible():
    examples = read_pairs(DATA / "snli_sample.jsonl").examples
    train, evaluation = split_examples(examples, 0.2, seed=13)
    again = split_examples(examples, 0.2, seed=13)
    other = split_examples(examples, 0.2, seed=14)
    assert (train, evaluation) == again
    assert evaluation != other[1]
    assert not {e.id for e in train} & {e.id for e in evaluation}
    assert len(train) + len(evaluation) == len(examples)
    totals, held = Counter(e.label for e in examples), Counter(e.label for e in evaluation)
    for label, count in totals.items():
        assert held[label] == round(0.2 * count)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_degenerate_fractions(fraction):
    with pytest.raises(DatasetError):
        split_examples([PairExample("1", "a", "b", "neutral")] * 10, fraction, seed=0)


def test_extra_training_rows_join_the_training_part_only_reduced_to_rte():
    args = nli.parse_args([
        "--train", str(DATA / "rte_sample.jsonl"), "--eval-fraction", "0.5",
        "--extra-train", str(DATA / "mnli_sample.jsonl"), "--extra-train-skip-heldout", "0.2",
    ])
    data = nli.load_data(args)
    mnli = read_pairs(DATA / "mnli_sample.jsonl").examples
    _, mnli_held_out = split_examples(mnli, 0.2, seed=13)
    train_ids = {e.id for e in data.train}
    assert data.labels == RTE_LABELS
    assert all(e.id.startswith("rte_dev_") for e in data.evaluation)
    assert len([i for i in train_ids if i.startswith("mnli_m_")]) == len(mnli) - len(mnli_held_out)
    assert not train_ids & {e.id for e in mnli_held_out}
    assert {e.label for e in data.train} == set(RTE_LABELS)
    assert "neutral, contradiction -> not_entailment" in data.train_description


# Tiny files in the layouts the publishers ship (field sets and orders as in the official downloads;
# the sentences are the first rows of each official dev set).
SNLI_1_0_JSONL = [
    {"annotator_labels": ["neutral", "entailment", "neutral", "neutral", "neutral"], "captionID": "4705552913.jpg#2",
     "gold_label": "neutral", "pairID": "4705552913.jpg#2r1n",
     "sentence1": "Two women are embracing while holding to go packages.",
     "sentence1_binary_parse": "( ( Two women ) ( ( are ( embracing ( while ( holding ( to ( go packages ) ) ) ) ) ) . ) )",
     "sentence1_parse": "(ROOT (S (NP (CD Two) (NNS women)) (VP (VBP are) (VP (VBG embracing))) (. .)))",
     "sentence2": "The sisters are hugging goodbye while holding to go packages after just eating lunch.",
     "sentence2_binary_parse": "( ( The sisters ) ( ( are ( hugging goodbye ) ) . ) )",
     "sentence2_parse": "(ROOT (S (NP (DT The) (NNS sisters)) (VP (VBP are) (VP (VBG hugging))) (. .)))"},
    {"annotator_labels": ["entailment", "neutral", "contradiction"], "captionID": "x#0", "gold_label": "-",
     "pairID": "x#0r1e", "sentence1": "A dog.", "sentence2": "An animal."},
    {"annotator_labels": ["entailment"], "captionID": "4705552913.jpg#2", "gold_label": "entailment",
     "pairID": "4705552913.jpg#2r1e", "sentence1": "Two women are embracing while holding to go packages.",
     "sentence2": "Two woman are holding packages."},
]
MULTINLI_TXT_HEADER = (
    "gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
    "sentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5"
)
GLUE_RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def test_official_snli_jsonl(tmp_path):
    pairs = read_pairs(write_jsonl(tmp_path / "snli_1.0_dev.jsonl", SNLI_1_0_JSONL))
    assert pairs.skipped_no_gold == 1
    assert [(e.id, e.label) for e in pairs.examples] == [
        ("4705552913.jpg#2r1n", "neutral"), ("4705552913.jpg#2r1e", "entailment"),
    ]
    assert pairs.examples[0].premise == "Two women are embracing while holding to go packages."
    assert infer_label_set(pairs.examples, "snli") == NLI_LABELS


def test_official_multinli_txt_with_left_out_trailing_label_columns(tmp_path):
    """The .txt twin of the jsonl: tab-separated, parses first; training rows carry only label1."""
    lines = [
        MULTINLI_TXT_HEADER,
        "neutral\t( ( Conceptually ... ) )\t( Product ... )\t(ROOT ...)\t(ROOT ...)\t"
        "Conceptually cream skimming has two basic dimensions - product and geography.\t"
        "Product and geography are what make cream skimming work. \t31193\t31193n\tgovernment\tneutral",
        'entailment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\the said "yes.\tHe agreed.\t1\t1e\tfiction\tentailment\t'
        "entailment\tentailment\tneutral\tentailment",
        "-\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tA cat.\tA pet.\t2\t2n\tfiction\tneutral\tentailment\t\t\t",
    ]
    path = tmp_path / "multinli_1.0_train.txt"
    path.write_text("\n".join(lines) + "\n")
    pairs = read_pairs(path)
    assert pairs.format == "glue-tsv"
    assert pairs.skipped_no_gold == 1
    assert [(e.id, e.label) for e in pairs.examples] == [("31193n", "neutral"), ("1e", "entailment")]
    assert pairs.examples[1].premise == 'he said "yes.'


def rte_tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = [GLUE_RTE_HEADER] + [f"{i}\t{p}\t{h}\t{label}" for i, (p, h, label) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


RTE_ROWS = [
    ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
     "Christopher Reeve Foundation.", "Christopher Reeve had an accident.", "not_entailment"),
    ("Yet, we now are discovering that antibiotics are losing their effectiveness against illness.",
     "Bacteria is winning the war against antibiotics.", "entailment"),
    ('The "Hague" court\u2028ruled on Monday.', "A court ruled.", "entailment"),  # a quote and U+2028 in a sentence
    ("It rained all day in Paris.", "Paris was dry.", "not_entailment"),
]


def test_official_glue_rte_tsv(tmp_path):
    pairs = read_pairs(rte_tsv(tmp_path / "RTE" / "dev.tsv", RTE_ROWS))
    assert [e.label for e in pairs.examples] == [row[2] for row in RTE_ROWS]
    assert pairs.examples[2].premise == 'The "Hague" court\u2028ruled on Monday.'
    assert [e.id for e in pairs.examples] == ["0", "1", "2", "3"]
    assert infer_label_set(pairs.examples, "rte") == RTE_LABELS


def test_glue_rte_test_file_without_labels_is_refused_by_name(tmp_path):
    path = tmp_path / "RTE" / "test.tsv"
    path.parent.mkdir()
    path.write_text("index\tsentence1\tsentence2\n0\tMaude and Dora had seen the trains.\tTrains frighten Maude.\n")
    with pytest.raises(DatasetError, match="line 2: missing field 'label'"):
        read_pairs(path)


def test_the_cli_reads_official_rte_files_as_they_come(tmp_path):
    """`--train RTE/train.tsv --eval RTE/dev.tsv`, as the docs tell a user, up to the split."""
    train = rte_tsv(tmp_path / "RTE" / "train.tsv", RTE_ROWS * 3)
    dev = rte_tsv(tmp_path / "RTE" / "dev.tsv", RTE_ROWS)
    data = nli.load_data(nli.parse_args(["--name", "my-rte", "--train", str(train), "--eval", str(dev)]))
    assert data.labels == RTE_LABELS
    assert (len(data.train), len(data.evaluation)) == (12, 4)
    assert data.split == "separate files: train train.tsv, eval dev.tsv"


def test_the_cli_splits_official_multinli_jsonl(tmp_path):
    rows = [
        {"annotator_labels": [label], "genre": "fiction", "gold_label": label, "pairID": f"{i}{label[0]}",
         "promptID": str(i), "sentence1": f"Premise {i}.", "sentence2": f"Hypothesis {i}.",
         "sentence1_binary_parse": "( x )", "sentence2_binary_parse": "( y )",
         "sentence1_parse": "(ROOT x)", "sentence2_parse": "(ROOT y)"}
        for i, label in enumerate(["entailment", "neutral", "contradiction"] * 10)
    ]
    (tmp_path / "multinli_1.0").mkdir()
    path = write_jsonl(tmp_path / "multinli_1.0" / "multinli_1.0_dev_matched.jsonl", rows)
    data = nli.load_data(nli.parse_args(["--train", str(path), "--eval-fraction", "0.2", "--split-seed", "13"]))
    assert data.labels == NLI_LABELS
    assert (len(data.train), len(data.evaluation)) == (24, 6)
    assert Counter(e.label for e in data.evaluation) == {"entailment": 2, "neutral": 2, "contradiction": 2}
