"""Calibration at the real fraud rate: rows importance-weighted to the target prior, weighted Brier score and
reliability bins, for the shipped model's test split and its cross-validated out-of-fold predictions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.inference.fraud_scorer import prior_shift
from training.fraud_compare import Comparison
from training.fraud_model import RunResult

# Bin edges on the calibrated scale; log-spaced because at a 0.17% prior almost every probability is tiny.
BIN_EDGES = np.array([0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])


def importance_weights(y: np.ndarray, target_prior: float) -> np.ndarray:
    """Per-row weights that make the weighted fraud rate equal `target_prior`: frauds pi/pi_s, normals
    (1-pi)/(1-pi_s), with pi_s the rows' own fraud rate. The weights sum to the row count."""
    sample_prior = float(np.mean(y))
    return np.where(y == 1, target_prior / sample_prior, (1.0 - target_prior) / (1.0 - sample_prior))


def weighted_brier(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sum(weights * (p - y) ** 2) / np.sum(weights))


@dataclass
class ReliabilityBins:
    lower: list[float]
    upper: list[float]
    mean_predicted: list[float]  # weighted mean calibrated probability in the bin
    observed: list[float]  # weighted fraud rate in the bin
    weight_share: list[float]  # share of the (weighted) rows in the bin
    frauds: list[int]  # unweighted fraud rows in the bin
    rows: list[int]


def reliability(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> ReliabilityBins:
    which = np.clip(np.searchsorted(BIN_EDGES, p, side="right") - 1, 0, len(BIN_EDGES) - 2)
    bins = ReliabilityBins([], [], [], [], [], [], [])
    total = float(np.sum(weights))
    for b in range(len(BIN_EDGES) - 1):
        inside = which == b
        if not inside.any():
            continue
        w = weights[inside]
        bins.lower.append(float(BIN_EDGES[b]))
        bins.upper.append(float(BIN_EDGES[b + 1]))
        bins.mean_predicted.append(float(np.sum(w * p[inside]) / np.sum(w)))
        bins.observed.append(float(np.sum(w * y[inside]) / np.sum(w)))
        bins.weight_share.append(float(np.sum(w) / total))
        bins.frauds.append(int(np.sum(y[inside])))
        bins.rows.append(int(np.sum(inside)))
    return bins


@dataclass
class CalibrationSet:
    """One set of rows scored by the shipped configuration, measured at the target prior."""

    name: str
    rows: int
    frauds: int
    brier: float  # calibrated probabilities, rows weighted to the target prior
    brier_uncorrected: float  # the MLP's raw probabilities (fitted at pi_t), same weights
    brier_constant: float  # always answering the target prior: pi (1 - pi)
    bins: ReliabilityBins

    @property
    def skill(self) -> float:
        """Brier skill score against the constant forecast: 1 is perfect, 0 no better than the base rate."""
        return 1.0 - self.brier / self.brier_constant


@dataclass
class CalibrationReport:
    target_prior: float
    sets: list[CalibrationSet]

    def to_json(self) -> dict[str, Any]:
        return {
            "target_prior": self.target_prior,
            "method": "rows importance-weighted to the target prior; Brier = weighted mean of (p - y)^2",
            "sets": [
                {
                    "name": s.name,
                    "rows": s.rows,
                    "frauds": s.frauds,
                    "brier": s.brier,
                    "brier_uncorrected": s.brier_uncorrected,
                    "brier_constant": s.brier_constant,
                    "brier_skill": s.skill,
                    "bins": vars(s.bins),
                }
                for s in self.sets
            ],
        }


def _measure(name: str, y: np.ndarray, calibrated: np.ndarray, raw: np.ndarray, target_prior: float) -> CalibrationSet:
    weights = importance_weights(y, target_prior)
    return CalibrationSet(
        name=name,
        rows=int(len(y)),
        frauds=int(np.sum(y)),
        brier=weighted_brier(y, calibrated, weights),
        brier_uncorrected=weighted_brier(y, raw, weights),
        brier_constant=target_prior * (1.0 - target_prior),
        bins=reliability(y, calibrated, weights),
    )


def calibration_report(shipped: RunResult, cross_validated: Comparison | None, target_prior: float) -> CalibrationReport:
    """The shipped model's test split, and (with --compare) the stratified folds' out-of-fold predictions of the
    shipped configuration, each fold's probabilities corrected from that fold's own training prior."""
    y = shipped.labels["test"]
    calibrated = shipped.probabilities["test"]
    # Undo the served correction to get the MLP's own probabilities: the inverse shift swaps the priors.
    raw = prior_shift(calibrated, target_prior, shipped.train_prior)
    sets = [_measure("test split", y, calibrated, raw, target_prior)]
    if cross_validated is not None:
        fold = cross_validated.shipped_out_of_fold
        raw_oof = fold["p_raw"]
        calibrated_oof = np.empty_like(raw_oof)
        for prior in np.unique(fold["train_prior"]):
            same = fold["train_prior"] == prior
            calibrated_oof[same] = prior_shift(raw_oof[same], float(prior), target_prior)
        sets.append(_measure("cross-validated, out of fold", fold["y"], calibrated_oof, raw_oof, target_prior))
    return CalibrationReport(target_prior=target_prior, sets=sets)
