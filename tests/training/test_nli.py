"""Tests for the NLI training CLI: parameter report, LoRA and full runs end to end, what they write (and
that plain PEFT loads it with the label names), and that an existing artifact is not overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import DataCollatorWithPadding

from app.artifacts import AdapterMetadata
from training import nli
from training.cards import portable
from training.nli_model import build_model
from training.nli_trainer import PairDataset, evaluate_fp32

DATA = Path(__file__).resolve().parents[2] / "data" / "nli"

METADATA_KEYS = {
    "format_version", "name", "task", "labels", "base", "method", "lora", "max_length",
    "training", "metrics", "files", "created_at",
}
BASE_KEYS = {"id", "display", "model_type", "fingerprint", "random_init", "seed"}
TRAINING_KEYS = {
    "train_data", "eval_data", "split", "train_rows", "eval_rows", "seed", "epochs", "batch_size",
    "learning_rate", "train_time_s", "peak_memory_mb", "trainable_params", "all_params", "command",
}
HISTORY_KEYS = {"step", "train_loss", "eval_loss", "eval_accuracy"}


def smoke_argv(base_dir: Path, output: Path, *extra: str) -> list[str]:
    """A few optimiser steps on the tiny base: 48 MNLI rows, 3 steps of 16, an eval every 2 steps."""
    return [
        "--base", str(base_dir),
        "--train", str(DATA / "mnli_sample.jsonl"),
        "--eval-fraction", "0.2",
        "--limit", "48",
        "--epochs", "1",
        "--batch-size", "16",
        "--eval-every", "2",
        "--max-length", "64",
        "--learning-rate", "1e-2",
        "--threads", "1",
        "--name", "tiny-mnli",
        "--output", str(output),
        *extra,
    ]


def eval_batch(tokenizer, rows: int = 8) -> dict[str, torch.Tensor]:
    lines = (DATA / "mnli_sample.jsonl").read_text().splitlines()[:rows]
    pairs = [json.loads(line) for line in lines]
    return tokenizer(
        [p["premise"] for p in pairs], [p["hypothesis"] for p in pairs],
        truncation=True, max_length=64, padding=True, return_tensors="pt",
    )


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_run(tiny_roberta_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora") / "tiny-mnli"
    argv = smoke_argv(tiny_roberta_dir, output)
    return nli.run(nli.parse_args(argv), "python -m training.nli " + " ".join(argv))


@pytest.fixture(scope="module")
def lora_metadata(lora_run) -> dict:
    return json.loads((lora_run.output / "metadata.json").read_text())


def test_roberta_large_dry_run_reports_lora_plus_head_over_base_plus_one_head(capsys):
    assert nli.main(["--base", "roberta-large", "--random-init", "--dry-run"]) == 0
    assert "trainable params: 2,625,539 || all params: 355,362,819" in capsys.readouterr().out.splitlines()


def test_full_dry_run_trains_every_parameter(tiny_roberta_dir, capsys):
    nli.main(["--base", str(tiny_roberta_dir), "--method", "full", "--labels", "rte", "--dry-run"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    trainable, total = (part.split(": ")[1] for part in line.split(" || "))
    assert trainable == total


def test_lora_run_writes_every_artifact_file(lora_run):
    names = {p.name for p in lora_run.output.iterdir()}
    assert names == {
        "adapter_config.json", "adapter_model.safetensors", "config.json", "metadata.json", "training_curve.png", "README.md",
    }
    for path in lora_run.output.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name  # readable by a non-root server
    assert lora_run.output.stat().st_mode & 0o755 == 0o755
    assert not [p for p in lora_run.output.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_metadata_follows_the_schema(lora_run, lora_metadata, tiny_roberta_dir):
    assert METADATA_KEYS <= set(lora_metadata)
    assert BASE_KEYS <= set(lora_metadata["base"])
    assert TRAINING_KEYS <= set(lora_metadata["training"])
    assert lora_metadata["format_version"] == 1
    assert lora_metadata["labels"] == ["entailment", "neutral", "contradiction"]
    assert lora_metadata["method"] == "lora"
    assert lora_metadata["lora"] == {"r": 16, "alpha": 32, "dropout": 0.1, "target_modules": ["query", "value"]}
    assert lora_metadata["max_length"] == 64
    assert lora_metadata["base"]["model_type"] == "roberta"
    training = lora_metadata["training"]
    assert (training["train_rows"], training["eval_rows"]) == (48, 48)
    assert "stratified" in training["split"] and "seed 13" in training["split"]
    assert training["command"].startswith("python -m training.nli ")
    for name, digest in lora_metadata["files"].items():
        assert sha256_of(lora_run.output / name) == digest
    assert set(lora_metadata["files"]) == {"adapter_model.safetensors", "adapter_config.json", "config.json"}
    assert AdapterMetadata.read(lora_run.output).labels == lora_metadata["labels"]


def test_history_is_the_training_table(lora_metadata):
    history = lora_metadata["metrics"]["history"]
    assert [row["step"] for row in history] == [2, 3]  # every 2 steps, and the final step
    for row in history:
        assert set(row) == HISTORY_KEYS
        assert row["train_loss"] is not None and 0.0 <= row["eval_accuracy"] <= 1.0


def test_adapter_carries_lora_matrices_and_the_head(lora_run):
    with safe_open(str(lora_run.output / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("lora_A" in key for key in keys) and any("lora_B" in key for key in keys)
    assert any("classifier" in key for key in keys)


def test_peft_reload_reproduces_logits_accuracy_and_fingerprint(lora_run, lora_metadata, tiny_roberta_dir):
    from peft import PeftModel

    from app.inference.base_model import build_classifier, fingerprint, load_tokenizer, resolve_base

    spec = resolve_base(str(tiny_roberta_dir))
    # A different head seed: the head must come from the adapter file, not from initialisation.
    base = build_classifier(spec, num_labels=3, head_seed=12345)
    assert fingerprint(base) == lora_metadata["base"]["fingerprint"]
    reloaded = PeftModel.from_pretrained(base, str(lora_run.output)).eval()

    tokenizer = load_tokenizer(spec)
    batch = eval_batch(tokenizer)
    lora_run.model.eval()
    with torch.no_grad():
        expected = lora_run.model(**batch).logits
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    metrics = evaluate_fp32(reloaded, eval_dataset(lora_run, tokenizer), DataCollatorWithPadding(tokenizer))
    assert round(metrics["eval_accuracy"], 4) == lora_metadata["metrics"]["eval_accuracy"]


def eval_dataset(run, tokenizer) -> PairDataset:
    """The run's held-out rows, rebuilt from the flags recorded in its metadata."""
    args = nli.parse_args(smoke_argv(Path("unused"), run.output))
    data = nli.load_data(args)
    return PairDataset(data.evaluation, tokenizer, data.labels, max_length=64)


def test_plain_peft_loads_the_adapter_with_the_label_names(lora_run, tiny_roberta_dir, tmp_path):
    """What a PEFT user does with only transformers and peft: the base's own checkpoint, the config
    beside the adapter for the labels, PeftModel.from_pretrained; same logits as the trained model."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from app.inference.base_model import load_tokenizer, resolve_base

    # A base checkpoint as the hub has them: the encoder alone, no classification head.
    hub_like = tmp_path / "base"
    AutoModel.from_pretrained(str(tiny_roberta_dir)).save_pretrained(str(hub_like))
    config = AutoConfig.from_pretrained(str(lora_run.output))
    base = AutoModelForSequenceClassification.from_pretrained(str(hub_like), config=config)
    model = PeftModel.from_pretrained(base, str(lora_run.output)).eval()
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert model.config.label2id == {"entailment": 0, "neutral": 1, "contradiction": 2}

    batch = eval_batch(load_tokenizer(resolve_base(str(tiny_roberta_dir))))
    lora_run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, lora_run.model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_model_card_quotes_the_measured_accuracy_and_no_machine_path(lora_run, lora_metadata):
    card = (lora_run.output / "README.md").read_text()
    assert f"{lora_metadata['metrics']['eval_accuracy']:.4f}" in card
    command = lora_metadata["training"]["command"]
    assert str(lora_run.output) in command  # metadata keeps the command as run
    assert portable(command) in card
    assert "--train data/nli/mnli_sample.jsonl " in card and "--output tiny-mnli\n" in card
    assert str(lora_run.output.parent) not in card and "/tmp/" not in card


def test_an_existing_artifact_is_refused_without_force_and_replaced_with_it(lora_run, tiny_roberta_dir, tmp_path):
    import shutil

    output = tmp_path / "rte"
    shutil.copytree(lora_run.output, output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    argv = smoke_argv(tiny_roberta_dir, output, "--limit", "16", "--eval-every", "1")
    with pytest.raises(SystemExit) as excinfo:
        nli.main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and str(output) in message and "--force" in message
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before

    nli.main([*argv, "--force"])
    after = AdapterMetadata.read(output)
    assert after.training["train_rows"] == 16
    assert after.metrics["history"] != json.loads(before["metadata.json"])["metrics"]["history"]
    assert [p.name for p in tmp_path.iterdir()] == ["rte"]  # the replaced artifact and the staging are gone


def test_a_non_artifact_directory_is_refused_even_with_force(tiny_roberta_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as excinfo:
        nli.main(smoke_argv(tiny_roberta_dir, tmp_path, "--force"))
    assert "holds no artifact" in str(excinfo.value.code)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_warmup_ratio_is_a_fraction_of_the_optimiser_steps(tiny_roberta_dir):
    """transformers 5 has no warmup_ratio: the ratio goes in warmup_steps, read as a fraction below 1."""
    from transformers import AutoTokenizer

    from training.nli_trainer import TrainSettings, make_trainer

    args = nli.parse_args(smoke_argv(tiny_roberta_dir, Path("unused"), "--warmup-ratio", "0.1"))
    built = build_model(nli.model_config(args), ("entailment", "neutral", "contradiction"), with_fingerprint=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_roberta_dir))
    trainer, _ = make_trainer(nli.train_settings(args), built.model, tokenizer, [], [])
    assert trainer.args.get_warmup_steps(25) == 3  # ceil(2.5)
    trainer.create_optimizer_and_scheduler(num_training_steps=200)
    factor = trainer.lr_scheduler.lr_lambdas[0]  # multiplier of the peak learning rate at a step
    assert [round(factor(step), 4) for step in (0, 10, 20, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        TrainSettings(warmup_ratio=1.0)


def test_full_fine_tuning_writes_a_loadable_model(tiny_roberta_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from app.inference.base_model import load_tokenizer, resolve_base

    output = tmp_path / "tiny-mnli-full"
    result = nli.run(nli.parse_args(smoke_argv(tiny_roberta_dir, output, "--method", "full")), "test")
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["method"] == "full" and metadata["lora"] is None
    assert metadata["training"]["trainable_params"] == metadata["training"]["all_params"]
    assert set(metadata["files"]) == {"model.safetensors", "config.json"}
    assert "id2label" in json.loads((output / "config.json").read_text())
    for name, digest in metadata["files"].items():
        assert sha256_of(output / name) == digest

    reloaded = AutoModelForSequenceClassification.from_pretrained(str(output)).eval()
    assert reloaded.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    batch = eval_batch(load_tokenizer(resolve_base(str(tiny_roberta_dir))))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_init_adapter_copies_lora_matrices_but_not_the_head(lora_run, tiny_roberta_dir):
    from safetensors.torch import load_file

    args = nli.parse_args(
        ["--base", str(tiny_roberta_dir), "--labels", "rte", "--init-adapter", str(lora_run.output), "--dry-run"]
    )
    built = build_model(nli.model_config(args), ("entailment", "not_entailment"), with_fingerprint=True)
    state = built.model.state_dict()
    saved = load_file(str(lora_run.output / "adapter_model.safetensors"))
    lora_keys = [key for key in saved if "lora_" in key]
    assert lora_keys
    for key in lora_keys:
        here = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        torch.testing.assert_close(state[here], saved[key], atol=0, rtol=0)
    head = [key for key in state if "modules_to_save" in key and key.endswith("out_proj.weight")]
    assert [tuple(state[key].shape) for key in head] == [(2, 32)]  # a fresh 2-way head


def test_init_adapter_of_another_rank_is_refused(lora_run, tiny_roberta_dir):
    with pytest.raises(SystemExit) as excinfo:
        nli.main(["--base", str(tiny_roberta_dir), "--init-adapter", str(lora_run.output), "--lora-r", "8", "--dry-run"])
    assert str(excinfo.value.code).startswith("error: --init-adapter") and "rank" in str(excinfo.value.code)


def test_help_explains_every_option():
    parser = nli.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = parser.format_help()
    assert "print_trainable_parameters" in text  # why the report's total differs from PEFT's


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no --train and no --dry-run
        ["--train", "x.jsonl"],  # no held-out set
        ["--train", "x.jsonl", "--eval", "y.jsonl", "--eval-fraction", "0.2"],
        ["--train", "x.jsonl", "--eval-fraction", "0.2", "--warmup-ratio", "1"],  # would read as 1 step
        ["--train", "x.jsonl", "--eval-fraction", "0.2", "--warmup-ratio", "-0.1"],
    ],
)
def test_incomplete_command_lines_are_usage_errors(argv):
    with pytest.raises(SystemExit) as excinfo:
        nli.parse_args(argv)
    assert excinfo.value.code == 2
