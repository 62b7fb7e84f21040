"""Train and measure an NLI model: the tokenised pair Dataset, the Hugging Face Trainer with the
training-table callbacks, the final float32 evaluation, and what the run cost (memory, device)."""

from __future__ import annotations

import logging
import resource
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import DataCollatorWithPadding

from training.nli_data import PairExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation recipe. `warmup_ratio` is a fraction of the optimiser steps, in [0, 1)."""

    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    eval_every: int = 100
    seed: int = 0
    bf16: bool | None = None  # None: on when a CUDA GPU supports it

    def __post_init__(self) -> None:
        # transformers reads warmup_steps >= 1 as a step count, below 1 as a fraction of the steps.
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")


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
class History:
    """The training table: one row per evaluation (step, training loss since the last row, eval loss, accuracy)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pending_train_loss: float | None = None


def make_trainer(
    settings: TrainSettings, model: torch.nn.Module, tokenizer, train_set: PairDataset, eval_set: PairDataset
):
    """A Trainer that evaluates every `eval_every` steps and at the last step, checkpoints nothing,
    and fills the returned History with the training table."""
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

    use_bf16 = settings.bf16
    if use_bf16 is None:
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    scratch = tempfile.mkdtemp(prefix="loraswap-nli-")  # Trainer wants a dir; nothing is checkpointed
    training_args = TrainingArguments(
        output_dir=scratch,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(64, settings.batch_size),
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        # transformers >= 5 has no warmup_ratio: a float below 1 here is the fraction of the steps
        # (TrainSettings keeps it below 1; pyproject.toml requires transformers >= 5.2).
        warmup_steps=settings.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        logging_strategy="steps",
        logging_steps=settings.eval_every,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
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
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            logits = model(**inputs).logits.float()  # [batch, labels]
            total_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            seen += batch["labels"].numel()
    return {"eval_loss": total_loss / seen, "eval_accuracy": correct / seen}


def peak_memory_mb() -> tuple[float, str]:
    """Peak memory of the run so far and how it was measured."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "GPU torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the whole process's peak resident set, model load included.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "CPU process max RSS (getrusage)"


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"

