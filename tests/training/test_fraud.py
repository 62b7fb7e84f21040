"""Fraud training: the CSV loader, the clean and leaky protocols, thresholds, the CLI's outputs and its errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imblearn.over_sampling import ADASYN
from imblearn.pipeline import Pipeline as ImbPipeline
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from app.inference.fraud_scorer import INPUT_FIELDS, FraudManifest, FraudScorer, file_sha256
from training import fraud
from training.fraud_data import FraudDataError, load_transactions
from training.fraud_model import (
    FraudTrainingError,
    TrainConfig,
    build_pipeline,
    choose_threshold,
    run_clean,
    run_leaky,
    serving_pipeline,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "data" / "fraud" / "creditcard_slice.csv.gz"
SHIPPED = REPO / "models" / "fraud"


@pytest.fixture(scope="module")
def data():
    return load_transactions(SLICE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One CLI run on the repository's slice, comparison included (one seed), shared by the output tests."""
    out = tmp_path_factory.mktemp("fraud-model")
    assert fraud.main(["--data", str(SLICE), "--output", str(out), "--comparison-seeds", "1"]) == 0
    return out


# --- loading CSVs ------------------------------------------------------------------------------


def test_slice_is_what_its_sources_say(data):
    assert data.X.shape == (600, 30)
    assert data.frauds == 100


def test_kaggle_layout_quoted_and_uncompressed_reads_the_same(data, tmp_path):
    # Kaggle's creditcard.csv quotes its header and its Class values; no extra columns.
    lines = ['"' + '","'.join((*INPUT_FIELDS, "Class")) + '"']
    lines += [",".join(repr(float(v)) for v in x) + f',"{label}"' for x, label in zip(data.X, data.y, strict=True)]
    path = tmp_path / "creditcard.csv"
    path.write_text("\n".join(lines) + "\n")
    kaggle = load_transactions(path)
    np.testing.assert_array_equal(kaggle.X, data.X)
    np.testing.assert_array_equal(kaggle.y, data.y)


def test_columns_are_found_by_name_in_any_order(data, tmp_path):
    order = ["Class", "src", *reversed(INPUT_FIELDS)]
    rows = [",".join(["1" if label else "0", "x", *(repr(float(v)) for v in reversed(x))]) for x, label in zip(data.X, data.y, strict=True)]
    path = tmp_path / "shuffled.csv.gz"
    path.write_bytes(gzip.compress(("\n".join([",".join(order), *rows]) + "\n").encode()))
    reordered = load_transactions(path)
    np.testing.assert_array_equal(reordered.X, data.X)
    np.testing.assert_array_equal(reordered.y, data.y)


# --- the protocols -----------------------------------------------------------------------------


def test_split_is_20_percent_test_then_25_percent_of_the_rest_stratified(data):
    split = stratified_split(data.y, TrainConfig())
    assert (len(split.train), len(split.val), len(split.test)) == (360, 120, 120)
    assert [int(data.y[part].sum()) for part in (split.train, split.val, split.test)] == [60, 20, 20]
    assert len(np.union1d(np.union1d(split.train, split.val), split.test)) == 600


def test_resampler_sits_inside_the_pipeline_and_is_not_served():
    pipeline = build_pipeline(TrainConfig(resample="adasyn"))
    assert isinstance(pipeline, ImbPipeline)
    assert [name for name, _ in pipeline.steps] == ["scaler", "sampler", "mlp"]
    assert isinstance(pipeline.named_steps["scaler"], StandardScaler)
    assert isinstance(pipeline.named_steps["sampler"], ADASYN)
    served = serving_pipeline(pipeline)
    assert isinstance(served, Pipeline) and [name for name, _ in served.steps] == ["scaler", "mlp"]


def test_adasyn_touches_training_rows_only(data):
    config = TrainConfig(resample="adasyn")
    result = run_clean(data.X, data.y, config)
    split = stratified_split(data.y, config)
    for name, rows in (("train", split.train), ("val", split.val), ("test", split.test)):
        assert result.metrics[name]["rows"] == len(rows)  # no synthetic row was scored
        assert result.metrics[name]["frauds"] == int(data.y[rows].sum())
        np.testing.assert_array_equal(result.labels[name], data.y[rows])
    # ...while the MLP itself was fitted on an oversampled training set.
    assert result.train_prior > 0.4 > data.y[split.train].mean()


def test_leaky_protocol_scores_synthetic_rows_and_says_so(data):
    clean = run_clean(data.X, data.y, TrainConfig(resample="adasyn"))
    leaky = run_leaky(data.X, data.y, TrainConfig(resample="adasyn"))
    assert leaky.leaky and not clean.leaky
    assert leaky.metrics["test"]["rows"] > clean.metrics["test"]["rows"]
    assert leaky.metrics["test"]["frauds"] > 3 * clean.metrics["test"]["frauds"]


Y = np.array([0, 0, 0, 0, 1, 0, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])


@pytest.mark.parametrize(
    "rule, target, expected",
    [
        ("best_f1", None, 0.5),  # P=0.75 R=1 -> F1 0.857, the best
        ("target_recall", 0.6, 0.7),  # recall >= 0.6: {0.5 (P .75), 0.6 (P .67), 0.7 (P 1)} -> best precision
        ("target_precision", 0.7, 0.5),  # precision >= 0.7: {0.5 (R 1), 0.7 (R .67), 0.8 (R .33)} -> best recall
        ("target_precision", 1.0, 0.7),
    ],
)
def test_threshold_rules(rule, target, expected):
    assert choose_threshold(Y, P, rule, target) == expected


def test_unreachable_precision_target_is_an_error():
    with pytest.raises(FraudTrainingError):
        choose_threshold(np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8]), "target_precision", 0.9)


# --- the CLI's outputs -------------------------------------------------------------------------


def test_cli_writes_the_model_directory(trained):
    names = {path.name for path in trained.iterdir()}
    assert {"pipeline.joblib", "manifest.json", "metrics.json", "README.md"} <= names
    assert {"confusion_matrices.png", "precision_recall.png", "loss_curve.png"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    assert sum(path.stat().st_size for path in trained.iterdir()) < 5_000_000


def test_manifest_vouches_for_the_artifact_and_the_data(trained):
    manifest = FraudManifest.model_validate_json((trained / "manifest.json").read_text())
    assert manifest.artifact.sha256 == file_sha256(trained / manifest.artifact.file)
    assert manifest.training["data_sha256"] == file_sha256(SLICE)
    assert manifest.features == [name for name in INPUT_FIELDS if name != "Time"]
    assert manifest.calibration.train_prior == pytest.approx(60 / 360)  # no resampling: the training split's rate
    assert manifest.calibration.target_prior == pytest.approx(0.001727)
    scorer = FraudScorer.load(trained)
    assert scorer.threshold == manifest.threshold


def test_metrics_cover_every_split(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for split in ("train", "val", "test"):
        for key in ("precision", "recall", "f1", "auprc", "roc_auc", "confusion_matrix"):
            assert key in metrics[split]
    assert metrics["comparison"]["paper"]["leaky"] is True
    assert metrics["comparison"]["adasyn"]["leaky"] is False


def test_model_card_labels_the_leaky_row_and_the_data(trained):
    card = (trained / "README.md").read_text()
    assert "600 rows, 100 frauds" in card
    leaky_rows = [line for line in card.splitlines() if line.startswith("| Paper protocol")]
    assert len(leaky_rows) == 1
    cells = [cell.strip() for cell in leaky_rows[0].strip("|").split("|")][1:]
    assert cells and all(cell.endswith("LEAKY") for cell in cells)
    assert "Time is left out" in card


def test_paper_protocol_labels_every_number_leaky_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never-written"
    assert fraud.main(["--data", str(SLICE), "--output", str(out), "--protocol", "paper", "--resample", "adasyn"]) == 0
    printed = capsys.readouterr().out.splitlines()
    table_start = next(i for i, line in enumerate(printed) if line.startswith("test metric"))
    table = printed[table_start + 1 : table_start + 7]
    assert [line.split()[0] for line in table] == ["precision", "recall", "f1", "auprc", "roc_auc", "test"]
    assert all(line.rstrip().endswith("LEAKY") for line in table)
    paper_progress = [line for line in printed if "paper protocol (oversampled" in line]
    assert paper_progress and all(line.count("LEAKY") == 4 for line in paper_progress)
    assert not out.exists()


def test_shipped_model_card_says_what_it_saw():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert (manifest["training"]["rows"], manifest["training"]["frauds"]) == (5376, 418)
    card = (SHIPPED / "README.md").read_text()
    assert "5,376 rows, 418 frauds" in card and "enriched sample" in card and "Real use retrains" in card
    assert "LEAKY" in card
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 5_000_000


# --- the CLI's errors --------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_INPUTS = [
    ("no such file", lambda tmp: tmp / "nope.csv", "no such file"),
    ("wrong columns", lambda tmp: _write(tmp, "other.csv", "a,b,c\n1,2,3\n"), "missing column"),
    ("labels missing", lambda tmp: _write(tmp, "nolabel.csv", ",".join(INPUT_FIELDS) + "\n" + ",".join(["1"] * 30) + "\n"), "Class"),
    ("empty file", lambda tmp: _write(tmp, "empty.csv", ""), "missing column"),
    ("header only", lambda tmp: _write(tmp, "header.csv", ",".join((*INPUT_FIELDS, "Class")) + "\n"), "no rows"),
    ("text in a number", lambda tmp: _write(tmp, "text.csv", ",".join((*INPUT_FIELDS, "Class")) + "\n" + ",".join(["x"] * 31) + "\n"), "unreadable"),
    ("label not 0/1", lambda tmp: _write(tmp, "label.csv", ",".join((*INPUT_FIELDS, "Class")) + "\n" + ",".join(["1"] * 30 + ["2"]) + "\n"), "Class"),
    ("too few frauds", lambda tmp: _write(tmp, "few.csv", ",".join((*INPUT_FIELDS, "Class")) + "\n" + (",".join(["1"] * 30 + ["0"]) + "\n") * 50), "at least"),
    ("a directory", lambda tmp: tmp, "is a directory"),
]


@pytest.mark.parametrize("make, message", [(m, msg) for _, m, msg in BAD_INPUTS], ids=[n for n, _, _ in BAD_INPUTS])
def test_bad_data_ends_with_one_clear_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as excinfo:
        fraud.main(["--data", str(path), "--output", str(tmp_path / "out"), "--comparison-seeds", "0"])
    text = str(excinfo.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--target-recall", "1.5"],
        ["--target-recall", "0.5", "--target-precision", "0.5"],
        ["--prior", "1"],
        ["--resample", "magic"],
        ["--hidden-sizes", "64,x"],
    ],
)
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as excinfo:
        fraud.main(["--data", str(SLICE), *argv])
    assert excinfo.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_module_entry_point_prints_one_line_and_no_traceback(tmp_path):
    missing = _write(tmp_path, "cols.csv", "Time,V1\n0,1\n")
    done = subprocess.run(
        [sys.executable, "-m", "training.fraud", "--data", str(missing)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "missing column" in done.stderr


def test_loader_error_is_typed():
    with pytest.raises(FraudDataError):
        load_transactions(REPO / "pyproject.toml")
