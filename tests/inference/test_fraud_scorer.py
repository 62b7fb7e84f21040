"""The fraud scorer: the prior-shift correction, loading the shipped model, and refusing broken model dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest

from app.inference import fraud_scorer
from app.inference.fraud_scorer import INPUT_FIELDS, FraudModelError, FraudScorer, file_sha256, prior_shift
from training.fraud_data import load_transactions

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "fraud"
SLICE = REPO / "data" / "fraud" / "creditcard_slice.csv.gz"


@pytest.fixture(scope="module")
def scorer() -> FraudScorer:
    return FraudScorer.load(SHIPPED)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, float]]:
    data = load_transactions(SLICE)
    return [dict(zip(INPUT_FIELDS, map(float, x), strict=True)) for x in data.X]


# --- prior shift -------------------------------------------------------------------------------


def test_prior_shift_known_numbers():
    # A balanced training set (pi_t = 0.5) that says 0.5 knows nothing: the answer is the target prior.
    assert prior_shift(0.5, 0.5, 0.1) == pytest.approx(0.1, abs=1e-15)
    # Odds form as an independent oracle: odds' = odds * [pi/(1-pi)] / [pi_t/(1-pi_t)].
    p, pi_t, pi = 0.2, 0.078, 0.001727
    odds = (p / (1 - p)) * (pi / (1 - pi)) / (pi_t / (1 - pi_t))
    assert prior_shift(p, pi_t, pi) == pytest.approx(odds / (1 + odds), rel=1e-12)
    # By hand: r = (0.001727/0.998273) / (0.078/0.922) = 0.020449; 0.2r / (0.2r + 0.8) = 0.0050863.
    assert prior_shift(p, pi_t, pi) == pytest.approx(0.0050863, rel=1e-4)


def test_prior_shift_is_identity_when_priors_are_equal():
    p = np.linspace(0, 1, 101)
    np.testing.assert_allclose(prior_shift(p, 0.3, 0.3), p, rtol=0, atol=1e-15)


def test_prior_shift_keeps_order_and_endpoints():
    p = np.linspace(0, 1, 1001)
    shifted = prior_shift(p, 0.5, 0.001727)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert np.all(np.diff(shifted) > 0)
    assert np.all(shifted[1:-1] < p[1:-1])  # a rarer target prior lowers every probability


@pytest.mark.parametrize("train_prior, target_prior", [(0.0, 0.1), (1.0, 0.1), (0.5, 0.0), (0.5, 1.0), (-0.1, 0.1), (0.5, 1.5)])
def test_prior_shift_rejects_priors_outside_open_unit_interval(train_prior, target_prior):
    with pytest.raises(ValueError):
        prior_shift(0.5, train_prior, target_prior)


# --- the shipped model -------------------------------------------------------------------------


def test_shipped_model_loads_with_what_its_manifest_declares(scorer):
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert scorer.model_version == manifest["model_version"]
    assert scorer.threshold == manifest["threshold"]
    assert scorer.features == manifest["features"]
    assert "Time" not in scorer.features  # the ablation's decision, recorded in the manifest
    assert manifest["calibration"]["method"] == fraud_scorer.PRIOR_SHIFT_METHOD
    assert manifest["calibration"]["target_prior"] == pytest.approx(0.001727)


def test_score_equals_pipeline_then_prior_shift(scorer, rows):
    pipeline = joblib.load(SHIPPED / scorer.manifest.artifact.file)
    matrix = np.array([[row[name] for name in scorer.features] for row in rows])
    raw = pipeline.predict_proba(matrix)[:, 1]
    calibration = scorer.manifest.calibration
    expected = prior_shift(raw, calibration.train_prior, calibration.target_prior)
    np.testing.assert_allclose(scorer.score(rows), expected, rtol=1e-12, atol=0)


def test_score_reads_fields_by_name_and_ignores_unused_ones(scorer, rows):
    shuffled = [dict(reversed(list(row.items()))) for row in rows[:20]]
    moved_time = [{**row, "Time": row["Time"] + 50_000} for row in rows[:20]]
    baseline = scorer.score(rows[:20])
    assert scorer.score(shuffled) == baseline
    assert scorer.score(moved_time) == baseline  # Time is not a feature of the shipped model


def test_score_of_nothing_is_nothing(scorer):
    assert scorer.score([]) == []


def test_scores_separate_frauds_from_normals(scorer):
    data = load_transactions(SLICE)
    scores = np.array(scorer.score([dict(zip(INPUT_FIELDS, x, strict=True)) for x in data.X]))
    assert scores[data.y == 1].mean() > 10 * scores[data.y == 0].mean()


# --- broken model directories ------------------------------------------------------------------


def _flip_byte(directory: Path) -> None:
    artifact = directory / "pipeline.joblib"
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))


def _truncate(directory: Path) -> None:
    artifact = directory / "pipeline.joblib"
    artifact.write_bytes(artifact.read_bytes()[:-100])


def _replace_artifact_keeping_manifest(directory: Path) -> None:
    joblib.dump({"not": "a pipeline"}, directory / "pipeline.joblib")


def _edit_manifest(**changes):
    def edit(directory: Path) -> None:
        path = directory / "manifest.json"
        manifest = json.loads(path.read_text())
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = manifest
            for key in parents:
                node = node[key]
            if value is _DELETE:
                del node[leaf]
            else:
                node[leaf] = value
        path.write_text(json.dumps(manifest))

    return edit


_DELETE = object()


def _resign_artifact(directory: Path) -> None:
    """A different valid pickle with a manifest updated to match: the sha passes, the shape checks must not."""
    joblib.dump({"not": "a pipeline"}, directory / "pipeline.joblib")
    _edit_manifest(
        artifact__sha256=file_sha256(directory / "pipeline.joblib"),
        artifact__bytes=(directory / "pipeline.joblib").stat().st_size,
    )(directory)


BROKEN = [
    ("missing directory", lambda d: shutil.rmtree(d), "does not exist"),
    ("missing manifest", lambda d: (d / "manifest.json").unlink(), "manifest.json"),
    ("manifest not JSON", lambda d: (d / "manifest.json").write_text("{not json"), "invalid"),
    ("manifest lacks threshold", _edit_manifest(threshold=_DELETE), "threshold"),
    ("unknown calibration method", _edit_manifest(calibration__method="platt"), "calibration"),
    ("unknown feature", _edit_manifest(features=["V1", "Bogus"]), "features"),
    ("artifact path escapes the directory", _edit_manifest(artifact__file="../pipeline.joblib"), "artifact"),
    ("missing artifact", lambda d: (d / "pipeline.joblib").unlink(), "missing"),
    ("truncated artifact", _truncate, "bytes"),
    ("one byte flipped", _flip_byte, "sha256"),
    ("artifact replaced, same size or not", _replace_artifact_keeping_manifest, "artifact"),
    ("manifest sha256 edited", _edit_manifest(artifact__sha256="0" * 64), "sha256"),
    ("feature count disagrees with the artifact", _edit_manifest(features=["V1", "V2"]), "features"),
    ("valid pickle that is not a classifier", _resign_artifact, "classifier"),
]


@pytest.mark.parametrize("breaker, reason", [(b, r) for _, b, r in BROKEN], ids=[name for name, _, _ in BROKEN])
def test_broken_model_dir_is_refused(tmp_path, breaker, reason):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    breaker(directory)
    with pytest.raises(FraudModelError) as excinfo:
        FraudScorer.load(directory)
    assert reason in str(excinfo.value)


@pytest.mark.parametrize("breaker", [_flip_byte, _truncate, _replace_artifact_keeping_manifest], ids=["flipped", "truncated", "replaced"])
def test_tampered_artifact_is_never_unpickled(tmp_path, monkeypatch, breaker):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    breaker(directory)
    calls = []
    monkeypatch.setattr(fraud_scorer.joblib, "load", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(FraudModelError):
        FraudScorer.load(directory)
    assert calls == []
