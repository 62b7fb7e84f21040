"""Loads the fraud pipeline a training run wrote, verified against its manifest, and scores transactions."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import skops.io
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.artifacts import sha256_hex

logger = logging.getLogger(__name__)

# Every transaction the API accepts carries these, in the order of Kaggle's creditcard.csv.
INPUT_FIELDS: tuple[str, ...] = ("Time", *(f"V{i}" for i in range(1, 29)), "Amount")
MANIFEST_FILE = "manifest.json"
PRIOR_SHIFT_METHOD = "prior_shift_dal_pozzolo_2015"


# Types the artifact may hold beyond skops' defaults (scikit-learn estimators, NumPy arrays): none.
TRUSTED_TYPES: list[str] = []

FraudModelErrorCode = Literal[
    "missing", "invalid_manifest", "size_mismatch", "checksum_mismatch", "unloadable", "wrong_model"
]


class FraudModelError(Exception):
    """The fraud model directory cannot be served: missing, malformed, or not what its manifest declares.
    `code` says which, for callers and tests; the message says it to a person."""

    def __init__(self, message: str, code: FraudModelErrorCode):
        super().__init__(message)
        self.code: FraudModelErrorCode = code


def prior_shift(probabilities: Any, train_prior: float, target_prior: float) -> np.ndarray:
    """Moves probabilities learnt at positive rate `train_prior` to positive rate `target_prior`.

    Dal Pozzolo et al. 2015, "Calibrating Probability with Undersampling for Unbalanced
    Classification": with r = odds(target_prior) / odds(train_prior), p' = p*r / (p*r + (1 - p)).
    Monotonic, so rankings (AUPRC, ROC-AUC) are unchanged; equal priors give the identity.
    """
    for name, prior in (("train_prior", train_prior), ("target_prior", target_prior)):
        if not 0.0 < prior < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {prior}")
    p = np.asarray(probabilities, dtype=np.float64)
    ratio = (target_prior / (1.0 - target_prior)) / (train_prior / (1.0 - train_prior))
    scaled = p * ratio
    return scaled / (scaled + (1.0 - p))


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="File name inside the model directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)


class CalibrationInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["prior_shift_dal_pozzolo_2015"]
    train_prior: float = Field(gt=0, lt=1, description="Positive rate the classifier was fitted at, after resampling.")
    target_prior: float = Field(gt=0, lt=1, description="Positive rate served probabilities are corrected to.")


class FraudManifest(BaseModel):
    """manifest.json: what a training run declares about its artifact; the server trusts only this."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    model_version: str = Field(min_length=1)
    created_at: str
    artifact: ArtifactInfo
    features: list[str] = Field(min_length=1, description="Columns the pipeline takes, in order.")
    threshold: float = Field(ge=0, le=1, description="is_fraud = calibrated probability >= threshold.")
    threshold_rule: dict[str, Any]
    calibration: CalibrationInfo
    library_versions: dict[str, str]
    training: dict[str, Any]
    metrics_summary: dict[str, Any]

    @model_validator(mode="after")
    def _known_features(self) -> FraudManifest:
        unknown = [name for name in self.features if name not in INPUT_FIELDS]
        if unknown or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be distinct names among {INPUT_FIELDS[0]}..{INPUT_FIELDS[-1]}")
        return self


class FraudScorer:
    """A fitted scikit-learn pipeline and the manifest it was written with.

    Invariant: the pipeline was read (with skops, allow-listed types only) only after the artifact's bytes
    matched the manifest's sha256, and it takes exactly `features` columns. Read-only after load, so safe
    across threads.
    """

    def __init__(self, pipeline: Any, manifest: FraudManifest):
        self._pipeline = pipeline
        self._manifest = manifest
        self.model_version: str = manifest.model_version
        self.threshold: float = manifest.threshold
        self.features: list[str] = list(manifest.features)
        self._row_values = itemgetter(*self.features)
        self._positive_column = int(np.flatnonzero(np.asarray(pipeline.classes_) == 1)[0])

    @property
    def manifest(self) -> FraudManifest:
        return self._manifest

    @classmethod
    def load(cls, model_dir: Path) -> FraudScorer:
        model_dir = Path(model_dir)
        manifest = _read_manifest(model_dir)
        artifact = model_dir / manifest.artifact.file
        if not artifact.is_file():
            raise FraudModelError(f"artifact {artifact} named by the manifest is missing", "missing")
        # Checked before the artifact is parsed at all: only the bytes the manifest declares are opened.
        size = artifact.stat().st_size
        if size != manifest.artifact.bytes:
            raise FraudModelError(
                f"artifact {artifact} is {size} bytes, the manifest declares {manifest.artifact.bytes} (truncated or replaced)",
                "size_mismatch",
            )
        digest = sha256_hex(artifact)
        if digest != manifest.artifact.sha256:
            raise FraudModelError(
                f"artifact {artifact} sha256 {digest[:12]}... does not match the manifest's "
                f"{manifest.artifact.sha256[:12]}... (tampered or replaced)",
                "checksum_mismatch",
            )
        _warn_on_version_drift(manifest.library_versions)
        try:
            # skops rebuilds only allow-listed types and never unpickles, so even a file that matches a rewritten
            # manifest cannot run code here; anything outside the allow-list is refused.
            pipeline = skops.io.load(artifact, trusted=TRUSTED_TYPES)
        except Exception as exc:  # not a skops file, an untrusted type, or library versions that cannot read it
            raise FraudModelError(
                f"artifact {artifact} could not be loaded: {type(exc).__name__}: {str(exc)[:300]}", "unloadable"
            ) from exc
        _check_pipeline(pipeline, manifest)
        return cls(pipeline, manifest)

    def score(self, rows: Sequence[Mapping[str, float]]) -> list[float]:
        """Calibrated fraud probabilities, one per row, in order; rows must carry every feature."""
        if not rows:
            return []
        matrix = np.array([self._row_values(row) for row in rows], dtype=np.float64)
        matrix = matrix.reshape(len(rows), len(self.features))  # [rows, features]
        raw = self._pipeline.predict_proba(matrix)[:, self._positive_column]  # [rows]
        calibration = self._manifest.calibration
        return prior_shift(raw, calibration.train_prior, calibration.target_prior).tolist()


def _read_manifest(model_dir: Path) -> FraudManifest:
    path = model_dir / MANIFEST_FILE
    if not model_dir.is_dir():
        raise FraudModelError(f"model directory {model_dir} does not exist", "missing")
    if not path.is_file():
        raise FraudModelError(f"{path} is missing", "missing")
    try:
        return FraudManifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise FraudModelError(f"{path} is invalid: {where}: {first['msg']}", "invalid_manifest") from exc


def _check_pipeline(pipeline: Any, manifest: FraudManifest) -> None:
    if not hasattr(pipeline, "predict_proba") or not hasattr(pipeline, "classes_"):
        raise FraudModelError("artifact is not a fitted classifier with predict_proba", "wrong_model")
    if sorted(np.asarray(pipeline.classes_).tolist()) != [0, 1]:
        raise FraudModelError(f"artifact classes are {list(pipeline.classes_)}, expected [0, 1]", "wrong_model")
    n_in = getattr(pipeline, "n_features_in_", None)
    if n_in != len(manifest.features):
        raise FraudModelError(
            f"artifact takes {n_in} features, the manifest lists {len(manifest.features)}", "wrong_model"
        )


def _warn_on_version_drift(trained_with: Mapping[str, str]) -> None:
    import sklearn

    running = {"scikit-learn": sklearn.__version__, "numpy": np.__version__}
    for name, version in running.items():
        if name in trained_with and trained_with[name] != version:
            logger.warning("fraud model was trained with %s %s, running %s", name, trained_with[name], version)

