"""Render an NLI artifact's model card (README.md) and training-curve plot from its typed metadata."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any

from app.artifacts import CARD_FILE, CURVE_FILE, METADATA_FILE, MODEL_CONFIG_FILE, AdapterMetadata, write_text_atomic
from app.config import Settings

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# An absolute path of two or more parts (`/work/shared/data/rte_dev.jsonl`, `~/data/x.tsv`); "80/20" is not one.
_MACHINE_PATH = re.compile(r"(?<![\w/.~-])~?/[\w.+-]+(?:/[\w.+-]+)+/?")
# Where each task's data comes from; docs/training.md ("Getting the data") has the links and licences.
DATA_SOURCES = {
    "mnli": "MultiNLI 1.0 (NYU; OANC and CC BY-SA 3.0 texts)",
    "snli": "SNLI 1.0 (Stanford NLP; CC BY-SA 4.0)",
    "rte": "RTE as distributed by GLUE (from the PASCAL RTE challenges; GLUE states no licence of its own)",
}


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


def portable(text: str) -> str:
    """`text` without this machine's paths: a path inside the repository becomes relative to it, any
    other absolute path becomes its file name (data files are named, their sources are in the card)."""

    def shorten(match: re.Match[str]) -> str:
        path = Path(match.group(0)).expanduser()
        try:
            return path.resolve().relative_to(REPO_ROOT).as_posix()
        except (ValueError, OSError):
            return path.name

    return _MACHINE_PATH.sub(shorten, text)


def served_max_length() -> int:
    """The server's default token cut (LORASWAP_MAX_SEQ_LEN_TOKENS), read from its settings' definition."""
    return int(Settings.model_fields["max_seq_len_tokens"].default)


def data_source(metadata: AdapterMetadata) -> str:
    for key in (metadata.task.lower(), metadata.name.lower()):
        if key in DATA_SOURCES:
            return DATA_SOURCES[key]
    return "the files named above"


def render_card(metadata: AdapterMetadata) -> str:
    """Markdown model card; every number comes from metadata.json, which is written by the same run."""
    base, training, metrics, lora = metadata.base, metadata.training, metadata.metrics, metadata.lora
    labels = metadata.labels
    is_lora = metadata.method == "lora"
    trained_length = metadata.max_length
    served_length = served_max_length()
    method = (
        f"LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout} on "
        f"{', '.join(lora.target_modules)}; the classification head is trained and saved with the adapter"
        if is_lora and lora is not None
        else "full fine-tuning (every weight updated; the whole model is saved)"
    )
    table = "\n".join(
        f"| {row['step']} | {_fmt(row['train_loss'])} | {_fmt(row['eval_loss'])} | {_fmt(row['eval_accuracy'])} |"
        for row in metrics.get("history", [])
    )
    files = "\n".join(f"- `{name}` ({digest})" for name, digest in metadata.files.items())
    init = (
        f"- LoRA matrices initialised from: {portable(training.get('init_adapter') or 'scratch (random A, zero B)')}\n"
        if is_lora
        else ""
    )
    notes = f"\n## Notes\n\n{portable(training['notes'])}\n" if training.get("notes") else ""
    base_id = portable(base.id)
    directory = f"adapters/{metadata.name}"
    if not is_lora:
        load = ""
    elif base.random_init:
        load = (
            "Load it with PEFT on the same randomly initialised base (built offline by loraswap):\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            "from app.inference.base_model import build_classifier, resolve_base\n"
            f"base = build_classifier(resolve_base({base_id!r}, random_init=True, seed={base.seed}), num_labels={len(labels)})\n"
            f"model = PeftModel.from_pretrained(base, {directory!r})\n"
            "```\n"
        )
    else:
        hub_id = (base.display or base_id) if base.id == "embedded" else base_id
        load = (
            f"Load it with plain PEFT; `{MODEL_CONFIG_FILE}` carries the label names (`id2label`):\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoConfig, AutoModelForSequenceClassification\n"
            f"config = AutoConfig.from_pretrained({directory!r})\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({hub_id!r}, config=config)\n"
            f"model = PeftModel.from_pretrained(base, {directory!r})  # model.config.id2label: {dict(enumerate(labels))}\n"
            "```\n"
        )
    length_note = (
        f"The server cuts a pair at its `LORASWAP_MAX_SEQ_LEN_TOKENS` setting (default {served_length}), so a pair "
        f"longer than {trained_length} tokens is served with more text than training showed the model; "
        f"`LORASWAP_MAX_SEQ_LEN_TOKENS={trained_length}` serves exactly as trained."
        if trained_length is not None and trained_length != served_length
        else f"The server cuts a pair at its `LORASWAP_MAX_SEQ_LEN_TOKENS` setting (default {served_length})."
    )
    # Every field may hold a path of the training machine (the base, the command, notes): none reaches the card.
    return portable(f"""# {metadata.name}: {metadata.task} sentence-pair classifier ({metadata.method})

Predicts {', '.join(f'`{label}`' for label in labels)} (class ids {', '.join(f'{i}={label}' for i, label in enumerate(labels))})
for a (premise, hypothesis) pair. Trained on pairs tokenised as `tokenizer(premise, hypothesis,
truncation=True, max_length={trained_length})`: cut at {trained_length} tokens. {length_note}

## Result

Held-out accuracy **{metrics['eval_accuracy']:.4f}** (loss {metrics['eval_loss']:.4f}) on {training['eval_rows']} evaluation rows
that were never trained on (float32, pairs cut at {trained_length} tokens).

## Base model

- `{base.display}` (`{base_id}`, {base.model_type}), random init: {base.random_init}
- fingerprint `{base.fingerprint}` (the server refuses this artifact on any other base)
- method: {method}
- parameters: {training['trainable_params']:,} trainable of {training['all_params']:,} (base + one head; the
  LoRA matrices and PEFT's frozen copy of the head are not in the denominator)

## Data

- training: {training['train_data']}, {training['train_rows']} rows {training.get('train_label_counts', '')}
- evaluation: {training['eval_data']}, {training['eval_rows']} rows {training.get('eval_label_counts', '')}
- split: {training['split']}
- source: {data_source(metadata)}; where to download it and its licence: `docs/training.md`, "Getting the data"
- sorted evaluation ids hash: `{training.get('eval_ids_sha256', '')}`

## Training

- {training['epochs']} epochs, batch size {training['batch_size']}, learning rate {training['learning_rate']}
  (linear schedule, warmup ratio {training.get('warmup_ratio')}), weight decay {training.get('weight_decay')},
  max length {trained_length}, seed {training['seed']}, bf16 {training.get('bf16')}
{init}- device: {training.get('device')}; wall time {training['train_time_s']} s;
  peak memory {training['peak_memory_mb']} MB ({training.get('peak_memory_kind', '')})
- command (paths outside the repository shortened to file names):

```
{portable(training['command'])}
```

| step | training loss | validation loss | accuracy |
|---:|---:|---:|---:|
{table}

![training curve]({CURVE_FILE})
{notes}
## Limits

- A small English encoder trained on a few thousand pairs: accuracy is far below models
  trained on the full MNLI/SNLI training sets; expect errors on negation, numbers, world
  knowledge and long premises.
- Evaluation rows come from the same source and distribution as the training rows, so the
  held-out accuracy is an in-distribution estimate; out-of-domain text will score lower.
- Not for decisions about people. Labels are only meaningful for the listed classes.

## Files

{files}
- `{METADATA_FILE}` (what the server reads), `{CURVE_FILE}`, this card

{load}""")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """`python -m training.cards DIR...`: rewrite each artifact's card from its metadata.json (no training)."""
    parser = argparse.ArgumentParser(
        prog="python -m training.cards",
        description="Render the model card (README.md) of NLI artifact directories from their metadata.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("directories", nargs="+", type=Path, metavar="DIR", help="artifact directories")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a card differs from what its metadata renders"
    )
    args = parser.parse_args(argv)
    stale = []
    for directory in args.directories:
        card = render_card(AdapterMetadata.read(directory))
        path = directory / CARD_FILE
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != card:
                stale.append(str(path))
        else:
            write_text_atomic(path, card)
            print(f"wrote {path}")
    if stale:
        print("stale cards (run python -m training.cards DIR...): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
