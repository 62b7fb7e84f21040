"""The playground at `/` and the offline `/docs`, in a real headless Chromium against a real server."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


def test_docs_and_playground_need_no_cdn(embedded_adapters):
    settings = Settings(adapters_dir=embedded_adapters, default_adapter="alpha")
    with TestClient(create_app(settings)) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert "cdn" not in docs.text.lower() and "/static-offline-docs/swagger-ui-bundle.js" in docs.text
        assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
        assert client.get("/static-offline-docs/swagger-ui.css").status_code == 200
        page = client.get("/")
        assert page.status_code == 200 and "loraswap playground" in page.text
        assert "http" not in page.text.split("<script>")[1]  # the page's script fetches nothing remote
        samples = client.get("/static/fraud_samples.json").json()["samples"]
        assert client.post("/fraud", json=samples[0]["transaction"]).status_code == 200


@pytest.fixture
def live_server(embedded_adapters):
    settings = Settings(adapters_dir=embedded_adapters, default_adapter="alpha")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(600):
        if server.started:
            started.set()
            break
        thread.join(0.1)
    assert started.is_set(), "server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install chromium); .ci/run installs it")
def test_playground_in_headless_chromium(live_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.wait_for_selector("#adapter option[value='beta']", state="attached")
            page.select_option("#adapter", "beta")
            page.fill("#premise", "Two dogs run through a field.")
            page.fill("#hypothesis", "Animals are outside.")
            page.click("#classify")
            label = page.wait_for_selector("#nli-label").inner_text()
            assert "adapter beta" in label
            assert page.locator("#nli-result .bar").count() == 2  # beta is a 2-way adapter

            page.wait_for_selector("#sample option[value='1']", state="attached")
            page.select_option("#sample", "1")
            page.click("#score")
            verdict = page.wait_for_selector("#fraud-verdict").inner_text()
            assert "threshold" in verdict and "model" in verdict

            page.fill("#transaction", '{"Time": 1}')
            page.click("#score")
            assert "Error 422" in page.wait_for_selector("#fraud-result .error").inner_text()

            shot = ARTIFACTS / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nplayground screenshot: {shot} ({shot.stat().st_size} bytes)")

            page.goto(live_server + "/docs")
            page.wait_for_selector(".opblock-summary-path[data-path='/nli/batch']", timeout=20_000)
            docs_shot = ARTIFACTS / "docs.png"
            page.screenshot(path=str(docs_shot))
            print(f"docs screenshot: {docs_shot}")
        finally:
            browser.close()
