"""Held-out accuracy of an adapter through the serving engine (what `/nli` computes), not through PEFT.

examples (the data files as their publishers ship them; docs/training.md, "Getting the data"):
    python -m training.evaluate --adapter mnli --data multinli_1.0/multinli_1.0_dev_matched.jsonl --eval-fraction 0.2 --split-seed 13
    python -m training.evaluate --adapter rte --data RTE/dev.tsv          # every row of the file
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from app.config import Settings
from app.inference.base_model import resolve_base
from app.inference.engine import NLIEngine
from training.nli_data import read_pairs, split_examples



class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The examples in the description as written, and every option's default (but None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--adapter", required=True, help="adapter name (a directory under --adapters-dir)")
    parser.add_argument(
        "--adapters-dir", type=Path, help="where adapters live (default: the repository's adapters/)"
    )
    parser.add_argument("--data", type=Path, required=True, help="pairs in any format training.nli reads")
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=None,
        help="score only the held-out part of this split (as training made it); without it, every row",
    )
    parser.add_argument("--split-seed", type=int, default=13, help="seed of that split")
    parser.add_argument("--base", default="embedded", help="base the adapter was trained on")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=Settings.model_fields["max_seq_len_tokens"].default,
        help="token cut; the default is the server's (LORASWAP_MAX_SEQ_LEN_TOKENS)",
    )
    args = parser.parse_args(argv)

    examples = read_pairs(args.data).examples
    if args.eval_fraction:
        _, examples = split_examples(examples, args.eval_fraction, args.split_seed)
    engine = NLIEngine(resolve_base(args.base), device="cpu", max_seq_len=args.max_seq_len)
    adapters_dir = args.adapters_dir if args.adapters_dir is not None else REPO_ROOT / "adapters"
    adapter = engine.read_adapter(args.adapter, adapters_dir / args.adapter)
    started, correct = time.perf_counter(), 0
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        encoded = engine.encode([x.premise for x in chunk], [x.hypothesis for x in chunk])
        for example, probs in zip(chunk, engine.run(encoded, [adapter] * len(chunk))):
            correct += adapter.labels[max(range(len(probs)), key=probs.__getitem__)] == example.label
    print(
        f"{args.adapter}: served accuracy {correct}/{len(examples)} = {correct / len(examples):.4f} "
        f"(fp32, max {args.max_seq_len} tokens, {time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
