"""CLI: trains the fraud MLP on a credit-card CSV and writes the served model directory (models/fraud)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import zipfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import imblearn
import numpy as np
import sklearn
import skops
import skops.io

from app.artifacts import sha256_hex
from app.inference.fraud_scorer import (
    INPUT_FIELDS,
    MANIFEST_FILE,
    PRIOR_SHIFT_METHOD,
    ArtifactInfo,
    CalibrationInfo,
    FraudManifest,
)
from training import fraud_compare
from training.fraud_calibration import calibration_report
from training.fraud_data import FraudDataError, Transactions, load_transactions
from training.fraud_model import (
    BALANCES,
    REAL_FRAUD_PRIOR,
    RESAMPLERS,
    SPLITS,
    FraudTrainingError,
    RunResult,
    TrainConfig,
    run_clean,
    run_leaky,
    serving_pipeline,
    split_rows,
    time_confound,
)
from training.fraud_report import Variant, leaky_console_table, write_comparison_plot, write_model_card, write_plots

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACT_FILE = "pipeline.skops"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
# Below this many frauds a stratified three-way split leaves too few per part for ADASYN's 5 neighbours.
MIN_FRAUDS = 20


def _say(message: str) -> None:
    print(f"[fraud] {message}", flush=True)


def _fraction(one_allowed: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (0.0 < value < 1.0 or (one_allowed and value == 1.0)):
            raise argparse.ArgumentTypeError(f"must lie in (0, 1{']' if one_allowed else ')'}, got {value}")
        return value

    return parse


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes such as 64,32, got {text!r}") from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.fraud",
        description=(
            "Train the credit-card fraud MLP and write the model directory the server loads: the fitted pipeline "
            "(skops), manifest.json, metrics.json, PNG plots and a model card (README.md) with the resampling "
            "comparison and the Time ablation; --compare adds the cross-validated comparison with classical peers."
        ),
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="PATH",
        help="Kaggle's creditcard.csv as it comes, or a CSV / gzip'd CSV with the columns Time, V1..V28, Amount, "
        "Class (extra columns are ignored).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "models" / "fraud",
        metavar="DIR",
        help="Model directory to write (default: the repository's models/fraud, which the server loads). "
        "An existing, non-empty directory is refused unless --force is given.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Replace the files of an existing model directory (such as the served models/fraud).",
    )
    parser.add_argument(
        "--resample",
        choices=RESAMPLERS,
        default=defaults.resample,
        help="Oversampler run on each MLP's training rows only, never on its hold-out, validation or test rows "
        "(default: %(default)s; the model card's comparison shows why).",
    )
    parser.add_argument(
        "--balance",
        choices=BALANCES,
        default=defaults.balance,
        help="class_weight: weigh frauds and normals equally in the loss; balanced_batches: each epoch draws the "
        "frauds up to the normals' count (default: %(default)s).",
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default=defaults.split,
        help="stratified: random stratified 60/20/20 split; time: the earliest 60%% of rows (by Time) train, the "
        "next 20%% validate, the latest 20%% test (default: %(default)s).",
    )
    parser.add_argument(
        "--protocol",
        choices=("clean", "paper"),
        default="clean",
        help="clean: split first, resample training rows only, write the model. paper: also run the original "
        "report's leaky protocol (whole data set oversampled before the split, so the test set is too) and print "
        "both side by side, every leaky number labelled LEAKY; writes nothing (default: %(default)s).",
    )
    parser.add_argument(
        "--include-time",
        action="store_true",
        help="Feed Time to the model. Off by default: in the sample Time encodes how rows were collected "
        "(see the ablation in the model card).",
    )
    parser.add_argument(
        "--hidden-sizes",
        type=_hidden_sizes,
        default=defaults.hidden_sizes,
        metavar="SIZES",
        help=f"MLP hidden layer sizes, comma-separated (default: {','.join(map(str, defaults.hidden_sizes))}).",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=defaults.learning_rate, help="Adam's initial learning rate (default: %(default)s)."
    )
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="L2 penalty of the MLP (default: %(default)s).")
    parser.add_argument(
        "--members",
        type=_positive_int,
        default=defaults.members,
        help="MLPs in the ensemble, seeds --seed, --seed+1, ...; their probabilities are averaged (default: %(default)s).",
    )
    parser.add_argument("--max-iter", type=_positive_int, default=defaults.max_iter, help="Most training epochs (default: %(default)s).")
    parser.add_argument(
        "--patience",
        type=_positive_int,
        default=defaults.patience,
        help="Epochs without a better hold-out AUPRC before an MLP stops (default: %(default)s).",
    )
    parser.add_argument(
        "--no-early-stopping",
        dest="early_stopping",
        action="store_false",
        help="Train for --max-iter epochs instead of keeping each MLP at its best AUPRC on a stratified 15%% "
        "hold-out of its training rows.",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed of the split, the sampler and the MLP (default: %(default)s).")
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--target-recall",
        type=_fraction(one_allowed=True),
        metavar="R",
        help="Choose the threshold with the best validation precision among those reaching recall R "
        "(default: the threshold with the best validation F1).",
    )
    target.add_argument(
        "--target-precision",
        type=_fraction(one_allowed=True),
        metavar="P",
        help="Choose the threshold with the best validation recall among those reaching precision P.",
    )
    parser.add_argument(
        "--prior",
        type=_fraction(one_allowed=False),
        default=defaults.target_prior,
        help="Real fraud rate the served probabilities are corrected to (default: %(default)s, Kaggle's full data "
        "set: 492 in 284,807).",
    )
    parser.add_argument(
        "--comparison-seeds",
        type=_non_negative_int,
        default=5,
        metavar="N",
        help="Seeds (from --seed on) for the model card's comparison (no resampling / ADASYN / leaky paper protocol) "
        "and Time ablation; 0 skips both (default: %(default)s).",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="Also compare the model with MLP variants, logistic regression, gradient boosting and a random forest: "
        "repeated stratified k-fold on the training and validation rows, and time-ordered forward folds; tables "
        "and a plot go into the model card.",
    )
    parser.add_argument("--cv-folds", type=_positive_int, default=5, help="k of the repeated k-fold (default: %(default)s).")
    parser.add_argument("--cv-repeats", type=_positive_int, default=5, help="Repeats of the k-fold (default: %(default)s).")
    parser.add_argument(
        "--compare-models",
        type=lambda text: [part for part in text.split(",") if part],
        default=None,
        metavar="KEYS",
        help="Comma-separated subset of the comparison's models (default: all of "
        + ", ".join(fraud_compare.candidates(TrainConfig()))
        + "); the shipped configuration is always included.",
    )
    parser.add_argument(
        "--jobs", type=_positive_int, default=2, help="Processes for the comparison's folds (default: %(default)s)."
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.target_recall is not None:
        rule, target = "target_recall", args.target_recall
    elif args.target_precision is not None:
        rule, target = "target_precision", args.target_precision
    else:
        rule, target = "best_f1", None
    features = INPUT_FIELDS if args.include_time else tuple(name for name in INPUT_FIELDS if name != "Time")
    return TrainConfig(
        features=features,
        resample=args.resample,
        balance=args.balance,
        hidden_sizes=args.hidden_sizes,
        learning_rate=args.learning_rate,
        alpha=args.alpha,
        members=args.members,
        max_iter=args.max_iter,
        early_stopping=args.early_stopping,
        patience=args.patience,
        seed=args.seed,
        split=args.split,
        threshold_rule=rule,
        threshold_target=target,
        target_prior=args.prior,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    unknown = [key for key in args.compare_models or [] if key not in fraud_compare.candidates(config)]
    if unknown:
        build_parser().error(f"--compare-models: unknown {', '.join(unknown)}")
    try:
        data = _load(args.data)
        if args.protocol == "paper":
            _run_paper(data, config)
        else:
            _refuse_to_overwrite(Path(args.output), args.force)
            _run_clean_and_write(data, config, args, command=portable_command(argv))
    except (FraudDataError, FraudTrainingError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot write {args.output}: {exc.strerror or exc}") from None
    return 0


def portable_command(argv: list[str]) -> str:
    """The command line as a card records it: no machine's paths. Relative paths stay; an absolute --data keeps
    only its file name (the card gives its sha256), an absolute --output its path relative to the repository, or
    its name when outside it."""
    shown: list[str] = []
    path_option = None
    for arg in argv:
        if path_option is not None:
            shown.append(_portable_path(path_option, arg))
            path_option = None
        elif arg in ("--data", "--output"):
            shown.append(arg)
            path_option = arg
        elif arg.startswith(("--data=", "--output=")):
            option, value = arg.split("=", 1)
            shown.append(f"{option}={_portable_path(option, value)}")
        else:
            shown.append(arg)
    return "python -m training.fraud " + shlex.join(shown)


def _portable_path(option: str, value: str) -> str:
    path = Path(value)
    if not path.is_absolute() and ".." not in path.parts:
        return value  # relative to wherever the command ran: no machine's layout in it
    if option == "--output":
        try:
            return str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            return path.name
    return path.name


def _refuse_to_overwrite(out: Path, force: bool) -> None:
    """Checked before any training: a run must not silently replace a model directory (the served one above all)."""
    if out.exists() and not out.is_dir():
        raise FraudTrainingError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FraudTrainingError(
            f"{out} already holds a model; pass --force to replace it, or --output a new directory"
        )


def _load(path: Path) -> Transactions:
    started = time.perf_counter()
    data = load_transactions(path)
    rows, frauds = len(data.y), data.frauds
    _say(f"read {rows:,} rows, {frauds:,} frauds ({frauds / rows:.2%}) from {path} in {time.perf_counter() - started:.1f}s")
    if frauds < MIN_FRAUDS or rows - frauds < MIN_FRAUDS:
        raise FraudTrainingError(f"{path}: need at least {MIN_FRAUDS} frauds and {MIN_FRAUDS} normal rows, got {frauds} and {rows - frauds}")
    return data


def _describe(result: RunResult) -> str:
    test = result.metrics["test"]
    tag = " LEAKY" if result.leaky else ""
    return (
        f"test precision {test['precision']:.3f}{tag}, recall {test['recall']:.3f}{tag}, F1 {test['f1']:.3f}{tag}, "
        f"AUPRC {test['auprc']:.3f}{tag}"
    )


def _fit(label: str, runner, data: Transactions, config: TrainConfig) -> RunResult:
    started = time.perf_counter()
    result = runner(data.X, data.y, config)
    _say(f"{label}, seed {config.seed}: {_describe(result)} ({time.perf_counter() - started:.1f}s)")
    return result


def _run_paper(data: Transactions, config: TrainConfig) -> None:
    clean = _fit(f"clean protocol ({config.resample}, training split only)", run_clean, data, config)
    leaky = _fit("paper protocol (oversampled before the split)", run_leaky, data, config)
    _say("test metrics, side by side; the paper protocol's test set holds synthetic frauds, so its numbers are LEAKY:")
    for line in leaky_console_table(clean, leaky):
        print(line, flush=True)
    _say("nothing written: the paper protocol is for comparison only")


def _variants(data: Transactions, config: TrainConfig, shipped: RunResult, seeds: int) -> tuple[list[Variant], list[Variant]]:
    """The model card's two tables; each distinct (protocol, resample, features, seed) is fitted once."""
    no_time = tuple(name for name in INPUT_FIELDS if name != "Time")
    specs = {
        "none": ("No resampling", "clean", replace(config, resample="none")),
        "adasyn": ("ADASYN, training split only", "clean", replace(config, resample="adasyn")),
        "smote": ("SMOTE, training split only", "clean", replace(config, resample="smote")),
        "paper": ("Paper protocol: ADASYN before the split", "paper", replace(config, resample="adasyn")),
        "with_time": ("All 30 fields (with Time)", "clean", replace(config, features=INPUT_FIELDS)),
        "without_time": ("29 fields (without Time)", "clean", replace(config, features=no_time)),
    }
    comparison_keys = ["none", "adasyn"] + (["smote"] if config.resample == "smote" else []) + ["paper"]
    ablation_keys = ["with_time", "without_time"]
    planned = {
        key: [(specs[key][1], replace(specs[key][2], seed=config.seed + offset)) for offset in range(seeds)]
        for key in comparison_keys + ablation_keys
    }
    results: dict[tuple[str, TrainConfig], RunResult] = {("clean", config): shipped}
    to_fit: dict[tuple[str, TrainConfig], str] = {}  # run -> the first table row that needs it
    for key, runs in planned.items():
        for run in runs:
            if run not in results:
                to_fit.setdefault(run, key)
    for number, ((protocol, variant_config), key) in enumerate(to_fit.items(), start=1):
        runner = run_leaky if protocol == "paper" else run_clean
        label = f"[{number}/{len(to_fit)}] {specs[key][0]}"
        results[(protocol, variant_config)] = _fit(label, runner, data, variant_config)

    def runs(key: str) -> list[RunResult]:
        return [results[run] for run in planned[key]]

    comparison = [Variant(key, specs[key][0], runs(key)) for key in comparison_keys]
    ablation = [Variant(key, specs[key][0], runs(key)) for key in ablation_keys]
    return comparison, ablation


def _run_clean_and_write(data: Transactions, config: TrainConfig, args: argparse.Namespace, command: str) -> None:
    shipped = _fit(f"model ({_shape(config)}, {len(config.features)} features)", run_clean, data, config)
    comparison, ablation = ([], []) if args.comparison_seeds == 0 else _variants(data, config, shipped, args.comparison_seeds)
    cross_validated = _compare(data, config, args) if args.compare else []
    calibration = calibration_report(shipped, cross_validated[0] if cross_validated else None, config.target_prior)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    artifact = out / ARTIFACT_FILE
    served = serving_pipeline(shipped.pipeline)
    _atomic_write(artifact, lambda tmp: skops.io.dump(served, tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=9))
    created = datetime.now(timezone.utc)
    artifact_sha = sha256_hex(artifact)
    ensemble = shipped.pipeline.named_steps["mlp"]
    manifest = FraudManifest(
        model_version=f"fraud-mlp-{created:%Y%m%d}-{artifact_sha[:8]}",
        created_at=created.isoformat(timespec="seconds"),
        artifact=ArtifactInfo(file=ARTIFACT_FILE, sha256=artifact_sha, bytes=artifact.stat().st_size),
        features=list(config.features),
        threshold=shipped.threshold,
        threshold_rule={"rule": config.threshold_rule, "target": config.threshold_target, "chosen_on": "validation"},
        calibration=CalibrationInfo(
            method=PRIOR_SHIFT_METHOD, train_prior=shipped.train_prior, target_prior=config.target_prior
        ),
        library_versions={
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "imbalanced-learn": imblearn.__version__,
            "numpy": np.__version__,
            "skops": skops.__version__,
        },
        training={
            "data_file": data.path.name,
            "data_sha256": data.sha256,
            "rows": len(data.y),
            "frauds": data.frauds,
            "positive_rate": data.frauds / len(data.y),
            "duplicate_rows": data.duplicate_rows,
            "time_confound": time_confound(data.X, data.y),
            "real_prior_of_full_dataset": REAL_FRAUD_PRIOR,
            "protocol": "clean: split first; any resampling on each MLP's training rows only",
            "pipeline": ["StandardScaler", f"{config.members} x MLPClassifier, early-stopped on hold-out AUPRC"],
            "served_pipeline": [type(step).__name__ for _, step in served.steps],
            "split_kind": config.split,
            "resample": config.resample,
            "balance": config.balance,
            "seed": config.seed,
            "members": config.members,
            "hidden_sizes": list(config.hidden_sizes),
            "learning_rate": config.learning_rate,
            "alpha": config.alpha,
            "max_iter": config.max_iter,
            "early_stopping": config.early_stopping,
            "patience": config.patience,
            "epochs_kept": [int(epoch) for epoch in ensemble.best_epochs_],
            "split": {
                "test_fraction": config.test_fraction,
                "val_fraction_of_rest": config.val_fraction_of_rest,
                **{f"{part}_rows": shipped.metrics[part]["rows"] for part in ("train", "val", "test")},
                **{f"{part}_frauds": shipped.metrics[part]["frauds"] for part in ("train", "val", "test")},
            },
            "command": command,
        },
        metrics_summary={
            split_name: {
                key: shipped.metrics[split_name][key] for key in ("precision", "recall", "f1", "auprc", "roc_auc")
            }
            for split_name in ("val", "test")
        },
    )
    plots = write_plots(shipped, calibration, out)
    if cross_validated:
        plots.append(write_comparison_plot(cross_validated, out))
    metrics = {
        "model_version": manifest.model_version,
        "threshold": shipped.threshold,
        **shipped.metrics,
        "calibration": calibration.to_json(),
        "cross_validation": [fraud_compare.to_json(run) for run in cross_validated],
        "comparison": _variant_metrics(comparison),
        "time_ablation": _variant_metrics(ablation),
    }
    _atomic_write(out / METRICS_FILE, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    manifest_dict = manifest.model_dump(mode="json")
    _atomic_write(
        out / CARD_FILE,
        lambda tmp: write_model_card(
            tmp,
            manifest=manifest_dict,
            result=shipped,
            comparison=comparison,
            ablation=ablation,
            cross_validated=cross_validated,
            calibration_report=calibration,
            command=command,
        ),
    )
    # Written last: a run that dies halfway leaves no manifest that vouches for a half-written directory.
    _atomic_write(out / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest_dict, indent=2) + "\n"))
    _say(f"threshold {shipped.threshold:.6g} (calibrated scale), pi_t {shipped.train_prior:.4f} -> pi {config.target_prior}")
    _say(f"wrote {out}: {ARTIFACT_FILE}, {MANIFEST_FILE}, {METRICS_FILE}, {CARD_FILE}, {', '.join(plots)}")
    _say(f"model version {manifest.model_version}")


def _shape(config: TrainConfig) -> str:
    return f"{config.members} x MLP {','.join(map(str, config.hidden_sizes))}, resample {config.resample}, balance {config.balance}"


def _compare(data: Transactions, config: TrainConfig, args: argparse.Namespace) -> list[fraud_compare.Comparison]:
    """Stratified repeated k-fold on the rows the shipped model trained and validated on (its test rows stay
    out), then time-ordered forward folds over every row: the second protocol, reported apart."""
    split = split_rows(data.X, data.y, config)
    rows = np.sort(np.concatenate([split.train, split.val]))
    X, y = data.X[rows], data.y[rows]
    runs = []
    started = time.perf_counter()
    folds = fraud_compare.stratified_folds(y, args.cv_folds, args.cv_repeats, config.seed)
    runs.append(
        fraud_compare.run_comparison(
            X,
            y,
            config,
            protocol="stratified",
            folds=folds,
            description=(
                f"{args.cv_repeats} x {args.cv_folds}-fold stratified cross-validation on the {len(y):,} training and "
                f"validation rows ({int(y.sum()):,} frauds; the test split stays out)"
            ),
            keys=args.compare_models,
            jobs=args.jobs,
            say=_say,
        )
    )
    time_folds = fraud_compare.time_folds(data.X[:, INPUT_FIELDS.index("Time")], data.y)
    if time_folds:
        runs.append(
            fraud_compare.run_comparison(
                data.X,
                data.y,
                config,
                protocol="time",
                folds=time_folds,
                description=(
                    f"{len(time_folds)} time-ordered forward folds over all {len(data.y):,} rows sorted by Time: each "
                    "trains on every row before a cut and tests on the next tenth of the rows"
                ),
                keys=args.compare_models,
                jobs=args.jobs,
                say=_say,
            )
        )
    else:
        _say("time-ordered folds skipped: some fold would hold a single class")
    _say(f"comparison done in {time.perf_counter() - started:.0f}s")
    for run in runs:
        for line in fraud_compare.comparison_table(run):
            print(line, flush=True)
    return runs


def _variant_metrics(variants: list[Variant]) -> dict[str, Any]:
    return {
        variant.key: {
            "label": variant.label,
            "leaky": variant.leaky,
            "runs": [
                {"seed": run.config.seed, "val": run.metrics["val"], "test": run.metrics["test"]}
                for run in variant.runs
            ],
        }
        for variant in variants
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
