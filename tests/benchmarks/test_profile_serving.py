"""The profile's bookkeeping: a sample goes to the innermost known part of the request path."""

from __future__ import annotations

from benchmarks.profile_serving import part_of, summarize

LINEAR = "Linear.forward (torch/nn/modules/linear.py:134)"
LORA = "MultiLoRALinear.forward (app/inference/lora.py:88)"
LAYER = "PackedEncoder._layer (app/inference/packed.py:190)"
HTTP = "RequestResponseCycle.run_asgi (uvicorn/protocols/http/httptools_impl.py:416)"
VALIDATE = "TypeAdapter.validate_python (pydantic/type_adapter.py:410)"


def test_innermost_known_frame_wins():
    assert part_of([LAYER, LORA, LINEAR]) == "GEMMs (nn.Linear)"  # the base GEMM inside the LoRA wrapper
    assert part_of([LAYER, LORA]) == "LoRA deltas"  # the wrapper's own work
    assert part_of([HTTP, "solve_dependencies (fastapi/dependencies/utils.py:700)", VALIDATE]) == (
        "request validation (pydantic)"
    )
    assert part_of([HTTP]) == "HTTP (uvicorn, httptools)"
    assert part_of(["something (elsewhere.py:1)"]) == "other"


def test_summarize_counts_samples_per_thread_and_part(tmp_path):
    raw = tmp_path / "pyspy.raw"
    raw.write_text(
        f"thread (0x1): loraswap-batcher;{LAYER};{LORA};{LINEAR} 7\n"
        f"thread (0x1): loraswap-batcher;{LAYER};{LORA} 2\n"
        f"thread (0x2): MainThread;{HTTP} 3\n"
        f"thread (0x2): MainThread;{HTTP} 1\n"
    )
    parts = summarize(raw)
    assert parts["loraswap-batcher"] == {"GEMMs (nn.Linear)": 7, "LoRA deltas": 2}
    assert parts["MainThread"] == {"HTTP (uvicorn, httptools)": 4}
