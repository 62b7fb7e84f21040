"""Describe the machine a run used (CPU, cores, load, busiest other processes, versions), and end each
run's results the same way (that description, the command, where the files go)."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    ticks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        ticks[int(stat.parent.name)] = (int(fields[11]) + int(fields[12]), command)  # utime + stime
    return ticks


def busiest_processes(window_s: float = 1.0, limit: int = 5) -> list[dict]:
    """Processes using CPU over the next `window_s` seconds (percent of one core), busiest first."""
    hertz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(window_s)
    after = _cpu_ticks()
    rows = []
    for pid, (ticks, command) in after.items():
        used = ticks - before.get(pid, (ticks, ""))[0]
        percent = 100.0 * used / hertz / window_s
        if percent >= 5.0 and pid != os.getpid():
            rows.append({"pid": pid, "cpu_percent": round(percent), "command": command[:100]})
    return sorted(rows, key=lambda r: -r["cpu_percent"])[:limit]


def describe(device: str = "cpu") -> dict:
    import torch
    import transformers
    import peft

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1_5_15": load_average(),
        "other_busy_processes": busiest_processes(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads_default": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_record(description: dict, module: str, argv: list[str] | None) -> dict:
    """What every results file ends with: the machine as it was before, the load after, the exact
    command (`argv` None: this process's own arguments) and when it finished."""
    arguments = sys.argv[1:] if argv is None else argv
    return {
        "machine": description,
        "load_average_after": load_average(),
        "command": f"python -m {module} " + shlex.join(arguments),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def footer(results: dict) -> list[str]:
    """The markdown lines a results table ends with: the load before and after, and the exact command."""
    return [
        "",
        f"Load average {results['machine']['load_average_1_5_15']} before, {results['load_average_after']} after.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]


def write_results(out: Path, stem: str, results: dict, render: Callable[[dict], str]) -> None:
    """`<stem>.json` and `<stem>.md` under `out`, and the markdown on stdout."""
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = render(results)
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    print(text)
