"""Write valid adapters with random (non-zero) LoRA weights for a base: for tests and benchmarks that
need many adapters, or adapters of a size, without training them. Their predictions mean nothing."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from app.inference.adapter_loader import sha256_file
from app.inference.base_model import BaseSpec, build_classifier, fingerprint, resolve_base

NLI_LABELS = ("entailment", "neutral", "contradiction")


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
    files = {f: sha256_file(output / f) for f in ("adapter_model.safetensors", "adapter_config.json")}
    metadata = {
        "format_version": 1,
        "name": name,
        "task": "synthetic",
        "labels": list(labels),
        "base": {
            "id": spec.name,
            "display": spec.display_id,
            "model_type": model.config.model_type,
            "fingerprint": base_fp,
            "random_init": spec.random_init,
            "seed": spec.seed,
        },
        "method": "lora",
        "lora": {"r": rank, "alpha": alpha, "dropout": 0.0, "target_modules": list(target_modules)},
        "training": {"note": f"random weights (seed {seed}, scale {weight_scale}); not trained"},
        "metrics": {},
        "files": files,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="embedded", help="base id or directory (default: embedded)")
    parser.add_argument("--random-init", action="store_true", help="random base weights (seeded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random base")
    parser.add_argument("--output", type=Path, required=True, help="directory to write adapters into")
    parser.add_argument("--count", type=int, default=1, help="how many adapters (named synth-000...)")
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
