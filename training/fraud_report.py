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

from training.fraud_calibration import CalibrationReport  # noqa: E402
from training.fraud_compare import SHIPPED, Comparison  # noqa: E402
from training.fraud_compare import comparison_table as cross_validation_table  # noqa: E402
from training.fraud_model import RunResult  # noqa: E402

logger = logging.getLogger(__name__)

PLOT_FILES = {
    "confusion": "confusion_matrices.png",
    "pr_curve": "precision_recall.png",
    "loss": "loss_curve.png",
    "reliability": "reliability.png",
    "comparison": "comparison.png",
}
SPLITS = ("train", "val", "test")
DPI = 110
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10})


@dataclass(frozen=True)
class Variant:
    """One row of a comparison table: a label, and the runs (one per seed) that measured it."""

    key: str
    label: str
    runs: list[RunResult]

    @property
    def leaky(self) -> bool:
        return any(run.leaky for run in self.runs)


def write_plots(result: RunResult, calibration: CalibrationReport, out_dir: Path) -> list[str]:
    _plot_confusion(result, out_dir / PLOT_FILES["confusion"])
    _plot_pr_curve(result, out_dir / PLOT_FILES["pr_curve"])
    _plot_loss(result, out_dir / PLOT_FILES["loss"])
    _plot_reliability(calibration, out_dir / PLOT_FILES["reliability"])
    return [PLOT_FILES[key] for key in ("confusion", "pr_curve", "loss", "reliability")]


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _plot_confusion(result: RunResult, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, split in zip(axes, SPLITS, strict=True):
        matrix = np.array(result.metrics[split]["confusion_matrix"]["rows_true_cols_predicted"])
        shade = np.log1p(matrix)  # log scale: the normal class would wash out the frauds
        ax.imshow(shade, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            dark = shade[i, j] > shade.max() / 2
            ax.text(j, i, f"{count:,}", ha="center", va="center", fontsize=14, color="white" if dark else "black")
        ax.set_xticks([0, 1], ["normal", "fraud"])
        ax.set_yticks([0, 1], ["normal", "fraud"])
        ax.set_xlabel("predicted")
        ax.set_title(f"{split} ({result.metrics[split]['rows']:,} rows)")
    axes[0].set_ylabel("true")
    fig.suptitle(f"Confusion matrices at threshold {result.threshold:.4g} (calibrated scale)")
    fig.tight_layout()
    _save(fig, path)


def _plot_pr_curve(result: RunResult, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for split in ("val", "test"):
        precision, recall, _ = precision_recall_curve(result.labels[split], result.probabilities[split])
        ax.plot(recall, precision, linewidth=2, label=f"{split} (AUPRC {result.metrics[split]['auprc']:.3f})")
    point = result.metrics["test"]
    ax.scatter([point["recall"]], [point["precision"]], s=60, color="black", zorder=3, label="test at the threshold")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Precision-recall on the sample's class mix (not the real prior)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    _save(fig, path)


def _plot_loss(result: RunResult, path: Path) -> None:
    ensemble = result.pipeline.named_steps["mlp"]
    fig, (loss_ax, auprc_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for number, (history, kept) in enumerate(zip(ensemble.history_, ensemble.best_epochs_, strict=True)):
        color = f"C{number % 10}"
        epochs = np.arange(1, len(history["loss"]) + 1)
        loss_ax.plot(epochs, history["loss"], color=color, label=f"member {number + 1} (kept epoch {kept})")
        if history["holdout_auprc"]:
            auprc_ax.plot(epochs, history["holdout_auprc"], color=color, label=f"member {number + 1}")
            auprc_ax.scatter([kept], [history["holdout_auprc"][kept - 1]], color=color, s=40, zorder=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training log-loss (cross-entropy + L2)")
    loss_ax.set_title("Training loss per ensemble member")
    loss_ax.grid(alpha=0.3)
    auprc_ax.set_xlabel("epoch")
    auprc_ax.set_ylabel("hold-out AUPRC")
    auprc_ax.set_title("Early stopping: hold-out AUPRC (dot = epoch kept)")
    auprc_ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), frameon=False)
    _save(fig, path)


def _plot_reliability(calibration: CalibrationReport, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 6))
    low = 1e-6
    ax.plot([low, 1], [low, 1], color="grey", linestyle="--", label="perfect calibration")
    for number, measured in enumerate(calibration.sets):
        bins = measured.bins
        predicted = np.maximum(bins.mean_predicted, low)
        observed = np.array(bins.observed)
        sizes = 30 + 400 * np.array(bins.weight_share)
        seen = observed > 0  # a bin without a fraud has no place on a log axis: a triangle on the floor instead
        ax.plot(predicted[seen], observed[seen], color=f"C{number}", marker="o", linewidth=1.5,
                label=f"{measured.name}: Brier {measured.brier:.2e} ({measured.rows:,} rows, {measured.frauds:,} frauds)")
        ax.scatter(predicted[seen], observed[seen], s=sizes[seen], color=f"C{number}", alpha=0.35)
        if (~seen).any():
            ax.scatter(predicted[~seen], np.full((~seen).sum(), low * 1.15), marker="v", s=70, color=f"C{number}",
                       label=f"{measured.name}: bin with no fraud")
    ax.axhline(calibration.target_prior, color="black", linewidth=0.8, linestyle=":",
               label=f"real fraud rate {calibration.target_prior:.4%}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, 1.2)
    ax.set_ylim(low, 1.2)
    ax.set_xlabel("served fraud_probability (bin mean)")
    ax.set_ylabel("observed fraud rate, rows weighted to the real prior")
    ax.set_title("Reliability at the real prior (marker area = share of weighted rows)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.13), borderaxespad=0)
    fig.tight_layout()
    _save(fig, path)


def write_comparison_plot(runs: list[Comparison], out_dir: Path) -> str:
    """Per protocol: each model's AUPRC over the folds, and the shipped model's per-fold paired difference."""
    fig, axes = plt.subplots(len(runs), 2, figsize=(15, 0.55 * len(runs[0].scores) * len(runs) + 2.5), squeeze=False)
    for (score_ax, diff_ax), run in zip(axes, runs, strict=True):
        order = sorted(run.scores, key=lambda key: np.mean(run.scores[key]["auprc"]))
        score_ax.boxplot([run.scores[key]["auprc"] for key in order], vert=False, widths=0.6)
        score_ax.set_yticks(range(1, len(order) + 1), [_short(run, key) for key in order])
        score_ax.set_xlabel("AUPRC per fold")
        score_ax.set_title(f"{run.protocol}: AUPRC over {len(run.fold_sizes)} folds")
        score_ax.grid(alpha=0.3, axis="x")
        peers = [key for key in order if key != SHIPPED]
        diffs = [np.array(run.scores[SHIPPED]["auprc"]) - np.array(run.scores[key]["auprc"]) for key in peers]
        diff_ax.boxplot(diffs, vert=False, widths=0.6)
        diff_ax.axvline(0, color="black", linewidth=0.8)
        diff_ax.set_yticks(range(1, len(peers) + 1), [_short(run, key) for key in peers])
        diff_ax.set_xlabel("shipped − model, AUPRC on the same fold (right of 0: shipped better)")
        diff_ax.set_title(f"{run.protocol}: paired differences")
        diff_ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, out_dir / PLOT_FILES["comparison"])
    return PLOT_FILES["comparison"]


def _short(run: Comparison, key: str) -> str:
    return "shipped" if key == SHIPPED else key


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
    cross_validated: list[Comparison],
    calibration_report: CalibrationReport,
    command: str,
) -> None:
    training = manifest["training"]
    config = result.config
    calibration = manifest["calibration"]
    rows, frauds = training["rows"], training["frauds"]
    test = result.metrics["test"]
    sampler = {"none": "no sampler", "adasyn": "ADASYN", "smote": "SMOTE"}[config.resample]
    balance = {"none": "no reweighting", "class_weight": "class weights", "balanced_batches": "balanced batches"}[config.balance]
    features = manifest["features"]
    time_used = "Time" in features
    split = training["split"]
    ensemble = result.pipeline.named_steps["mlp"]
    split_text = (
        f"Split (stratified, seed {config.seed}): 20% test, then 25% of the rest validation"
        if config.split == "stratified"
        else "Split (time-ordered by Time): the earliest 60% of rows train, the next 20% validate, the latest 20% test"
    )

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
            "(`python -m training.fraud --data creditcard.csv --output runs/fraud-full`, see docs/fraud.md); the "
            "numbers below are from the sample."
        )
    out += [
        f"- {split_text}: "
        f"train {split['train_rows']:,} rows ({split['train_frauds']:,} frauds), "
        f"validation {split['val_rows']:,} ({split['val_frauds']:,}), test {split['test_rows']:,} ({split['test_frauds']:,}).",
        f"- Features ({len(features)}): {', '.join(features) if len(features) < 6 else features[0] + ' .. ' + features[-1]}"
        f" — Time {'included' if time_used else 'excluded'} (see the ablation below). "
        "The API still takes all 30 fields.",
        "",
        "## Model",
        "",
        f"- StandardScaler -> an ensemble of **{config.members} MLPs** (scikit-learn `MLPClassifier`, hidden "
        f"{list(config.hidden_sizes)}, ReLU, Adam, learning rate {config.learning_rate:g}, log-loss = binary cross-entropy, "
        f"L2 alpha {config.alpha:g}, batches of 200, {sampler}, {balance}), seeds {config.seed}..{config.seed + config.members - 1}; "
        "served probabilities are the mean of the members'.",
        (
            f"- Each member trains epoch by epoch on 85% of the training rows and is kept at the epoch with the best "
            f"AUPRC on its own stratified 15% hold-out (patience {config.patience} epochs, at most {config.max_iter}); "
            f"epochs kept: {', '.join(map(str, ensemble.best_epochs_))}."
            if config.early_stopping
            else f"- No early stopping: every member trains {config.max_iter} epochs."
        ),
        f"- Served artifact `{manifest['artifact']['file']}` ({manifest['artifact']['bytes']:,} bytes, sha256 "
        f"`{manifest['artifact']['sha256'][:16]}...`): the fitted scaler and the members as a soft `VotingClassifier`, "
        "saved with skops (see *Safe loading*).",
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
        *calibration_lines(calibration_report),
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
    for run in cross_validated:
        out += comparison_section(run)
    if cross_validated:
        out += [f"![comparison]({PLOT_FILES['comparison']})", ""]
    if comparison:
        seeds = len(comparison[0].runs)
        out += [
            "## Resampling, done right and done leakily",
            "",
            f"Same features, MLP and threshold rule (each setup picks its threshold on its own validation split); seed "
            f"{config.seed} in the first columns, the mean ± sd over {seeds} seed(s) in the last two (each seed a different split). "
            "ADASYN runs inside each MLP's fit, so only its training rows are oversampled. The paper protocol standardises and "
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
        *SAFE_LOADING,
        "",
        "## Limitations",
        "",
        "- Trained and measured on the rows named above only; V1..V28 are the data set's PCA components, so the model "
        "only makes sense for transactions transformed the same way.",
        "- The validation and test sets hold a few dozen frauds: single-split metrics move by several points from seed "
        "to seed (see the mean ± sd columns).",
        "- Exact duplicate rows are kept, as in the report's protocol; a duplicate split across train and test "
        "flatters the test numbers slightly.",
        "- The cross-validated comparison reuses the same few hundred frauds in every fold: its sds describe "
        "resampling noise on this sample, not how the models would rank on the full data set.",
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


SAFE_LOADING = [
    "## Safe loading",
    "",
    "The server reads `manifest.json`, checks the artifact's byte count and sha256 against it, and only then opens "
    "the artifact with `skops.io.load`, trusting no type beyond skops' defaults (scikit-learn estimators, NumPy "
    "arrays). skops reads a zip of JSON and arrays and rebuilds only allow-listed types, so unlike a pickle (what "
    "joblib writes) it cannot run code while loading, even when an attacker rewrites manifest and artifact together. "
    "The cost: one small dependency and a type allow-list that a new kind of model must pass. The served MLPs drop "
    "their Adam optimiser state, which only further training needs and which skops does not trust by default.",
]


def calibration_lines(calibration: CalibrationReport) -> list[str]:
    """The Brier scores at the real prior, each set's rows importance-weighted to it."""
    pi = calibration.target_prior
    lines = [
        f"Calibration at the real prior: every measured set's rows are importance-weighted so that frauds make up "
        f"{pi:.4%} of the weight (frauds × pi/pi_s, normals × (1−pi)/(1−pi_s)), then the Brier score is the weighted "
        f"mean of (p − y)². Always answering {pi} scores {pi * (1 - pi):.3e}.",
        "",
        "| rows scored | rows | frauds | Brier, served probabilities | Brier skill vs the base rate | Brier, uncorrected MLP output |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for measured in calibration.sets:
        lines.append(
            f"| {measured.name} | {measured.rows:,} | {measured.frauds:,} | {measured.brier:.3e} | {measured.skill:.3f} | "
            f"{measured.brier_uncorrected:.3e} |"
        )
    lines += ["", f"![reliability]({PLOT_FILES['reliability']})"]
    return lines


def comparison_section(run: Comparison) -> list[str]:
    title = {"stratified": "Cross-validated comparison", "time": "Time-ordered comparison (second protocol)"}[run.protocol]
    return [
        f"## {title}",
        "",
        f"{run.description}. Every model sees the same folds and the served features; fold k seeds every model "
        "with the same seed. Mean ± sd over the folds; *shipped − this* is the per-fold paired difference in AUPRC; "
        "the p-value is the Nadeau–Bengio corrected resampled t-test (folds share training rows, so a plain t-test "
        "would overstate certainty). Recall at precision 0.9 is the best recall whose precision reaches 0.9 on the "
        "fold's test rows (the sample's class mix, not the real prior).",
        "",
        *cross_validation_table(run),
        "",
        *verdict(run),
    ]


def verdict(run: Comparison) -> list[str]:
    """The issue's bar, read off the table: at least as good as logistic regression, within noise of the best tree."""
    lines = []
    trees = [key for key in ("hgb", "rf") if key in run.scores]
    best_tree = max(trees, key=lambda key: np.mean(run.scores[key]["auprc"])) if trees else None
    for key, name in (("logreg", "logistic regression"), (best_tree, f"the best tree model (`{best_tree}`)")):
        if key is None or key not in run.scores:
            continue
        d = run.paired(key, "auprc")
        if d["mean"] >= 0:
            word = "at least as good as"
        elif d["p"] >= 0.05:
            word = "below, but within noise of,"
        else:
            word = "worse than"
        lines.append(
            f"- Shipped vs {name}: AUPRC {d['mean']:+.3f} ± {d['sd']:.3f} per fold, shipped ahead on {d['won']} of "
            f"{d['folds']} folds, corrected p = {d['p']:.2f}: **{word}** it on this protocol."
        )
    return [*lines, ""] if lines else []
