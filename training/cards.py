"""Render an NLI artifact's model card (README.md) and training-curve plot from its metadata."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def write_training_curve(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Training/validation loss and validation accuracy against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    figure, loss_axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    train = [(row["step"], row["train_loss"]) for row in history if row["train_loss"] is not None]
    if train:
        loss_axis.plot(*zip(*train), marker="o", label="training loss")
    loss_axis.plot(steps, [row["eval_loss"] for row in history], marker="o", label="validation loss")
    loss_axis.set_xlabel("optimiser step")
    loss_axis.set_ylabel("cross-entropy loss")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(
        steps, [row["eval_accuracy"] for row in history], color="tab:green", marker="s", label="validation accuracy"
    )
    accuracy_axis.set_ylabel("validation accuracy")
    lines = loss_axis.get_legend_handles_labels()
    more = accuracy_axis.get_legend_handles_labels()
    loss_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize="small")
    loss_axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def render_card(metadata: dict[str, Any]) -> str:
    """Markdown model card; every number comes from metadata.json, which is written by the same run."""
    base = metadata["base"]
    training = metadata["training"]
    metrics = metadata["metrics"]
    lora = metadata.get("lora")
    labels = metadata["labels"]
    is_lora = metadata["method"] == "lora"
    method = (
        f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']} on "
        f"{', '.join(lora['target_modules'])}; the classification head is trained and saved with the adapter"
        if is_lora
        else "full fine-tuning (every weight updated; the whole model is saved)"
    )
    table = "\n".join(
        f"| {row['step']} | {_fmt(row['train_loss'])} | {_fmt(row['eval_loss'])} | {_fmt(row['eval_accuracy'])} |"
        for row in metrics["history"]
    )
    files = "\n".join(f"- `{name}` ({digest})" for name, digest in metadata["files"].items())
    init = (
        f"- LoRA matrices initialised from: {training.get('init_adapter') or 'scratch (random A, zero B)'}\n"
        if is_lora
        else ""
    )
    notes = f"\n## Notes\n\n{training['notes']}\n" if training.get("notes") else ""
    load = (
        "```python\n"
        "from peft import PeftModel\n"
        "from app.inference.base_model import resolve_base, build_classifier\n"
        f"base = build_classifier(resolve_base({base['id']!r}), num_labels={len(labels)})\n"
        f"model = PeftModel.from_pretrained(base, 'adapters/{metadata['name']}')\n"
        "```\n"
        if is_lora
        else ""
    )
    return f"""# {metadata['name']}: {metadata['task']} sentence-pair classifier ({metadata['method']})

Predicts {', '.join(f'`{label}`' for label in labels)} (class ids {', '.join(f'{i}={label}' for i, label in enumerate(labels))})
for a (premise, hypothesis) pair, tokenised as `tokenizer(premise, hypothesis, truncation=True,
max_length={metadata['max_length']})`.

## Result

Held-out accuracy **{metrics['eval_accuracy']:.4f}** (loss {metrics['eval_loss']:.4f}) on {training['eval_rows']} evaluation rows
that were never trained on.

## Base model

- `{base['display']}` (`{base['id']}`, {base['model_type']}), random init: {base['random_init']}
- fingerprint `{base['fingerprint']}` (the server refuses this artifact on any other base)
- method: {method}
- parameters: {training['trainable_params']:,} trainable of {training['all_params']:,} (base + one head; the
  LoRA matrices and PEFT's frozen copy of the head are not in the denominator)

## Data

- training: {training['train_data']}, {training['train_rows']} rows {training.get('train_label_counts', '')}
- evaluation: {training['eval_data']}, {training['eval_rows']} rows {training.get('eval_label_counts', '')}
- split: {training['split']}
- origin and licences of the shared data files: `data/nli/SOURCES.md` and `/work/shared/data/SOURCES.md`
- sorted evaluation ids hash: `{training.get('eval_ids_sha256', '')}`

## Training

- {training['epochs']} epochs, batch size {training['batch_size']}, learning rate {training['learning_rate']}
  (linear schedule, warmup ratio {training.get('warmup_ratio')}), weight decay {training.get('weight_decay')},
  max length {metadata['max_length']}, seed {training['seed']}, bf16 {training.get('bf16')}
{init}- device: {training.get('device')}; wall time {training['train_time_s']} s;
  peak memory {training['peak_memory_mb']} MB ({training.get('peak_memory_kind', '')})
- command:

```
{training['command']}
```

| step | training loss | validation loss | accuracy |
|---:|---:|---:|---:|
{table}

![training curve](training_curve.png)
{notes}
## Limits

- A small English encoder trained on a few thousand pairs: accuracy is far below models
  trained on the full MNLI/SNLI training sets; expect errors on negation, numbers, world
  knowledge and long premises (inputs beyond {metadata['max_length']} tokens are truncated).
- Evaluation rows come from the same source and distribution as the training rows, so the
  held-out accuracy is an in-distribution estimate; out-of-domain text will score lower.
- Not for decisions about people. Labels are only meaningful for the listed classes.

## Files

{files}
- `metadata.json` (what the server reads), `training_curve.png`, this card

{load}"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
