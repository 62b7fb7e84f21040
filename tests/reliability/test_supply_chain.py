"""Supply chain: every dependency, direct and transitive, is pinned with == in constraints.txt (torch in the
Makefile and Dockerfile), every install goes through those pins, the pins satisfy pyproject, and the
service loads artifacts only from safetensors or from joblib files whose sha256 matched their manifest.

Tamper tests of the artifacts themselves: tests/inference/test_fraud_scorer.py (a tampered joblib is never
unpickled), tests/inference/test_adapter_loader.py (pickle adapters refused), and
tests/reliability/test_faults.py (malicious pickles through the running app)."""

from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAKEFILE = (REPO / "Makefile").read_text()
DOCKERFILE = (REPO / "Dockerfile").read_text()
CI = (REPO / ".ci/run").read_text()
TORCH_PIN = re.compile(r"torch==\d+(\.\d+)+")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, operator, version = line.partition("==")
        assert operator and version and not re.search(r"[<>~!,;*]", version), f"not an exact pin: {line!r}"
        pins[normalise(name)] = version
    return pins


RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
DEV = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]


@pytest.mark.parametrize("requirement", RUNTIME + DEV, ids=lambda r: r.name)
def test_every_dependency_is_pinned_exactly_and_the_pin_satisfies_pyproject(requirement):
    name = normalise(requirement.name)
    if name == "torch":  # installed first, by its own pin (CPU or CUDA wheels from different indexes)
        pins = [m.group(0) for m in TORCH_PIN.finditer(MAKEFILE + DOCKERFILE)]
        assert pins and len(set(pins)) == 1, "torch must be pinned with == in the Makefile and the Dockerfile"
        version = pins[0].split("==")[1]
    else:
        version = constraints().get(name)
        assert version is not None, f"{requirement.name} is not pinned in constraints.txt"
    assert requirement.specifier.contains(Version(version), prereleases=True), (
        f"constraints.txt pins {requirement.name}=={version}, outside pyproject's {requirement.specifier}"
    )


def _closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the installed roots pull in (markers evaluated here, extras followed)."""
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    stack = [(r.name, frozenset(r.extras)) for r in roots]
    while stack:
        name, extras = stack.pop()
        if (normalise(name), extras) in seen:
            continue
        seen.add((normalise(name), extras))
        names.add(normalise(name))
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in (extras or {""})):
                stack.append((child.name, frozenset(child.extras)))
    return names


def test_transitive_dependencies_are_pinned_too():
    """An unpinned transitive dependency makes two installs of the same commit differ."""
    missing = sorted(_closure(RUNTIME + DEV) - set(constraints()) - {"torch"})  # torch: its own pin
    assert missing == [], f"not pinned in constraints.txt: {missing}"


def test_installed_runtime_versions_are_the_pinned_ones():
    pins = constraints()
    drift = []
    for requirement in RUNTIME:
        name = normalise(requirement.name)
        if name == "torch":
            continue
        installed = distribution(name).version
        if installed != pins[name]:
            drift.append(f"{name}: installed {installed}, pinned {pins[name]}")
    assert drift == []


def test_every_install_goes_through_the_pins():
    installs = [line for line in MAKEFILE.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs, "the Makefile installs nothing?"
    for line in installs:
        assert "-c constraints.txt" in line or "$(TORCH)" in line, f"unpinned install in the Makefile: {line.strip()}"
    assert re.search(r"^TORCH \?= torch==", MAKEFILE, re.MULTILINE)
    for line in (line for line in DOCKERFILE.splitlines() if "pip install" in line):
        pinned = "-c constraints.txt" in line or TORCH_PIN.search(line)
        assert pinned, f"unpinned install in the Dockerfile: {line.strip()}"
    assert "pip install" not in CI, ".ci/run must install through `make` (the pinned path) only"
    assert re.search(r"^make test$", CI, re.MULTILINE)


# -- what the service deserialises ------------------------------------------------------------------------

# Calls that deserialise: module.load/loads of a serialisation library (safetensors.torch.load among
# them), safetensors' load_file, and transformers' from_pretrained.
SERIALISERS = {"safetensors.torch", "safetensors", "pickle", "joblib", "skops", "skops.io", "torch", "np", "numpy", "dill", "cloudpickle", "marshal", "yaml", "shelve", "json"}


def _calls(path: Path) -> list[tuple[str, int, ast.Call]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        if (owner in SERIALISERS and name in {"load", "loads", "Unpickler", "read_pickle", "open"}) or name in {
            "load_file",
            "from_pretrained",
            "Unpickler",
        }:
            found.append((f"{owner}.{name}" if owner else name, node.lineno, node))
    return found


def test_the_service_deserialises_only_safetensors_json_and_verified_joblib():
    allowed = {
        ("adapter_loader.py", "safetensors.torch.load"),  # the weights file's bytes, read once
        ("adapter_loader.py", "json.loads"),
        ("fraud_scorer.py", "skops.io.load"),  # after the sha256 check, below; never unpickles
        ("base_model.py", "AutoConfig.from_pretrained"),  # config.json
        ("base_model.py", "AutoTokenizer.from_pretrained"),  # tokenizer files (JSON, text)
        ("base_model.py", "AutoModelForSequenceClassification.from_pretrained"),  # see the next test
    }
    seen = set()
    for path in sorted((REPO / "app").rglob("*.py")):
        for call, line, _ in _calls(path):
            key = (path.name, call)
            assert key in allowed or call in ("json.loads", "json.load"), f"{path.name}:{line} calls {call}"
            seen.add(key)
    assert {("fraud_scorer.py", "skops.io.load"), ("adapter_loader.py", "safetensors.torch.load")} <= seen  # the scan works
    source = (REPO / "app/inference/fraud_scorer.py").read_text()
    assert source.index("sha256_hex(artifact)") < source.index("skops.io.load(artifact")
    assert "pickle" not in {name for path in (REPO / "app").rglob("*.py") for name in _imports(path)}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_base_weights_are_loaded_from_safetensors_only():
    path = REPO / "app/inference/base_model.py"
    for call, line, node in _calls(path):
        if call.startswith("AutoModel"):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert keywords.get("use_safetensors") == "True", f"base_model.py:{line}"
