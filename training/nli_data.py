"""Read sentence-pair NLI files (shared jsonl, official MultiNLI/SNLI jsonl, GLUE tsv) into labelled examples,
split them, and assemble a run's training and held-out parts."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)

# Fixed label orders: the index is the class id the head is trained on, and metadata.json
# records the list, so the server maps logits back to names without guessing.
NLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
RTE_LABELS: tuple[str, ...] = ("entailment", "not_entailment")
LABEL_SETS: dict[str, tuple[str, ...]] = {"nli": NLI_LABELS, "rte": RTE_LABELS}

# Markers some sources use for "no gold label" (MultiNLI "-", Hugging Face snli -1): skipped and counted.
_NO_GOLD = {"-", "", "-1"}

csv.field_size_limit(10_000_000)


class DatasetError(ValueError):
    """A data file cannot be used: missing, unreadable, missing fields or unknown labels.

    The message names the file (and line) and is meant to be shown to the user as is.
    """


@dataclass(frozen=True)
class PairExample:
    id: str
    premise: str
    hypothesis: str
    label: str


@dataclass(frozen=True)
class PairFile:
    """One data file, read: its examples in file order, plus what the reader dropped."""

    path: Path
    format: str  # "jsonl" (shared or Hugging Face layout), "multinli-jsonl" (MultiNLI and SNLI) or "glue-tsv"
    examples: list[PairExample]
    skipped_no_gold: int
    sha256: str

    @property
    def description(self) -> str:
        """File name and content hash, as metadata.json records the training data."""
        return f"{self.path.name} (sha256:{self.sha256})"


def read_pairs(path: str | Path) -> PairFile:
    """Read a pair file; the format is chosen by suffix (.jsonl/.json, .tsv) or by the first byte
    (`{`: jsonl, else tab-separated with a header, e.g. MultiNLI's and SNLI's .txt files)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json") or (suffix != ".tsv" and text.lstrip().startswith("{")):
        fmt, rows = "jsonl", _jsonl_rows(path, text)
    else:
        fmt, rows = "glue-tsv", _tsv_rows(path, text)

    examples: list[PairExample] = []
    skipped = 0
    saw_gold_label = False
    for line_no, row in rows:
        saw_gold_label |= "gold_label" in row
        example = _example_from_row(path, line_no, row)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if fmt == "jsonl" and saw_gold_label:
        fmt = "multinli-jsonl"
    if not examples:
        raise DatasetError(f"{path}: no labelled rows (skipped {skipped} without a gold label)")
    if skipped:
        logger.info("%s: skipped %d rows without a gold label", path.name, skipped)
    return PairFile(
        path=path,
        format=fmt,
        examples=examples,
        skipped_no_gold=skipped,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _lines(text: str) -> list[str]:
    """Lines split at newlines only: str.splitlines() also splits at U+2028, form feeds and the like,
    which may sit inside a sentence (and, unescaped, inside a JSON string)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {line_no}: expected a JSON object per line")
        yield line_no, row


def _tsv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # GLUE's and MultiNLI/SNLI's tsv files are not CSV-quoted: a '"' inside a sentence is literal text.
    reader = csv.reader(_lines(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise DatasetError(f"{path}: empty file")
    for line_no, cells in enumerate(reader, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        # Trailing empty columns may be left out (the label2..label5 of MultiNLI/SNLI .txt training
        # rows); a row short of a needed column fails below with that column's name.
        yield line_no, dict(zip(header, cells))


def _example_from_row(path: Path, line_no: int, row: dict[str, Any]) -> PairExample | None:
    """One row to an example; None when the row has no gold label.

    Field layouts: shared/Hugging Face snli and glue-mnli (premise, hypothesis, label) and
    MultiNLI / GLUE MNLI (sentence1, sentence2, gold_label) and GLUE RTE (sentence1, sentence2,
    label). Integer labels follow the layout that defines them: with premise/hypothesis the
    Hugging Face snli/mnli order (0 entailment, 1 neutral, 2 contradiction), with
    sentence1/sentence2 + label the GLUE RTE order (0 entailment, 1 not_entailment).
    """
    where = f"{path} line {line_no}"
    if "premise" in row or "hypothesis" in row:
        text_keys, int_labels = ("premise", "hypothesis"), NLI_LABELS
    elif "sentence1" in row or "sentence2" in row:
        text_keys, int_labels = ("sentence1", "sentence2"), RTE_LABELS
    else:
        raise DatasetError(
            f"{where}: missing fields: need premise/hypothesis or sentence1/sentence2 (found: {', '.join(sorted(row))})"
        )
    label_key = "gold_label" if "gold_label" in row else "label"
    if label_key == "gold_label":
        int_labels = NLI_LABELS
    for key in (*text_keys, label_key):
        if key not in row or row[key] is None:
            raise DatasetError(f"{where}: missing field {key!r}")
    premise, hypothesis = row[text_keys[0]], row[text_keys[1]]
    if not isinstance(premise, str) or not isinstance(hypothesis, str):
        raise DatasetError(f"{where}: {text_keys[0]!r} and {text_keys[1]!r} must be strings")

    label = _normalise_label(row[label_key], int_labels, where)
    if label is None:
        return None
    row_id = next((str(row[k]) for k in ("id", "pairID", "idx", "index") if row.get(k) not in (None, "")), None)
    return PairExample(
        id=row_id if row_id is not None else f"{path.name}:{line_no}",
        premise=premise,
        hypothesis=hypothesis,
        label=label,
    )


def _normalise_label(value: Any, int_labels: tuple[str, ...], where: str) -> str | None:
    if isinstance(value, bool):
        raise DatasetError(f"{where}: label {value!r} is not a class name or index")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: label {value!r} is not a class name or index")
    value = value.strip()
    if value in _NO_GOLD:
        return None
    if value.isdigit():
        index = int(value)
        if index >= len(int_labels):
            raise DatasetError(
                f"{where}: unknown label {value!r}: integer labels here mean {_describe(int_labels)}"
            )
        return int_labels[index]
    name = value.lower()
    if name not in NLI_LABELS and name not in RTE_LABELS:
        raise DatasetError(
            f"{where}: unknown label {value!r}; expected one of "
            f"{', '.join(NLI_LABELS)} (3-way NLI) or {', '.join(RTE_LABELS)} (RTE)"
        )
    return name


def _describe(labels: tuple[str, ...]) -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(labels))


def infer_label_set(examples: list[PairExample], source: str) -> tuple[str, ...]:
    """The label order the data belongs to: 3-way NLI unless it uses RTE's not_entailment.

    A subset of a task (e.g. a --limit slice with no neutral rows) still gets its task's full
    label list, so adapters of one task always agree on class ids.
    """
    seen = {example.label for example in examples}
    if "not_entailment" in seen:
        mixed = seen - set(RTE_LABELS)
        if mixed:
            raise DatasetError(
                f"{source}: mixes RTE's not_entailment with 3-way labels ({', '.join(sorted(mixed))})"
            )
        return RTE_LABELS
    return NLI_LABELS


def check_labels(examples: list[PairExample], labels: tuple[str, ...], source: str) -> None:
    """Fail if any example's label is outside `labels` (e.g. an RTE eval file for an NLI model)."""
    unknown = Counter(example.label for example in examples if example.label not in labels)
    if unknown:
        found = ", ".join(f"{name} ({count})" for name, count in sorted(unknown.items()))
        raise DatasetError(f"{source}: labels {found} are not in this task's labels ({', '.join(labels)})")


def adapt_to_label_set(examples: list[PairExample], labels: tuple[str, ...]) -> list[PairExample]:
    """Map 3-way NLI rows onto RTE's two classes (neutral and contradiction -> not_entailment).

    The standard reduction used when MNLI data helps an RTE model; other label sets pass through
    unchanged (check_labels still rejects what does not fit).
    """
    if labels != RTE_LABELS:
        return examples
    return [
        PairExample(e.id, e.premise, e.hypothesis, "not_entailment" if e.label in ("neutral", "contradiction") else e.label)
        for e in examples
    ]


def split_examples(
    examples: list[PairExample], eval_fraction: float, seed: int
) -> tuple[list[PairExample], list[PairExample]]:
    """Stratified split: per label, a seeded shuffle sends round(fraction * count) rows to eval.

    Depends only on the file's rows (in file order), the fraction and the seed, so the held-out
    rows can be reproduced exactly. Both parts keep file order.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise DatasetError(f"--eval-fraction must be between 0 and 1, got {eval_fraction}")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_label[example.label].append(index)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        held_out.update(indices[: round(eval_fraction * len(indices))])
    train = [example for index, example in enumerate(examples) if index not in held_out]
    evaluation = [example for index, example in enumerate(examples) if index in held_out]
    if not train or not evaluation:
        raise DatasetError(
            f"splitting {len(examples)} rows with --eval-fraction {eval_fraction} leaves an empty part"
        )
    return train, evaluation


def ids_digest(examples: list[PairExample]) -> str:
    """sha256 over the sorted example ids: a short way to check a reproduced split."""
    digest = hashlib.sha256("\n".join(sorted(example.id for example in examples)).encode())
    return "sha256:" + digest.hexdigest()


def label_counts(examples: list[PairExample]) -> dict[str, int]:
    return dict(sorted(Counter(example.label for example in examples).items()))


@dataclass
class TrainingData:
    """A run's rows: the training part, the held-out part, the label order, and how they were made."""

    train: list[PairExample]
    evaluation: list[PairExample]
    labels: tuple[str, ...]
    train_description: str
    eval_description: str
    split: str
    eval_ids_sha256: str
    skipped_no_gold: int = 0


def prepare_training_data(
    train_path: Path,
    *,
    eval_path: Path | None = None,
    eval_fraction: float | None = None,
    split_seed: int = 13,
    extra_train: Sequence[Path] = (),
    extra_train_skip_heldout: float | None = None,
    label_set: str = "auto",
    limit: int | None = None,
) -> TrainingData:
    """Read `train_path`, take the held-out part from `eval_path` or a stratified `eval_fraction`
    split of it, append `extra_train` rows to the training part only, and cut both parts to `limit`."""
    train_file = read_pairs(train_path)
    labels = LABEL_SETS[label_set] if label_set != "auto" else infer_label_set(train_file.examples, str(train_path))
    check_labels(train_file.examples, labels, str(train_path))
    skipped = train_file.skipped_no_gold
    if eval_path is not None:
        eval_file = read_pairs(eval_path)
        check_labels(eval_file.examples, labels, str(eval_path))
        train, evaluation = train_file.examples, eval_file.examples
        eval_description = eval_file.description
        split = f"separate files: train {train_file.path.name}, eval {eval_file.path.name}"
        skipped += eval_file.skipped_no_gold
    elif eval_fraction is not None:
        train, evaluation = split_examples(train_file.examples, eval_fraction, split_seed)
        eval_description = train_file.description
        share = round(100 * eval_fraction)
        split = (
            f"{100 - share}/{share} split of {train_file.path.name}, stratified by label, seed {split_seed} "
            f"(training.nli_data.split_examples, --eval-fraction {eval_fraction} --split-seed {split_seed})"
        )
    else:
        train, evaluation, eval_description, split = train_file.examples, [], "", "none (dry run)"
    train_description = train_file.description
    for extra_path in extra_train:
        extra_file = read_pairs(extra_path)
        extra = extra_file.examples
        how = "all rows"
        if extra_train_skip_heldout is not None:
            extra, _ = split_examples(extra, extra_train_skip_heldout, split_seed)
            how = f"training part of its {extra_train_skip_heldout} / seed {split_seed} split"
        extra = adapt_to_label_set(extra, labels)
        check_labels(extra, labels, str(extra_path))
        train = train + extra
        train_description += f" + {extra_file.description}: {how}, {len(extra)} rows"
        if labels == RTE_LABELS:
            train_description += " (neutral, contradiction -> not_entailment)"
    if limit is not None:
        train, evaluation = train[:limit], evaluation[:limit]
        split += f"; --limit {limit} (first rows of each part)"
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
