"""Compares the fraud MLP with its variants and classical peers by repeated stratified k-fold and by
time-ordered forward folds: per-fold AUPRC, ROC-AUC, recall at precision 0.9, and paired differences."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from scipy import stats
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from app.inference.fraud_scorer import INPUT_FIELDS
from training.fraud_model import TrainConfig, build_pipeline

logger = logging.getLogger(__name__)

SHIPPED = "shipped"
PRECISION_FOR_RECALL = 0.9
# Forward folds of the time protocol: train on every row before a cut, test on the next tenth of the rows.
TIME_CUTS = (0.6, 0.7, 0.8, 0.9)
METRICS = ("auprc", "roc_auc", "recall_at_p90")
# A forward fold is used only if it has enough frauds to train on (early stopping holds some out) and to measure.
MIN_TRAIN_FRAUDS = 20
MIN_TEST_FRAUDS = 5


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    family: str  # "mlp" or "peer"
    make: Callable[[int], Any]  # seed -> unfitted estimator taking the model's feature columns


def candidates(shipped: TrainConfig) -> dict[str, Candidate]:
    """The shipped configuration, MLP variants around it, and the classical peers; keyed for --compare-models."""
    hidden = ",".join(map(str, shipped.hidden_sizes))

    def mlp(label: str, key: str, **changes: Any) -> Candidate:
        return Candidate(key, label, "mlp", lambda seed: build_pipeline(replace(shipped, seed=seed, **changes)))

    single = {"members": 1}
    found = [
        Candidate(SHIPPED, f"**shipped**: {_describe(shipped)}", "mlp", lambda seed: build_pipeline(replace(shipped, seed=seed))),
        Candidate(
            "mlp_previous",
            "previous shipped MLP: 64,32, L2 1e-4, sklearn early stopping on hold-out accuracy",
            "mlp",
            lambda seed: Pipeline(
                [
                    ("scaler", StandardScaler()),
                    ("mlp", MLPClassifier((64, 32), alpha=1e-4, early_stopping=True, max_iter=200, random_state=seed)),
                ]
            ),
        ),
        mlp(f"MLP {hidden}, one member", "mlp_single", **single),
        mlp(f"MLP {hidden}, one member, L2 1e-4", "mlp_l2_low", alpha=1e-4, **single),
        mlp(f"MLP {hidden}, one member, L2 1e-1", "mlp_l2_high", alpha=1e-1, **single),
        mlp("MLP 16, one member", "mlp_small", hidden_sizes=(16,), **single),
        mlp("MLP 128,64, one member", "mlp_wide", hidden_sizes=(128, 64), **single),
        mlp(f"MLP {hidden}, one member, no early stopping (200 epochs)", "mlp_no_stop", early_stopping=False, **single),
        mlp(f"MLP {hidden}, one member, class weights", "mlp_class_weight", balance="class_weight", resample="none", **single),
        mlp(f"MLP {hidden}, one member, balanced batches", "mlp_balanced", balance="balanced_batches", resample="none", **single),
        mlp(f"MLP {hidden}, one member, ADASYN on training folds", "mlp_adasyn", resample="adasyn", balance="none", **single),
        mlp(f"MLP {hidden}, one member, SMOTE on training folds", "mlp_smote", resample="smote", balance="none", **single),
        Candidate(
            "logreg",
            "logistic regression (L2, C=1)",
            "peer",
            lambda seed: Pipeline([("scaler", StandardScaler()), ("lr", LogisticRegression(max_iter=2000))]),
        ),
        Candidate(
            "hgb",
            "histogram gradient boosting (defaults)",
            "peer",
            lambda seed: HistGradientBoostingClassifier(random_state=seed),
        ),
        Candidate(
            "rf",
            "random forest (300 trees)",
            "peer",
            lambda seed: RandomForestClassifier(n_estimators=300, n_jobs=1, random_state=seed),
        ),
    ]
    return {candidate.key: candidate for candidate in found}


def _describe(config: TrainConfig) -> str:
    parts = [
        f"{config.members} x MLP {','.join(map(str, config.hidden_sizes))}",
        f"L2 {config.alpha:g}",
        "early stopping on hold-out AUPRC" if config.early_stopping else f"{config.max_iter} epochs",
    ]
    if config.balance != "none":
        parts.append(config.balance.replace("_", " "))
    if config.resample != "none":
        parts.append(config.resample.upper())
    return ", ".join(parts)


@dataclass
class Comparison:
    """Per-fold scores of every candidate on the same folds, in fold order."""

    protocol: str  # "stratified" or "time"
    description: str
    labels: dict[str, str]
    scores: dict[str, dict[str, list[float]]]  # candidate -> metric -> per-fold values
    fold_sizes: list[tuple[int, int]]  # (train rows, test rows) per fold
    seconds: dict[str, float]
    shipped_out_of_fold: dict[str, np.ndarray] = field(default_factory=dict)  # y, raw p, train prior per row

    def paired(self, peer: str, metric: str) -> dict[str, float]:
        """shipped − peer per fold: mean, sd, folds won, and the Nadeau–Bengio corrected resampled t-test
        (folds share training rows, so the plain t-test's variance is too small)."""
        diff = np.array(self.scores[SHIPPED][metric]) - np.array(self.scores[peer][metric])
        folds = len(diff)
        mean, sd = float(np.mean(diff)), float(np.std(diff, ddof=1)) if folds > 1 else 0.0
        train_rows, test_rows = np.mean([size[0] for size in self.fold_sizes]), np.mean([size[1] for size in self.fold_sizes])
        correction = 1.0 / folds + test_rows / train_rows
        t = mean / np.sqrt(correction * sd**2) if sd > 0 else float("inf") * np.sign(mean) if mean else 0.0
        p = float(2 * stats.t.sf(abs(t), df=folds - 1)) if folds > 1 and np.isfinite(t) else (0.0 if mean else 1.0)
        return {"mean": mean, "sd": sd, "won": int(np.sum(diff > 0)), "folds": folds, "t": float(t), "p": p}


def recall_at_precision(y: np.ndarray, p: np.ndarray, precision_floor: float = PRECISION_FOR_RECALL) -> float:
    """Highest recall among the thresholds whose precision reaches the floor (0 if none does)."""
    precision, recall, _ = precision_recall_curve(y, p)
    eligible = precision >= precision_floor
    return float(recall[eligible].max()) if eligible.any() else 0.0


def _scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "auprc": float(average_precision_score(y, p)),
        "roc_auc": float(roc_auc_score(y, p)),
        "recall_at_p90": recall_at_precision(y, p),
    }


def stratified_folds(y: np.ndarray, splits: int, repeats: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    folds = RepeatedStratifiedKFold(n_splits=splits, n_repeats=repeats, random_state=seed)
    return list(folds.split(np.zeros(len(y)), y))


def time_folds(time_column: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Forward chaining: for each cut, every row before it trains and the next tenth of the rows tests; folds
    with too few frauds to train on or to measure are left out."""
    order = np.argsort(time_column, kind="stable")
    n = len(order)
    folds = []
    for cut in TIME_CUTS:
        start, end = int(round(n * cut)), int(round(n * (cut + 0.1)))
        train, test = order[:start], order[start:end]
        if y[train].sum() >= MIN_TRAIN_FRAUDS and MIN_TEST_FRAUDS <= y[test].sum() < len(test):
            folds.append((train, test))
    return folds


def run_comparison(
    X: np.ndarray,
    y: np.ndarray,
    shipped: TrainConfig,
    *,
    protocol: str,
    folds: list[tuple[np.ndarray, np.ndarray]],
    description: str,
    keys: list[str] | None = None,
    jobs: int = 1,
    say: Callable[[str], None] = logger.info,
) -> Comparison:
    """Fits every candidate on every fold's training rows and scores its test rows. X holds all INPUT_FIELDS;
    candidates see the shipped model's feature columns. Fold k seeds every candidate with shipped.seed + k.
    Folds run in `jobs` processes, each limited to one BLAS/OpenMP thread, so the run uses `jobs` cores."""
    table = candidates(shipped)
    chosen = [SHIPPED, *[key for key in (keys or table) if key != SHIPPED]]
    unknown = [key for key in chosen if key not in table]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(table)}")
    features = X[:, [INPUT_FIELDS.index(name) for name in shipped.features]]
    tasks = (
        delayed(_run_fold)(features[train], y[train], features[test], y[test], shipped, chosen, shipped.seed + number)
        for number, (train, test) in enumerate(folds)
    )
    scores: dict[str, dict[str, list[float]]] = {key: {metric: [] for metric in METRICS} for key in chosen}
    seconds = dict.fromkeys(chosen, 0.0)
    out_of_fold: dict[str, list[np.ndarray]] = {"y": [], "p_raw": [], "train_prior": []}
    for number, (fold_scores, fold_seconds, shipped_fold) in enumerate(Parallel(n_jobs=jobs, return_as="generator")(tasks)):
        for key in chosen:
            for metric in METRICS:
                scores[key][metric].append(fold_scores[key][metric])
            seconds[key] += fold_seconds[key]
        for name, values in shipped_fold.items():
            out_of_fold[name].append(values)
        say(f"{protocol} fold {number + 1}/{len(folds)}: shipped AUPRC {fold_scores[SHIPPED]['auprc']:.3f}")
    return Comparison(
        protocol=protocol,
        description=description,
        labels={key: table[key].label for key in chosen},
        scores=scores,
        fold_sizes=[(len(train), len(test)) for train, test in folds],
        seconds=seconds,
        shipped_out_of_fold={name: np.concatenate(parts) for name, parts in out_of_fold.items()},
    )


def _run_fold(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    shipped: TrainConfig,
    keys: list[str],
    seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, np.ndarray]]:
    table = candidates(shipped)
    scores, seconds, shipped_fold = {}, {}, {}
    with threadpool_limits(limits=1):
        for key in keys:
            started = time.perf_counter()
            model = table[key].make(seed)
            model.fit(X_train, y_train)
            p = model.predict_proba(X_test)[:, 1]  # [test rows]
            seconds[key] = time.perf_counter() - started
            scores[key] = _scores(y_test, p)
            if key == SHIPPED:
                prior = model.named_steps["mlp"].train_prior_
                shipped_fold = {"y": y_test, "p_raw": p, "train_prior": np.full(len(y_test), prior)}
    return scores, seconds, shipped_fold


def comparison_table(comparison: Comparison) -> list[str]:
    """Markdown: mean ± sd of each metric over the folds, and shipped − candidate AUPRC per fold."""
    lines = [
        "| model | AUPRC | ROC-AUC | recall at precision 0.9 | shipped − this, AUPRC (mean ± sd) | folds shipped wins | corrected t-test p | fit s / fold |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    folds = len(comparison.fold_sizes)
    ranked = sorted(comparison.scores, key=lambda key: (key != SHIPPED, -np.mean(comparison.scores[key]["auprc"])))
    for key in ranked:
        s = comparison.scores[key]
        cells = [f"{np.mean(s[m]):.3f} ± {np.std(s[m], ddof=1) if folds > 1 else 0.0:.3f}" for m in METRICS]
        if key == SHIPPED:
            cells += ["—", "—", "—"]
        else:
            d = comparison.paired(key, "auprc")
            cells += [f"{d['mean']:+.3f} ± {d['sd']:.3f}", f"{d['won']}/{d['folds']}", f"{d['p']:.2f}"]
        cells.append(f"{comparison.seconds[key] / folds:.1f}")
        lines.append(f"| {comparison.labels[key]} (`{key}`) | " + " | ".join(cells) + " |")
    return lines


def to_json(comparison: Comparison) -> dict[str, Any]:
    return {
        "protocol": comparison.protocol,
        "description": comparison.description,
        "fold_sizes": comparison.fold_sizes,
        "models": {
            key: {
                "label": comparison.labels[key],
                "per_fold": comparison.scores[key],
                **{f"{m}_mean": float(np.mean(comparison.scores[key][m])) for m in METRICS},
                **{
                    f"{m}_sd": float(np.std(comparison.scores[key][m], ddof=1)) if len(comparison.fold_sizes) > 1 else 0.0
                    for m in METRICS
                },
                "fit_seconds_total": comparison.seconds[key],
                **({} if key == SHIPPED else {"shipped_minus_this": {m: comparison.paired(key, m) for m in METRICS}}),
            }
            for key in comparison.scores
        },
    }
