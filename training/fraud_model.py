"""Fits and evaluates the fraud MLP: the split, resampling inside the pipeline, threshold, metrics, leaky protocol."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from imblearn.over_sampling import ADASYN, SMOTE
from imblearn.pipeline import Pipeline as ImbPipeline
from sklearn.base import clone
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from app.inference.fraud_scorer import INPUT_FIELDS, prior_shift

logger = logging.getLogger(__name__)

Resample = Literal["none", "adasyn", "smote"]
ThresholdRule = Literal["best_f1", "target_recall", "target_precision"]
RESAMPLERS: tuple[str, ...] = ("none", "adasyn", "smote")
# The real rate of Kaggle's mlg-ulb creditcard.csv: 492 frauds in 284,807 transactions.
REAL_FRAUD_PRIOR = 492 / 284_807


class FraudTrainingError(ValueError):
    """Training cannot go on with these data or settings; the message is one line a person can act on."""


@dataclass(frozen=True)
class TrainConfig:
    features: tuple[str, ...] = tuple(name for name in INPUT_FIELDS if name != "Time")
    resample: Resample = "none"
    hidden_sizes: tuple[int, ...] = (64, 32)
    learning_rate: float = 1e-3
    alpha: float = 1e-4
    max_iter: int = 200
    early_stopping: bool = True
    seed: int = 42
    test_fraction: float = 0.2
    val_fraction_of_rest: float = 0.25
    threshold_rule: ThresholdRule = "best_f1"
    threshold_target: float | None = None
    target_prior: float = 0.001727


@dataclass
class Split:
    """Row indices into the data set; the three parts are disjoint and stratified by label."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def parts(self, X: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {"train": (X[self.train], y[self.train]), "val": (X[self.val], y[self.val]), "test": (X[self.test], y[self.test])}


@dataclass
class RunResult:
    """One fitted pipeline and what it scored. `train_prior` is the positive rate the MLP saw (after resampling)."""

    config: TrainConfig
    protocol: Literal["clean", "paper"]
    pipeline: Any
    train_prior: float
    threshold: float
    metrics: dict[str, dict[str, Any]]  # split name -> metrics
    labels: dict[str, np.ndarray] = field(repr=False)
    probabilities: dict[str, np.ndarray] = field(repr=False)  # calibrated

    @property
    def leaky(self) -> bool:
        return self.protocol == "paper"


def stratified_split(y: np.ndarray, config: TrainConfig) -> Split:
    """The report's protocol: 20% test, then 25% of the rest for validation, stratified, fixed seed."""
    index = np.arange(len(y))
    try:
        rest, test = train_test_split(index, test_size=config.test_fraction, stratify=y, random_state=config.seed)
        train, val = train_test_split(
            rest, test_size=config.val_fraction_of_rest, stratify=y[rest], random_state=config.seed
        )
    except ValueError as exc:
        raise FraudTrainingError(f"cannot split {len(y)} rows ({int(y.sum())} frauds) three ways: {exc}") from exc
    return Split(train=train, val=val, test=test)


def build_sampler(resample: Resample, seed: int) -> ADASYN | SMOTE | None:
    if resample == "adasyn":
        return ADASYN(random_state=seed)
    if resample == "smote":
        return SMOTE(random_state=seed)
    return None


def build_pipeline(config: TrainConfig) -> ImbPipeline:
    """Scaler -> sampler -> MLP. imblearn runs samplers in fit only, so validation and test rows are never resampled."""
    steps: list[tuple[str, Any]] = [("scaler", StandardScaler())]
    sampler = build_sampler(config.resample, config.seed)
    if sampler is not None:
        steps.append(("sampler", sampler))
    steps.append(
        (
            "mlp",
            MLPClassifier(
                hidden_layer_sizes=config.hidden_sizes,
                solver="adam",  # minimises log-loss, i.e. binary cross-entropy for two classes
                learning_rate_init=config.learning_rate,
                alpha=config.alpha,
                max_iter=config.max_iter,
                early_stopping=config.early_stopping,
                random_state=config.seed,
            ),
        )
    )
    return ImbPipeline(steps)


def serving_pipeline(fitted: ImbPipeline) -> Pipeline:
    """The fitted pipeline without its sampler: identical at predict time, and it drops the sampler's
    fitted neighbour index, which holds real training frauds that have no business in a shipped artifact."""
    return Pipeline([(name, step) for name, step in fitted.steps if not hasattr(step, "fit_resample")])


def effective_train_prior(pipeline: ImbPipeline, X_train: np.ndarray, y_train: np.ndarray) -> float:
    """Positive rate the classifier was fitted at: the sampler rerun on the same rows with the same seed."""
    if "sampler" not in pipeline.named_steps:
        return float(y_train.mean())
    _, y_resampled = clone(pipeline[:-1]).fit_resample(X_train, y_train)
    return float(np.mean(y_resampled))


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: ThresholdRule, target: float | None = None) -> float:
    """A threshold on the scale of `p` (is_fraud = p >= threshold), picked on validation data.

    best_f1: highest F1. target_recall R: best precision among thresholds with recall >= R.
    target_precision P: best recall among thresholds with precision >= P.
    """
    precision, recall, thresholds = precision_recall_curve(y, p)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    if rule == "best_f1":
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        return float(thresholds[int(np.argmax(f1))])
    if target is None:
        raise FraudTrainingError(f"threshold rule {rule} needs a target")
    if rule == "target_recall":
        eligible = recall >= target
        score_of_choice = precision
    else:
        eligible = precision >= target
        score_of_choice = recall
    if not eligible.any():
        raise FraudTrainingError(f"no threshold reaches {rule.removeprefix('target_')} {target} on validation")
    best = np.flatnonzero(eligible)[int(np.argmax(score_of_choice[eligible]))]
    return float(thresholds[best])


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float, target_prior: float) -> dict[str, Any]:
    """Metrics at `threshold`, plus the precision the same recall and false-positive rate give at the target prior."""
    predicted = (p >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = confusion_matrix(y, predicted, labels=[0, 1]).tolist()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    projected = recall * target_prior
    projected_precision = projected / (projected + fpr * (1 - target_prior)) if projected + fpr else 0.0
    both_classes = 0 < int(y.sum()) < len(y)
    return {
        "rows": int(len(y)),
        "frauds": int(y.sum()),
        "threshold": threshold,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auprc": float(average_precision_score(y, p)) if both_classes else None,
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else None,
        "false_positive_rate": fpr,
        "precision_at_target_prior": projected_precision,
        "confusion_matrix": {"labels": [0, 1], "rows_true_cols_predicted": [[tn, fp], [fn, tp]]},
    }


def _fit_and_score(
    config: TrainConfig,
    protocol: Literal["clean", "paper"],
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
) -> RunResult:
    X_train, y_train = parts["train"]
    pipeline = build_pipeline(config)
    try:
        pipeline.fit(X_train, y_train)
        train_prior = effective_train_prior(pipeline, X_train, y_train)
    except (ValueError, RuntimeError) as exc:  # e.g. ADASYN finding no minority neighbours to interpolate
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FraudTrainingError(f"fitting with resample={config.resample} failed: {first_line}") from exc

    labels: dict[str, np.ndarray] = {}
    probabilities: dict[str, np.ndarray] = {}
    for name, (X, y) in parts.items():
        raw = pipeline.predict_proba(X)[:, list(pipeline.classes_).index(1)]
        labels[name] = y
        probabilities[name] = prior_shift(raw, train_prior, config.target_prior)
    # The threshold lives on the served (calibrated) scale and is chosen on validation only.
    threshold = choose_threshold(labels["val"], probabilities["val"], config.threshold_rule, config.threshold_target)
    metrics = {
        name: evaluate(labels[name], probabilities[name], threshold, config.target_prior) for name in parts
    }
    if "Time" in config.features:
        metrics["test"]["auprc_with_time_shuffled"] = _auprc_with_column_shuffled(
            pipeline, *parts["test"], column=config.features.index("Time"), seed=config.seed
        )
    return RunResult(config, protocol, pipeline, train_prior, threshold, metrics, labels, probabilities)


def _auprc_with_column_shuffled(pipeline: Any, X: np.ndarray, y: np.ndarray, column: int, seed: int) -> float:
    """Permutation check: how much of the ranking rests on one column. The prior shift is monotonic, so raw
    probabilities give the same AUPRC as calibrated ones."""
    shuffled = X.copy()
    shuffled[:, column] = np.random.default_rng(seed).permutation(shuffled[:, column])
    return float(average_precision_score(y, pipeline.predict_proba(shuffled)[:, list(pipeline.classes_).index(1)]))


def time_confound(X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """How well Time alone separates the classes with no model at all, and how each class spreads over the
    first hour: in a sample assembled from the data set's start plus frauds from everywhere, Time tells the
    two apart for reasons that have nothing to do with fraud."""
    time = X[:, INPUT_FIELDS.index("Time")]
    return {
        "roc_auc_of_raw_time": float(roc_auc_score(y, time)),
        "normal_rows_in_first_hour": float(np.mean(time[y == 0] < 3600)),
        "fraud_rows_in_first_hour": float(np.mean(time[y == 1] < 3600)),
    }


def run_clean(X: np.ndarray, y: np.ndarray, config: TrainConfig) -> RunResult:
    """Split first; the pipeline resamples inside fit, so only training rows are ever oversampled.
    Train metrics are measured on the original training rows, not the resampled ones."""
    columns = [INPUT_FIELDS.index(name) for name in config.features]
    parts = stratified_split(y, config).parts(X[:, columns], y)
    return _fit_and_score(config, "clean", parts)


def run_leaky(X: np.ndarray, y: np.ndarray, config: TrainConfig) -> RunResult:
    """The original report's protocol, kept only to show its inflation: the whole data set is standardised and
    oversampled before the split, so validation and test hold synthetic frauds interpolated from training frauds
    and a near-balanced class mix. Every number it gives is LEAKY."""
    resample: Resample = config.resample if config.resample != "none" else "adasyn"
    columns = [INPUT_FIELDS.index(name) for name in config.features]
    sampler = build_sampler(resample, config.seed)
    try:
        X_all, y_all = sampler.fit_resample(StandardScaler().fit_transform(X[:, columns]), y)
    except (ValueError, RuntimeError) as exc:
        raise FraudTrainingError(f"leaky protocol: {resample} failed: {exc}") from exc
    parts = stratified_split(y_all, config).parts(X_all, y_all)
    # The MLP itself is fitted without a sampler: the data were already oversampled, leak included.
    result = _fit_and_score(replace(config, resample="none"), "paper", parts)
    return replace(result, config=replace(config, resample=resample))
