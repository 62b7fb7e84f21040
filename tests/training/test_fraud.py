"""Fraud training: the CSV loader, the clean and leaky protocols, thresholds, the CLI's outputs and its errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skops.io
from sklearn.ensemble import VotingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from app.artifacts import sha256_hex
from app.inference.fraud_scorer import INPUT_FIELDS, FraudManifest, FraudScorer
from training import fraud
from training.fraud_calibration import importance_weights, weighted_brier
from training.fraud_compare import recall_at_precision, time_folds
from training.fraud_data import FraudDataError, load_transactions
from training.fraud_model import (
    EarlyStoppedMLPs,
    FraudTrainingError,
    TrainConfig,
    build_pipeline,
    choose_threshold,
    run_clean,
    run_leaky,
    serving_pipeline,
    stratified_split,
    time_split,
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
    out = tmp_path_factory.mktemp("fraud-model") / "model"
    assert fraud.main(["--data", str(SLICE), "--output", str(out), "--comparison-seeds", "1", "--members", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """The --compare path on the slice, kept small: 2 folds, one peer, one MLP member, no seed tables."""
    out = tmp_path_factory.mktemp("fraud-compare") / "model"
    argv = ["--data", str(SLICE), "--output", str(out), "--members", "1", "--comparison-seeds", "0", "--compare"]
    argv += ["--cv-folds", "2", "--cv-repeats", "1", "--compare-models", "logreg", "--jobs", "1"]
    assert fraud.main(argv) == 0
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


def test_time_split_trains_on_the_past_and_tests_on_the_future(data):
    split = time_split(data.X[:, 0], data.y, TrainConfig(split="time"))
    assert (len(split.train), len(split.val), len(split.test)) == (360, 120, 120)
    time_of = data.X[:, 0]
    assert time_of[split.train].max() <= time_of[split.val].min()
    assert time_of[split.val].max() <= time_of[split.test].min()


def test_time_folds_move_forward_and_skip_folds_without_enough_frauds(data):
    folds = time_folds(data.X[:, 0], data.y)
    assert folds
    for train, test in folds:
        assert data.X[train, 0].max() <= data.X[test, 0].min()
        assert data.y[train].sum() >= 20 and data.y[test].sum() >= 5
    y_late_frauds = np.zeros(len(data.y), dtype=np.int64)
    y_late_frauds[np.argsort(data.X[:, 0])[-10:]] = 1  # every fraud in the last rows: no fold can train
    assert time_folds(data.X[:, 0], y_late_frauds) == []


def test_served_pipeline_is_plain_sklearn_and_scores_like_the_trained_one(data):
    config = TrainConfig(members=2, resample="adasyn", max_iter=20)
    pipeline = build_pipeline(config).fit(data.X[:, 1:], data.y)
    served = serving_pipeline(pipeline)
    assert isinstance(served, Pipeline) and [name for name, _ in served.steps] == ["scaler", "mlp"]
    assert isinstance(served.named_steps["scaler"], StandardScaler)
    assert isinstance(served.named_steps["mlp"], VotingClassifier)
    np.testing.assert_allclose(served.predict_proba(data.X[:, 1:]), pipeline.predict_proba(data.X[:, 1:]), rtol=1e-12)
    assert not any(hasattr(member, "_optimizer") for member in served.named_steps["mlp"].estimators_)


def test_ensemble_keeps_each_member_at_its_best_holdout_epoch(data):
    X = StandardScaler().fit_transform(data.X[:, 1:])
    ensemble = EarlyStoppedMLPs(members=2, max_iter=60, patience=5).fit(X, data.y)
    assert len(ensemble.members_) == 2 and ensemble.train_prior_ == pytest.approx(data.y.mean(), abs=0.01)
    for history, kept in zip(ensemble.history_, ensemble.best_epochs_, strict=True):
        assert history["holdout_auprc"][kept - 1] == max(history["holdout_auprc"])
        assert len(history["loss"]) <= kept + 5  # stopped after `patience` epochs without a better AUPRC


@pytest.mark.parametrize("balance", ["class_weight", "balanced_batches"])
def test_balancing_trains_at_an_even_prior(data, balance):
    X = StandardScaler().fit_transform(data.X[:, 1:])
    ensemble = EarlyStoppedMLPs(members=1, max_iter=5, balance=balance).fit(X, data.y)
    assert ensemble.train_prior_ == 0.5


def test_adasyn_touches_training_rows_only(data):
    config = TrainConfig(resample="adasyn", members=1)
    result = run_clean(data.X, data.y, config)
    split = stratified_split(data.y, config)
    for name, rows in (("train", split.train), ("val", split.val), ("test", split.test)):
        assert result.metrics[name]["rows"] == len(rows)  # no synthetic row was scored
        assert result.metrics[name]["frauds"] == int(data.y[rows].sum())
        np.testing.assert_array_equal(result.labels[name], data.y[rows])
    # ...while the MLPs themselves were fitted on oversampled training rows.
    assert result.train_prior > 0.4 > data.y[split.train].mean()


def test_leaky_protocol_scores_synthetic_rows_and_says_so(data):
    clean = run_clean(data.X, data.y, TrainConfig(resample="adasyn", members=1))
    leaky = run_leaky(data.X, data.y, TrainConfig(resample="adasyn", members=1))
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
    assert {"pipeline.skops", "manifest.json", "metrics.json", "README.md"} <= names
    assert {"confusion_matrices.png", "precision_recall.png", "loss_curve.png", "reliability.png"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    assert sum(path.stat().st_size for path in trained.iterdir()) < 5_000_000


def test_manifest_vouches_for_the_artifact_and_the_data(trained):
    manifest = FraudManifest.model_validate_json((trained / "manifest.json").read_text())
    assert manifest.artifact.sha256 == sha256_hex(trained / manifest.artifact.file)
    assert manifest.training["data_sha256"] == sha256_hex(SLICE)
    assert manifest.features == [name for name in INPUT_FIELDS if name != "Time"]
    assert manifest.calibration.train_prior == pytest.approx(60 / 360)  # no resampling: the training split's rate
    assert manifest.calibration.target_prior == pytest.approx(0.001727)
    scorer = FraudScorer.load(trained)
    assert scorer.threshold == manifest.threshold
    assert skops.io.get_untrusted_types(file=trained / manifest.artifact.file) == []


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
    assert "## Cross-validated comparison" in card and "## Time-ordered comparison" in card
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 5_000_000


def test_shipped_model_records_its_command_without_machine_paths():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    command = manifest["training"]["command"]
    assert command.startswith("python -m training.fraud --data creditcard_sample.csv.gz ")
    for text in (command, (SHIPPED / "README.md").read_text()):
        assert "/work/" not in text and "/tmp/" not in text and "/home/" not in text


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["--data", "/srv/data/creditcard.csv"], "--data creditcard.csv"),
        (["--data=/srv/data/creditcard.csv"], "--data=creditcard.csv"),
        (["--data", "creditcard.csv", "--output", "runs/full"], "--data creditcard.csv --output runs/full"),
        (["--data", "x.csv", "--output", str(REPO / "models" / "fraud")], "--data x.csv --output models/fraud"),
        (["--data", "x.csv", "--output", "/srv/out/fraud-2"], "--data x.csv --output fraud-2"),
    ],
)
def test_recorded_command_carries_no_machine_path(argv, shown):
    assert fraud.portable_command(argv) == f"python -m training.fraud {shown}"


def test_shipped_comparison_covers_every_model_on_both_protocols():
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    stratified, by_time = metrics["cross_validation"]
    assert (stratified["protocol"], by_time["protocol"]) == ("stratified", "time")
    assert len(stratified["fold_sizes"]) == 25
    expected = {"shipped", "logreg", "hgb", "rf", "mlp_previous", "mlp_adasyn", "mlp_smote", "mlp_class_weight", "mlp_balanced"}
    assert expected <= set(stratified["models"]) and expected <= set(by_time["models"])
    for model in stratified["models"].values():
        assert len(model["per_fold"]["auprc"]) == 25


# --- the --compare path ------------------------------------------------------------------------


def test_compare_writes_both_protocols_into_metrics_card_and_plot(compared):
    metrics = json.loads((compared / "metrics.json").read_text())
    protocols = [run["protocol"] for run in metrics["cross_validation"]]
    assert protocols[0] == "stratified"
    stratified = metrics["cross_validation"][0]
    assert set(stratified["models"]) == {"shipped", "logreg"}
    assert len(stratified["models"]["shipped"]["per_fold"]["auprc"]) == 2
    assert sum(test for _, test in stratified["fold_sizes"]) == 480  # the training and validation rows, once each
    paired = stratified["models"]["logreg"]["shipped_minus_this"]["auprc"]
    per_fold = stratified["models"]
    expected = np.mean(np.subtract(per_fold["shipped"]["per_fold"]["auprc"], per_fold["logreg"]["per_fold"]["auprc"]))
    assert paired["mean"] == pytest.approx(expected)
    card = (compared / "README.md").read_text()
    assert "## Cross-validated comparison" in card and "(`logreg`)" in card and "Shipped vs logistic regression" in card
    assert (compared / "comparison.png").stat().st_size > 10_000
    assert metrics["calibration"]["sets"][1]["name"] == "cross-validated, out of fold"


def test_unknown_compare_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        fraud.main(["--data", str(SLICE), "--compare", "--compare-models", "logreg,xgboost"])
    assert excinfo.value.code == 2
    assert "xgboost" in capsys.readouterr().err


@pytest.mark.parametrize(
    "y, p, floor, expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.9, 1.0),  # perfect ranking
        ([0, 1, 0, 1], [0.1, 0.2, 0.8, 0.9], 0.9, 0.5),  # only the top row reaches precision 0.9
        ([1, 0, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.9, 0.0),  # never
    ],
)
def test_recall_at_precision(y, p, floor, expected):
    assert recall_at_precision(np.array(y), np.array(p), floor) == expected


def test_importance_weights_move_the_sample_to_the_real_prior():
    y = np.array([1] * 10 + [0] * 90)
    weights = importance_weights(y, 0.001727)
    assert weights.sum() == pytest.approx(100)
    assert weights[y == 1].sum() / weights.sum() == pytest.approx(0.001727)
    # By hand: weighted Brier of p = 0.5 everywhere is 0.25; of p = y is 0; of p = 1 - y is 1.
    assert weighted_brier(y, np.full(100, 0.5), weights) == pytest.approx(0.25)
    assert weighted_brier(y, y.astype(float), weights) == 0.0
    # Always answering the prior: pi (1 - pi) at the real mix.
    assert weighted_brier(y, np.full(100, 0.001727), weights) == pytest.approx(0.001727 * (1 - 0.001727))


# --- overwriting and the full data set's layout -----------------------------------------------


def test_existing_model_directory_is_refused_without_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as excinfo:
        fraud.main(["--data", str(SLICE), "--output", str(out), "--comparison-seeds", "0", "--members", "1"])
    assert str(excinfo.value.code).startswith("error: ") and "--force" in str(excinfo.value.code)
    assert (out / "manifest.json").read_text() == "{}"
    args = ["--data", str(SLICE), "--output", str(out), "--comparison-seeds", "0", "--members", "1", "--force"]
    assert fraud.main(args) == 0
    assert FraudScorer.load(out).features


def test_default_output_is_the_served_model_and_is_refused(tmp_path):
    before = {path.name: sha256_hex(path) for path in SHIPPED.iterdir()}
    with pytest.raises(SystemExit) as excinfo:
        fraud.main(["--data", str(SLICE), "--comparison-seeds", "0"])
    assert "already holds a model" in str(excinfo.value.code)
    assert {path.name: sha256_hex(path) for path in SHIPPED.iterdir()} == before


def _kaggle_file(path: Path, rows: int = 3000, frauds: int = 40, seed: int = 0) -> Path:
    """Kaggle's creditcard.csv layout exactly: quoted header Time,V1..V28,Amount,Class, quoted Class, no other column."""
    rng = np.random.default_rng(seed)
    y = np.zeros(rows, dtype=int)
    y[rng.choice(rows, frauds, replace=False)] = 1
    X = rng.normal(size=(rows, 28)) + 2.0 * y[:, None] * (np.arange(28) < 5)
    time_of = np.sort(rng.uniform(0, 172_792, rows)).round()
    amount = rng.exponential(88.0, rows).round(2)
    lines = ['"Time",' + ",".join(f'"V{i}"' for i in range(1, 29)) + ',"Amount","Class"']
    for t, x, a, label in zip(time_of, X, amount, y, strict=True):
        lines.append(f"{t:.0f}," + ",".join(f"{v:.15g}" for v in x) + f',{a},"{label}"')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_readme_retraining_command_works_on_the_kaggle_layout(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    command = "python -m training.fraud --data creditcard.csv --output runs/fraud-full --comparison-seeds 1"
    assert command in readme
    _kaggle_file(tmp_path / "creditcard.csv")
    monkeypatch.chdir(tmp_path)
    assert fraud.main(command.split()[3:]) == 0
    scorer = FraudScorer.load(tmp_path / "runs" / "fraud-full")
    manifest = json.loads((tmp_path / "runs" / "fraud-full" / "manifest.json").read_text())
    assert manifest["training"]["rows"] == 3000 and manifest["training"]["frauds"] == 40
    assert manifest["training"]["command"] == command
    assert scorer.score([dict.fromkeys(INPUT_FIELDS, 0.0)])


def test_kaggle_layout_with_time_split(tmp_path):
    path = _kaggle_file(tmp_path / "creditcard.csv", rows=1500, frauds=60)
    out = tmp_path / "model"
    assert fraud.main(["--data", str(path), "--output", str(out), "--split", "time", "--members", "1", "--comparison-seeds", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["split_kind"] == "time"
    assert "time-ordered" in (out / "README.md").read_text()


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
