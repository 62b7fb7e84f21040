"""The fraud scorer: the prior-shift correction, loading the shipped model, and refusing broken model dirs."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skops.io

from app.artifacts import sha256_hex
from app.inference import fraud_scorer
from app.inference.fraud_scorer import INPUT_FIELDS, FraudModelError, FraudScorer, prior_shift
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
    pipeline = skops.io.load(SHIPPED / scorer.manifest.artifact.file)
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


class WritesMarker:
    """Unpickling this runs `Path.write_text(marker, ...)`: proof that a load executed code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran at load"))


def _artifact(directory: Path) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["artifact"]["file"]


def _flip_byte(directory: Path) -> None:
    artifact = _artifact(directory)
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    artifact.write_bytes(bytes(blob))


def _truncate(directory: Path) -> None:
    artifact = _artifact(directory)
    artifact.write_bytes(artifact.read_bytes()[:-100])


def _malicious_pickle(directory: Path) -> None:
    """The artifact replaced by a pickle that writes a marker file when unpickled; the manifest is left alone."""
    _artifact(directory).write_bytes(pickle.dumps(WritesMarker(directory / "marker")))


def _malicious_pickle_resigned(directory: Path) -> None:
    """The same pickle with the manifest rewritten to match it: the sha256 passes, the loader still must not run it."""
    _malicious_pickle(directory)
    _resign(directory)


def _resign(directory: Path) -> None:
    artifact = _artifact(directory)
    _edit_manifest(artifact__sha256=sha256_hex(artifact), artifact__bytes=artifact.stat().st_size)(directory)


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


def _skops_of(obj) -> Callable[[Path], None]:
    """A well-formed skops file holding `obj`, with a manifest updated to match."""

    def write(directory: Path) -> None:
        skops.io.dump(obj, _artifact(directory))
        _resign(directory)

    return write


BROKEN = [
    ("missing directory", lambda d: shutil.rmtree(d), "missing"),
    ("missing manifest", lambda d: (d / "manifest.json").unlink(), "missing"),
    ("manifest not JSON", lambda d: (d / "manifest.json").write_text("{not json"), "invalid_manifest"),
    ("manifest lacks threshold", _edit_manifest(threshold=_DELETE), "invalid_manifest"),
    ("unknown calibration method", _edit_manifest(calibration__method="platt"), "invalid_manifest"),
    ("unknown feature", _edit_manifest(features=["V1", "Bogus"]), "invalid_manifest"),
    ("artifact path escapes the directory", _edit_manifest(artifact__file="../pipeline.skops"), "invalid_manifest"),
    ("missing artifact", lambda d: _artifact(d).unlink(), "missing"),
    ("truncated artifact", _truncate, "size_mismatch"),
    ("one byte flipped", _flip_byte, "checksum_mismatch"),
    ("malicious pickle, manifest untouched", _malicious_pickle, "size_mismatch"),
    ("malicious pickle, manifest rewritten to match", _malicious_pickle_resigned, "unloadable"),
    ("manifest sha256 edited", _edit_manifest(artifact__sha256="0" * 64), "checksum_mismatch"),
    ("feature count disagrees with the artifact", _edit_manifest(features=["V1", "V2"]), "wrong_model"),
    ("valid skops file that is not a classifier", _skops_of({"not": "a pipeline"}), "wrong_model"),
    ("skops file with a type outside the allow-list", _skops_of(Counter(a=1)), "unloadable"),
]


@pytest.mark.parametrize("breaker, code", [(b, c) for _, b, c in BROKEN], ids=[name for name, _, _ in BROKEN])
def test_broken_model_dir_is_refused(tmp_path, breaker, code):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    breaker(directory)
    with pytest.raises(FraudModelError) as excinfo:
        FraudScorer.load(directory)
    assert excinfo.value.code == code


def test_malicious_pickle_of_the_same_size_fails_the_checksum_and_never_runs(tmp_path):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    artifact = _artifact(directory)
    payload = pickle.dumps(WritesMarker(directory / "marker"))
    # Padded to the declared size (pickle stops reading at its STOP opcode), so only the sha256 can catch it.
    artifact.write_bytes(payload + b"\0" * (artifact.stat().st_size - len(payload)))
    with pytest.raises(FraudModelError) as excinfo:
        FraudScorer.load(directory)
    assert excinfo.value.code == "checksum_mismatch"
    assert not (directory / "marker").exists()


def test_the_marker_payload_does_run_when_unpickled(tmp_path):
    """The oracle for the tests above: the payload is live, so its marker's absence means the loader never ran it."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.read_text() == "code ran at load"


@pytest.mark.parametrize("breaker", [_malicious_pickle, _malicious_pickle_resigned], ids=["manifest untouched", "manifest rewritten"])
def test_malicious_pickle_never_writes_its_marker(tmp_path, breaker):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    breaker(directory)
    with pytest.raises(FraudModelError):
        FraudScorer.load(directory)
    assert not (directory / "marker").exists()


@pytest.mark.parametrize("breaker", [_flip_byte, _truncate, _malicious_pickle], ids=["flipped", "truncated", "replaced"])
def test_tampered_artifact_is_never_parsed(tmp_path, monkeypatch, breaker):
    directory = tmp_path / "fraud"
    shutil.copytree(SHIPPED, directory)
    breaker(directory)
    calls = []
    monkeypatch.setattr(fraud_scorer.skops.io, "load", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(FraudModelError):
        FraudScorer.load(directory)
    assert calls == []
