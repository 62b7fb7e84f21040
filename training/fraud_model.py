"""Fits and evaluates the fraud MLP: the split, the early-stopped MLP ensemble, threshold, metrics, leaky protocol."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from imblearn.over_sampling import ADASYN, SMOTE
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import VotingClassifier
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler

from app.inference.fraud_scorer import INPUT_FIELDS, prior_shift

logger = logging.getLogger(__name__)

Resample = Literal["none", "adasyn", "smote"]
Balance = Literal["none", "class_weight", "balanced_batches"]
SplitKind = Literal["stratified", "time"]
ThresholdRule = Literal["best_f1", "target_recall", "target_precision"]
RESAMPLERS: tuple[str, ...] = ("none", "adasyn", "smote")
BALANCES: tuple[str, ...] = ("none", "class_weight", "balanced_batches")
SPLITS: tuple[str, ...] = ("stratified", "time")
# The real rate of Kaggle's mlg-ulb creditcard.csv: 492 frauds in 284,807 transactions.
REAL_FRAUD_PRIOR = 492 / 284_807


class FraudTrainingError(ValueError):
    """Training cannot go on with these data or settings; the message is one line a person can act on."""


@dataclass(frozen=True)
class TrainConfig:
    features: tuple[str, ...] = tuple(name for name in INPUT_FIELDS if name != "Time")
    resample: Resample = "none"
    balance: Balance = "none"
    hidden_sizes: tuple[int, ...] = (64, 32)
    learning_rate: float = 1e-3
    alpha: float = 1e-2
    members: int = 5
    max_iter: int = 200
    early_stopping: bool = True
    patience: int = 10
    seed: int = 42
    split: SplitKind = "stratified"
    test_fraction: float = 0.2
    val_fraction_of_rest: float = 0.25
    threshold_rule: ThresholdRule = "best_f1"
    threshold_target: float | None = None
    target_prior: float = 0.001727


@dataclass
class Split:
    """Row indices into the data set; the three parts are disjoint and each holds both classes."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def parts(self, X: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {"train": (X[self.train], y[self.train]), "val": (X[self.val], y[self.val]), "test": (X[self.test], y[self.test])}


@dataclass
class RunResult:
    """One fitted pipeline and what it scored. `train_prior` is the positive rate the MLP saw (after resampling
    or reweighting)."""

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


def time_split(time: np.ndarray, y: np.ndarray, config: TrainConfig) -> Split:
    """Time-ordered: the earliest rows train, the next validate, the latest test (same fractions as the
    stratified split), so the model is always measured on transactions later than any it learnt from."""
    order = np.argsort(time, kind="stable")
    n = len(order)
    test_start = n - int(round(n * config.test_fraction))
    val_start = test_start - int(round(test_start * config.val_fraction_of_rest))
    split = Split(train=order[:val_start], val=order[val_start:test_start], test=order[test_start:])
    for name in ("train", "val", "test"):
        frauds = int(y[getattr(split, name)].sum())
        if not 0 < frauds < len(getattr(split, name)):
            raise FraudTrainingError(f"time-ordered split: the {name} part holds {frauds} frauds; it needs both classes")
    return split


def split_rows(X: np.ndarray, y: np.ndarray, config: TrainConfig) -> Split:
    """X has every INPUT_FIELDS column (Time included, whether or not the model uses it)."""
    if config.split == "time":
        return time_split(X[:, INPUT_FIELDS.index("Time")], y, config)
    return stratified_split(y, config)


def build_sampler(resample: Resample, seed: int) -> ADASYN | SMOTE | None:
    if resample == "adasyn":
        return ADASYN(random_state=seed)
    if resample == "smote":
        return SMOTE(random_state=seed)
    return None


class EarlyStoppedMLPs(ClassifierMixin, BaseEstimator):
    """`members` scikit-learn MLPs (Adam, log-loss = binary cross-entropy), each trained epoch by epoch and kept at
    the epoch with the best AUPRC on its own stratified hold-out of the rows given to fit; predict_proba averages them.

    Members differ by seed (initial weights, batch order, hold-out rows). Oversampling (`resample`) touches a
    member's training rows only, never its hold-out; `balance` reweights (class_weight) or rebuilds each epoch
    with the frauds drawn up to the normals' count (balanced_batches). `train_prior_` is the positive rate the
    members were fitted at, which the prior-shift calibration needs.
    """

    def __init__(
        self,
        hidden_sizes: tuple[int, ...] = (64, 32),
        alpha: float = 1e-4,
        learning_rate: float = 1e-3,
        members: int = 1,
        resample: Resample = "none",
        balance: Balance = "none",
        max_iter: int = 200,
        early_stopping: bool = True,
        patience: int = 10,
        holdout_fraction: float = 0.15,
        batch_size: int = 200,
        seed: int = 42,
    ):
        self.hidden_sizes = hidden_sizes
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.members = members
        self.resample = resample
        self.balance = balance
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.patience = patience
        self.holdout_fraction = holdout_fraction
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> EarlyStoppedMLPs:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y).astype(np.int64)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = X.shape[1]
        self.members_: list[MLPClassifier] = []
        self.history_: list[dict[str, list[float]]] = []
        self.best_epochs_: list[int] = []
        priors = []
        for member in range(self.members):
            mlp, prior, history, best_epoch = self._fit_member(X, y, self.seed + member)
            self.members_.append(mlp)
            priors.append(prior)
            self.history_.append(history)
            self.best_epochs_.append(best_epoch)
        self.train_prior_ = float(np.mean(priors))
        return self

    def _fit_member(self, X: np.ndarray, y: np.ndarray, seed: int) -> tuple[MLPClassifier, float, dict[str, list[float]], int]:
        rows = np.arange(len(y))
        if self.early_stopping:
            fit_rows, holdout = train_test_split(rows, test_size=self.holdout_fraction, stratify=y, random_state=seed)
        else:
            fit_rows, holdout = rows, rows[:0]
        X_fit, y_fit = X[fit_rows], y[fit_rows]
        sampler = build_sampler(self.resample, seed)
        if sampler is not None:
            X_fit, y_fit = sampler.fit_resample(X_fit, y_fit)
        weights = None
        prior = float(y_fit.mean())
        if self.balance == "class_weight":
            weights = np.where(y_fit == 1, 0.5 / prior, 0.5 / (1.0 - prior))
            prior = 0.5
        elif self.balance == "balanced_batches":
            prior = 0.5
        mlp = MLPClassifier(
            hidden_layer_sizes=self.hidden_sizes,
            solver="adam",  # minimises log-loss, i.e. binary cross-entropy for two classes
            learning_rate_init=self.learning_rate,
            alpha=self.alpha,
            batch_size=min(self.batch_size, len(y_fit)),
            random_state=seed,
        )
        rng = np.random.default_rng(seed)
        frauds, normals = np.flatnonzero(y_fit == 1), np.flatnonzero(y_fit == 0)
        history: dict[str, list[float]] = {"loss": [], "holdout_auprc": []}
        best_auprc, best_state, best_epoch, waited = -1.0, None, 0, 0
        for epoch in range(1, self.max_iter + 1):
            if self.balance == "balanced_batches":
                epoch_rows = np.concatenate([normals, rng.choice(frauds, size=len(normals), replace=True)])
                mlp.partial_fit(X_fit[epoch_rows], y_fit[epoch_rows], classes=self.classes_)
            else:
                mlp.partial_fit(X_fit, y_fit, sample_weight=weights, classes=self.classes_)
            history["loss"].append(float(mlp.loss_))
            if not self.early_stopping:
                best_epoch = epoch
                continue
            auprc = float(average_precision_score(y[holdout], mlp.predict_proba(X[holdout])[:, 1]))
            history["holdout_auprc"].append(auprc)
            if auprc > best_auprc + 1e-4:
                best_auprc, best_epoch, waited = auprc, epoch, 0
                best_state = (copy.deepcopy(mlp.coefs_), copy.deepcopy(mlp.intercepts_))
            else:
                waited += 1
                if waited >= self.patience:
                    break
        if best_state is not None:
            mlp.coefs_, mlp.intercepts_ = best_state
        return mlp, prior, history, best_epoch

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.mean([member.predict_proba(X) for member in self.members_], axis=0)  # [rows, 2]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def build_pipeline(config: TrainConfig) -> Pipeline:
    """Scaler -> MLP ensemble. Any oversampling happens inside the ensemble's fit, on its training rows only."""
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            (
                "mlp",
                EarlyStoppedMLPs(
                    hidden_sizes=config.hidden_sizes,
                    alpha=config.alpha,
                    learning_rate=config.learning_rate,
                    members=config.members,
                    resample=config.resample,
                    balance=config.balance,
                    max_iter=config.max_iter,
                    early_stopping=config.early_stopping,
                    patience=config.patience,
                    seed=config.seed,
                ),
            ),
        ]
    )


def serving_pipeline(fitted: Pipeline) -> Pipeline:
    """The fitted pipeline in plain scikit-learn types that skops loads without trusting any extra type: the
    scaler and a soft VotingClassifier over the fitted MLPs (the same average). Each MLP drops its Adam state,
    which only further training needs."""
    members = []
    for mlp in fitted.named_steps["mlp"].members_:
        served = copy.deepcopy(mlp)
        for attribute in ("_optimizer", "_best_coefs", "_best_intercepts", "_no_improvement_count"):
            if hasattr(served, attribute):
                delattr(served, attribute)
        members.append(served)
    voting = VotingClassifier([(f"mlp{i}", member) for i, member in enumerate(members)], voting="soft")
    # Fitted by hand: VotingClassifier.fit would refit the members from scratch without the AUPRC early stopping.
    voting.estimators_ = members
    voting.le_ = LabelEncoder().fit([0, 1])
    voting.classes_ = voting.le_.classes_
    return Pipeline([("scaler", fitted.named_steps["scaler"]), ("mlp", voting)])


def effective_train_prior(pipeline: Pipeline) -> float:
    """Positive rate the MLPs were fitted at (after resampling or reweighting)."""
    return float(pipeline.named_steps["mlp"].train_prior_)


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
        train_prior = effective_train_prior(pipeline)
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
    parts = split_rows(X, y, config).parts(X[:, columns], y)
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
