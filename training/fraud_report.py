"""Writes what a fraud training run shows a person: the PNG plots and the model card (README.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

from training.fraud_model import RunResult  # noqa: E402

logger = logging.getLogger(__name__)

PLOT_FILES = {
    "confusion": "confusion_matrices.png",
    "pr_curve": "precision_recall.png",
    "loss": "loss_curve.png",
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Variant:
    """One row of a comparison table: a label, and the runs (one per seed) that measured it."""

    key: str
    label: str
    runs: list[RunResult]

    @property
    def leaky(self) -> bool:
        return any(run.leaky for run in self.runs)


def write_plots(result: RunResult, out_dir: Path) -> list[str]:
    _plot_confusion(result, out_dir / PLOT_FILES["confusion"])
    _plot_pr_curve(result, out_dir / PLOT_FILES["pr_curve"])
    _plot_loss(result, out_dir / PLOT_FILES["loss"])
    return list(PLOT_FILES.values())


def _plot_confusion(result: RunResult, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, split in zip(axes, SPLITS, strict=True):
        matrix = np.array(result.metrics[split]["confusion_matrix"]["rows_true_cols_predicted"])
        shade = np.log1p(matrix)  # log scale: the normal class would wash out the frauds
        ax.imshow(shade, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            dark = shade[i, j] > shade.max() / 2
            ax.text(j, i, f"{count:,}", ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks([0, 1], ["normal", "fraud"])
        ax.set_yticks([0, 1], ["normal", "fraud"])
        ax.set_xlabel("predicted")
        ax.set_title(split)
    axes[0].set_ylabel("true")
    fig.suptitle(f"Confusion matrices at threshold {result.threshold:.4g} (calibrated scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_pr_curve(result: RunResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for split in ("val", "test"):
        precision, recall, _ = precision_recall_curve(result.labels[split], result.probabilities[split])
        ax.plot(recall, precision, label=f"{split} (AUPRC {result.metrics[split]['auprc']:.3f})")
    point = result.metrics["test"]
    ax.scatter([point["recall"]], [point["precision"]], color="black", zorder=3, label="test at threshold")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall (enriched sample, not the real prior)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_loss(result: RunResult, path: Path) -> None:
    mlp = result.pipeline.named_steps["mlp"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.arange(1, len(mlp.loss_curve_) + 1), mlp.loss_curve_, label="training log-loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("log-loss (binary cross-entropy + L2)")
    scores = getattr(mlp, "validation_scores_", None)
    if scores:
        twin = ax.twinx()
        twin.plot(np.arange(1, len(scores) + 1), scores, color="tab:orange", label="early-stopping hold-out accuracy")
        twin.set_ylabel("hold-out accuracy")
        twin.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("MLP training loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def metrics_table(result: RunResult) -> list[str]:
    lines = [
        "| split | rows | frauds | precision | recall | F1 | AUPRC | ROC-AUC | TN | FP | FN | TP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split in SPLITS:
        m = result.metrics[split]
        (tn, fp), (fn, tp) = m["confusion_matrix"]["rows_true_cols_predicted"]
        lines.append(
            f"| {split} | {m['rows']:,} | {m['frauds']:,} | {_num(m['precision'])} | {_num(m['recall'])} | "
            f"{_num(m['f1'])} | {_num(m['auprc'])} | {_num(m['roc_auc'])} | {tn:,} | {fp:,} | {fn:,} | {tp:,} |"
        )
    return lines


def comparison_table(variants: list[Variant], seed: int) -> list[str]:
    """Test metrics of each variant at `seed`, then mean ± sd over every seed run; leaky rows say LEAKY."""
    seeds = len(variants[0].runs)
    lines = [
        f"| setup | test precision | test recall | test F1 | test AUPRC | test ROC-AUC | val AUPRC "
        f"| F1 over {seeds} seed(s) | AUPRC over {seeds} seed(s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        first = variant.runs[0]
        tag = " **LEAKY**" if variant.leaky else ""
        test, val = first.metrics["test"], first.metrics["val"]
        f1s = [run.metrics["test"]["f1"] for run in variant.runs]
        aps = [run.metrics["test"]["auprc"] for run in variant.runs]
        cells = [
            _num(test["precision"]),
            _num(test["recall"]),
            _num(test["f1"]),
            _num(test["auprc"]),
            _num(test["roc_auc"]),
            _num(val["auprc"]),
            _mean_sd(f1s),
            _mean_sd(aps),
        ]
        if variant.leaky:
            cells = [f"{cell} LEAKY" for cell in cells]
        lines.append(f"| {variant.label}{tag} | " + " | ".join(cells) + " |")
    return lines


def leaky_console_table(clean: RunResult, leaky: RunResult) -> list[str]:
    """The side-by-side table `--protocol paper` prints: every leaky number carries the word LEAKY."""
    clean_header = f"clean ({clean.config.resample}, training rows only)"
    leaky_header = f"paper protocol ({leaky.config.resample} before the split)"
    lines = [f"{'test metric':<12} {clean_header:>36}   {leaky_header:>40}"]
    for name in ("precision", "recall", "f1", "auprc", "roc_auc"):
        lines.append(
            f"{name:<12} {_num(clean.metrics['test'][name]):>36}   {_num(leaky.metrics['test'][name]) + ' LEAKY':>40}"
        )
    rows_clean, rows_leaky = clean.metrics["test"], leaky.metrics["test"]
    lines.append(
        f"{'test rows':<12} {rows_clean['rows']:>27,} ({rows_clean['frauds']:,} fr)   "
        f"{rows_leaky['rows']:>25,} ({rows_leaky['frauds']:,} fr, synthetic incl.) LEAKY"
    )
    return lines


def write_model_card(
    path: Path,
    *,
    manifest: dict[str, Any],
    result: RunResult,
    comparison: list[Variant],
    ablation: list[Variant],
    command: str,
) -> None:
    training = manifest["training"]
    config = result.config
    calibration = manifest["calibration"]
    rows, frauds = training["rows"], training["frauds"]
    test = result.metrics["test"]
    sampler = {"none": "no sampler", "adasyn": "ADASYN", "smote": "SMOTE"}[config.resample]
    features = manifest["features"]
    time_used = "Time" in features
    split = training["split"]
    mlp = result.pipeline.named_steps["mlp"]

    out: list[str] = [
        "# Fraud scorer model card",
        "",
        f"Model version `{manifest['model_version']}`, written {manifest['created_at']} by:",
        "",
        "```",
        command,
        "```",
        "",
        "## What it saw",
        "",
        f"- Data: `{training['data_file']}` (sha256 `{training['data_sha256']}`): **{rows:,} rows, {frauds:,} frauds "
        f"({frauds / rows:.2%})**, {training['duplicate_rows']:,} rows exact duplicates of another.",
    ]
    if training["positive_rate"] > 0.01:
        out.append(
            "- This is an **enriched sample**, not the real class mix: Kaggle's full `creditcard.csv` (mlg-ulb) "
            "has 492 frauds in 284,807 rows (0.1727%). Its normal rows come mostly from the data set's first hour "
            "while its frauds span both days. **Real use retrains on the full data set** "
            "(`python -m training.fraud --data creditcard.csv`); the numbers below are from the sample."
        )
    out += [
        f"- Split (stratified, seed {config.seed}): 20% test, then 25% of the rest validation: "
        f"train {split['train_rows']:,} rows ({split['train_frauds']:,} frauds), "
        f"validation {split['val_rows']:,} ({split['val_frauds']:,}), test {split['test_rows']:,} ({split['test_frauds']:,}).",
        f"- Features ({len(features)}): {', '.join(features) if len(features) < 6 else features[0] + ' .. ' + features[-1]}"
        f" — Time {'included' if time_used else 'excluded'} (see the ablation below). "
        "The API still takes all 30 fields.",
        "",
        "## Model",
        "",
        f"- Training pipeline (imbalanced-learn): StandardScaler -> {sampler} -> "
        f"MLPClassifier(hidden {list(config.hidden_sizes)}, Adam, learning rate {config.learning_rate:g}, "
        f"log-loss = binary cross-entropy, L2 alpha {config.alpha:g}, "
        f"{'early stopping on a 10% hold-out of the training rows' if config.early_stopping else 'no early stopping'}, "
        f"{mlp.n_iter_} epochs).",
        f"- Served artifact `{manifest['artifact']['file']}` ({manifest['artifact']['bytes']:,} bytes, sha256 "
        f"`{manifest['artifact']['sha256'][:16]}...`): the same fitted scaler and MLP"
        + (", without the sampler (identity at predict time; its neighbour index holds training frauds)." if config.resample != "none" else "."),
        "",
        "## Calibration and threshold",
        "",
        f"- The MLP was fitted at a positive rate of pi_t = {calibration['train_prior']:.4f} "
        f"({'after ' + sampler if config.resample != 'none' else 'the training split'}). Served probabilities are moved "
        f"to the real prior pi = {calibration['target_prior']} by the prior-shift correction of Dal Pozzolo et al. 2015: "
        "p' = p·r / (p·r + 1 − p), r = [pi/(1−pi)] / [pi_t/(1−pi_t)]. The server applies exactly the pi_t and pi in "
        "`manifest.json`; it never re-derives them.",
        f"- Threshold **{manifest['threshold']:.6g}** on that calibrated scale (`is_fraud = p >= threshold`), "
        f"chosen on validation by {_rule_text(manifest['threshold_rule'])}.",
        "",
        "## Metrics of this model",
        "",
        "Precision, recall, F1 and the confusion matrix are at the threshold; AUPRC and ROC-AUC do not depend on it. "
        "Train rows are the original training split, never resampled ones.",
        "",
        *metrics_table(result),
        "",
        _real_prior_note(test, frauds / rows, calibration["target_prior"]),
        "",
    ]
    if comparison:
        seeds = len(comparison[0].runs)
        out += [
            "## Resampling, done right and done leakily",
            "",
            f"Same features, MLP and threshold rule (each setup picks its threshold on its own validation split); seed "
            f"{config.seed} in the first columns, the mean ± sd over {seeds} seed(s) in the last two (each seed a different split). "
            "ADASYN runs inside the pipeline, so only training rows are oversampled. The paper protocol standardises and "
            "oversamples the whole data set before splitting, so its validation and test sets hold synthetic frauds "
            "interpolated from training frauds and a near-balanced class mix: **its numbers are LEAKY** and say nothing "
            "about real performance.",
            "",
            *comparison_table(comparison, config.seed),
            "",
        ]
    if ablation:
        out += [
            "## Does the model lean on Time?",
            "",
            f"Same protocol ({sampler}) and seeds as above, with and without the Time field:",
            "",
            *comparison_table(ablation, config.seed),
            "",
            _time_decision(ablation, time_used, training["time_confound"]),
            "",
        ]
    out += [
        "## Plots",
        "",
        f"![confusion matrices]({PLOT_FILES['confusion']})",
        f"![precision-recall]({PLOT_FILES['pr_curve']})",
        f"![loss curve]({PLOT_FILES['loss']})",
        "",
        "## Limitations",
        "",
        "- Trained and measured on the rows named above only; V1..V28 are the data set's PCA components, so the model "
        "only makes sense for transactions transformed the same way.",
        "- The validation and test sets hold a few dozen frauds: single-split metrics move by several points from seed "
        "to seed (see the mean ± sd columns).",
        "- Exact duplicate rows are kept, as in the report's protocol; a duplicate split across train and test "
        "flatters the test numbers slightly.",
        "",
    ]
    path.write_text("\n".join(out), encoding="utf-8")


def _real_prior_note(test: dict[str, Any], sample_rate: float, target_prior: float) -> str:
    """Precision depends on the class mix; project the test split's recall and false-positive rate to the real prior."""
    normals = test["rows"] - test["frauds"]
    (_, fp), _ = test["confusion_matrix"]["rows_true_cols_predicted"]
    note = f"These are measured on the enriched sample ({sample_rate:.2%} frauds). "
    if fp == 0:
        one_fp = test["recall"] * target_prior / (test["recall"] * target_prior + (1 / normals) * (1 - target_prior))
        return note + (
            f"The test split has no false positive among its {normals:,} normal rows, so it cannot say what precision "
            f"the real prior ({target_prior}) would give; one false positive there would project to a precision of "
            f"about {one_fp:.3f} at recall {test['recall']:.3f}."
        )
    return note + (
        f"At the real prior ({target_prior}) the same recall ({test['recall']:.3f}) and false-positive rate "
        f"({test['false_positive_rate']:.4f}, {fp} of {normals:,} normal rows) would give a precision of about "
        f"{test['precision_at_target_prior']:.3f} (a projection, not a measurement)."
    )


def _rule_text(rule: dict[str, Any]) -> str:
    if rule["rule"] == "best_f1":
        return "best F1"
    return f"best {'precision' if rule['rule'] == 'target_recall' else 'recall'} at {rule['rule'].removeprefix('target_')} >= {rule['target']}"


def _time_decision(ablation: list[Variant], time_used: bool, confound: dict[str, float]) -> str:
    by_key = {variant.key: variant for variant in ablation}
    parts = [
        f"With no model at all, ranking every row by its raw Time gives ROC-AUC {confound['roc_auc_of_raw_time']:.3f}: "
        f"{confound['normal_rows_in_first_hour']:.0%} of the normal rows but {confound['fraud_rows_in_first_hour']:.1%} "
        "of the frauds fall in the data set's first hour, because of how the sample was assembled, not because of fraud."
    ]
    with_time, without_time = by_key["with_time"].runs, by_key["without_time"].runs
    with_ap = np.mean([r.metrics["test"]["auprc"] for r in with_time])
    without_ap = np.mean([r.metrics["test"]["auprc"] for r in without_time])
    shuffled_ap = np.mean([r.metrics["test"]["auprc_with_time_shuffled"] for r in with_time])
    parts.append(
        f"With Time the mean test AUPRC is {with_ap:.3f}, without it {without_ap:.3f}. How much the with-Time model "
        f"leans on Time: shuffling Time across its test rows moves its mean test AUPRC to {shuffled_ap:.3f} "
        f"({shuffled_ap - with_ap:+.3f})."
    )
    if time_used:
        parts.append("**Decision: this model uses Time** (trained with `--include-time`); read its metrics with that in mind.")
    else:
        parts.append(
            "**Decision: Time is left out of the served model.** Whatever it adds here is the sampling artefact above, and "
            "on the full data set Time is seconds since the start of a two-day capture, which does not carry over to "
            "new transactions."
        )
    return " ".join(parts)
