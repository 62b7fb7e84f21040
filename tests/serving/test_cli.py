"""loraswap-ray's lifecycle without a cluster: Ray and Serve replaced by recorders; a SIGTERM while
serving (or while the app is still starting) ends in Serve's and then Ray's shutdown, exit 0."""

from __future__ import annotations

import os
import signal

import pytest

from app.serving import cli


@pytest.fixture
def recorded(monkeypatch):
    import ray
    from ray import serve

    import app.serving.ray_app as ray_app

    calls: list = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("ray.init", kw)))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("ray.shutdown",)))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append(("serve.start", kw)))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append(("serve.shutdown",)))
    monkeypatch.setattr(ray_app, "build_app", lambda settings, **kw: ("app", kw))
    yield calls, monkeypatch, serve
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_sigterm_stops_serve_then_ray(recorded, when):
    calls, monkeypatch, serve = recorded

    def run(app, **kw):
        calls.append(("serve.run", app, kw))
        if when == "starting":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(serve, "run", run)
    if when == "serving":
        # The first wait of the serving loop: the signal arrives once the app runs.
        real_wait = cli.threading.Event.wait

        def wait_then_signal(self, timeout=None):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_wait(self, timeout)

        monkeypatch.setattr(cli.threading.Event, "wait", wait_then_signal)
    cli.main(["--replicas", "3", "--port", "8123", "--gpus-per-replica", "1", "--routing", "affinity"])
    names = [c[0] for c in calls]
    assert names == ["ray.init", "serve.start", "serve.run", "serve.shutdown", "ray.shutdown"]
    assert calls[1][1]["http_options"]["port"] == 8123
    _, (_, options), _ = calls[2]
    assert options["engine_replicas"] == 3 and options["engine_num_gpus"] == 1
    assert options["routing"] == "affinity"
    assert "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" not in os.environ
