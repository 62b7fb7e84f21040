"""The naive baseline: one PeftModel with every adapter, `set_adapter` per request under a lock.

Written to be fast, not to lose: the model is loaded once, in eval mode, under inference_mode, in
bf16 on CUDA, with SDPA attention like the server; the forward runs in a worker thread so the event
loop keeps accepting requests; the adapter is only switched when it changes. What it cannot do is
put requests for different adapters in one forward: PEFT's active adapter is model-wide.

    python -m benchmarks.baselines.naive_peft --adapter mnli=adapters/mnli --adapter rte=adapters/rte
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from peft import PeftModel
from pydantic import BaseModel, Field
from safetensors import safe_open

from app.inference.base_model import BaseSpec, build_classifier, build_head, load_tokenizer, resolve_base

logger = logging.getLogger(__name__)

HEAD_PREFIX = "base_model.model.classifier."


class NLIRequest(BaseModel):
    premise: str = Field(min_length=1)
    hypothesis: str = Field(min_length=1)
    adapter: str | None = None


class NLIResponse(BaseModel):
    label: str
    scores: dict[str, float]
    adapter: str


@dataclass
class NaiveConfig:
    base: str = "embedded"
    random_init: bool = False
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> directory, first is the default
    device: str = "cpu"
    torch_threads: int = 0
    max_seq_len: int = 256


def load_peft_model(spec: BaseSpec, adapters: dict[str, Path]) -> tuple[PeftModel, dict[str, tuple[str, ...]]]:
    """Every adapter in one PeftModel (from_pretrained for the first, load_adapter for the others).

    PEFT copies the base's head for each adapter's `modules_to_save` and refuses a checkpoint whose
    head has another shape (RTE's two labels against MNLI's three), so such an adapter is loaded
    with `ignore_mismatched_sizes` and its head copy is replaced by one of the right size holding
    the checkpoint's weights; `set_adapter` then switches heads as usual.
    """
    labels = {
        name: tuple(json.loads((path / "metadata.json").read_text())["labels"]) for name, path in adapters.items()
    }
    names = list(adapters)
    model = build_classifier(spec, num_labels=len(labels[names[0]]))
    model.set_attn_implementation("sdpa")
    peft_model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    wrapper = peft_model.base_model.model.classifier  # PEFT's ModulesToSaveWrapper around the head
    for name in names[1:]:
        if len(labels[name]) == len(labels[names[0]]):
            peft_model.load_adapter(str(adapters[name]), adapter_name=name)
            continue
        with warnings.catch_warnings():
            # PEFT warns about the head it skipped; that head is replaced just below.
            warnings.filterwarnings("ignore", message=".*ignore_mismatched_sizes.*")
            peft_model.load_adapter(str(adapters[name]), adapter_name=name, ignore_mismatched_sizes=True)
        head = build_head(model.config, len(labels[name]))
        with safe_open(str(adapters[name] / "adapter_model.safetensors"), framework="pt") as handle:
            state = {
                key.removeprefix(HEAD_PREFIX): handle.get_tensor(key)
                for key in handle.keys()
                if key.startswith(HEAD_PREFIX)
            }
        head.load_state_dict(state, strict=True)
        wrapper.modules_to_save[name] = head
    peft_model.eval()
    return peft_model, labels


class NaiveServer:
    """Owns the model. Invariant: only one request at a time touches it (the lock), because the active
    adapter is state of the whole model."""

    def __init__(self, config: NaiveConfig):
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = torch.device(config.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        spec = resolve_base(config.base, random_init=config.random_init)
        self.tokenizer = load_tokenizer(spec)
        self.model, self.labels = load_peft_model(spec, config.adapters)
        self.model.to(self.device, dtype)
        self.default = next(iter(config.adapters))
        self.max_seq_len = config.max_seq_len
        self.lock = threading.Lock()

    def classify(self, premise: str, hypothesis: str, adapter: str) -> list[float]:
        with self.lock:
            if self.model.active_adapter != adapter:
                self.model.set_adapter(adapter)
            inputs = self.tokenizer(
                premise, hypothesis, truncation=True, max_length=self.max_seq_len, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**inputs).logits  # [1, labels]
                return torch.softmax(logits.float(), dim=-1)[0].tolist()


def create_app(config: NaiveConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.server = await anyio.to_thread.run_sync(NaiveServer, config)
        yield

    app = FastAPI(title="naive-peft baseline", lifespan=lifespan)

    @app.get("/readyz")
    async def get_readyz() -> dict:
        return {"ready": True}

    @app.post("/nli", response_model=NLIResponse)
    async def create_nli(body: NLIRequest) -> NLIResponse:
        server: NaiveServer = app.state.server
        name = body.adapter or server.default
        if name not in server.labels:
            raise HTTPException(404, f"no adapter named {name!r}")
        probabilities = await anyio.to_thread.run_sync(server.classify, body.premise, body.hypothesis, name)
        labels = server.labels[name]
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return NLIResponse(label=labels[best], scores=dict(zip(labels, probabilities)), adapter=name)

    return app


def _adapter_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("expected NAME=DIRECTORY")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded", help="base id or directory (default: embedded)")
    parser.add_argument("--random-init", action="store_true", help="random base weights (seeded, like the server)")
    parser.add_argument("--adapter", type=_adapter_arg, action="append", required=True, help="NAME=DIRECTORY, repeated")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens a pair is truncated to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    config = NaiveConfig(
        base=args.base,
        random_init=args.random_init,
        adapters=dict(args.adapter),
        device=args.device,
        torch_threads=args.torch_threads,
        max_seq_len=args.max_seq_len,
    )
    # One worker: more would each load the model (and still serialise on their own lock).
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
