"""Write valid adapters with random (non-zero) LoRA weights for a base: for tests and benchmarks that
need many adapters, or adapters of a size, without training them. Their predictions mean nothing."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from app.artifacts import CONFIG_FILE, MODEL_CONFIG_FILE, WEIGHTS_FILE, AdapterMetadata, BaseRecord, LoraRecord
from app.inference.base_model import BaseSpec, build_classifier, fingerprint, resolve_base
from training.nli_artifact import write_model_config
from training.nli_data import NLI_LABELS


def write_random_adapter(
    spec: BaseSpec,
    output: Path,
    *,
    name: str,
    labels: tuple[str, ...] = NLI_LABELS,
    rank: int = 16,
    alpha: int = 32,
    target_modules: tuple[str, ...] = ("query", "value"),
    seed: int = 0,
    weight_scale: float = 0.02,
    base_fingerprint: str | None = None,
) -> Path:
    """Build PEFT LoRA on the base with random A and B (PEFT starts B at zero, which would make
    every adapter equal to the base), save it in PEFT format with a metadata.json the server accepts.

    `base_fingerprint` skips re-hashing the base when the caller already knows it (many adapters).
    """
    model = build_classifier(spec, num_labels=len(labels), head_seed=seed)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    base_fp = base_fingerprint or fingerprint(model)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            task_type="SEQ_CLS", r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules)
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name or "classifier" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * weight_scale)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(output))
    write_model_config(model, output)
    files = [WEIGHTS_FILE, CONFIG_FILE, MODEL_CONFIG_FILE]
    for file_name in files:
        (output / file_name).chmod(0o644)  # safetensors writes 0600: a non-root server could not read it
    AdapterMetadata(
        name=name,
        task="synthetic",
        labels=list(labels),
        base=BaseRecord(
            id=spec.name,
            display=spec.display_id,
            model_type=model.config.model_type,
            fingerprint=base_fp,
            random_init=spec.random_init,
            seed=spec.seed,
        ),
        method="lora",
        lora=LoraRecord(r=rank, alpha=alpha, dropout=0.0, target_modules=list(target_modules)),
        training={"note": f"random weights (seed {seed}, scale {weight_scale}); not trained"},
        files=AdapterMetadata.checksums(output, files),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ).write(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic_adapter",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", default="embedded", help="base id or directory")
    parser.add_argument("--random-init", action="store_true", help="random base weights (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random base")
    parser.add_argument("--output", type=Path, required=True, help="directory to write adapters into")
    parser.add_argument("--count", type=int, default=1, help="how many adapters (named synth-000, synth-001, ...)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = parser.parse_args(argv)
    spec = resolve_base(args.base, random_init=args.random_init, seed=args.seed)
    base_fp = fingerprint(build_classifier(spec, num_labels=3))
    for i in range(args.count):
        name = f"synth-{i:03d}"
        write_random_adapter(spec, args.output / name, name=name, rank=args.rank, seed=i, base_fingerprint=base_fp)
        print(f"wrote {args.output / name}")


if __name__ == "__main__":
    main()
