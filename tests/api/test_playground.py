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
        for icon in ("/favicon.ico", "/static/favicon.svg"):  # the page links the SVG; browsers also ask /favicon.ico
            answer = client.get(icon)
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("image/svg+xml")
            assert answer.content.startswith(b"<svg")
        assert "http" not in page.text.split("<script>")[1]  # the page's script fetches nothing remote
        samples = client.get("/static/fraud_samples.json").json()["samples"]
        assert client.post("/fraud", json=samples[0]["transaction"]).status_code == 200


ADMIN_TOKEN = "playground-test-token"


@pytest.fixture
def live_server(embedded_adapters):
    settings = Settings(adapters_dir=embedded_adapters, default_adapter="alpha", admin_token=ADMIN_TOKEN)
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
def test_playground_in_headless_chromium(live_server, embedded_adapters):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            answers: list[tuple[int, str]] = []
            page.on("response", lambda response: answers.append((response.status, response.url)))
            page.goto(live_server + "/")
            page.wait_for_selector("#adapter option[value='beta']", state="attached")
            page.wait_for_selector("#adapter-table tr[data-adapter='gamma']")
            # Nothing the page loads by itself is missing (the favicon included).
            assert [a for a in answers if a[0] >= 400] == []
            assert page.evaluate("fetch('/favicon.ico').then((r) => r.status)") == 200

            # One pair.
            page.select_option("#adapter", "beta")
            page.fill("#premise", "Two dogs run through a field.")
            page.fill("#hypothesis", "Animals are outside.")
            page.click("#classify")
            label = page.wait_for_selector("#nli-label").inner_text()
            assert "adapter beta" in label
            assert page.locator("#nli-result .bar").count() == 2  # beta is a 2-way adapter

            # A 422 says which field and why, not only its name.
            page.fill("#premise", "")
            page.click("#classify")
            error = page.wait_for_selector("#nli-result .error")
            assert "Error 422" in error.inner_text()
            reasons = [li.inner_text() for li in error.query_selector_all("li")]
            assert len(reasons) == 1 and reasons[0].startswith("premise: ")
            assert len(reasons[0]) > len("premise: ")  # the reason, from the answer's details

            # A batch: the picked adapter for lines without one, the named one for the others.
            page.fill("#pairs", "A man plays a guitar. | Someone makes music.\nA cat sleeps. | A cat is awake. | gamma")
            page.click("#classify-batch")
            page.wait_for_selector("#batch-table")
            cells = page.locator("#batch-table tr").all()[1:]
            assert [c.locator("td").nth(3).inner_text() for c in cells] == ["beta", "gamma"]
            page.screenshot(path=str(ARTIFACTS / "playground-batch.png"), full_page=True)
            page.fill("#pairs", "only a premise")
            page.click("#classify-batch")
            assert "Line 1" in page.wait_for_selector("#batch-result .error").inner_text()

            # Fraud: the bar is red exactly when the model says fraud, and the threshold is drawn and named.
            page.wait_for_selector("#sample option[value='1']", state="attached")
            verdicts = set()
            for sample in ("0", "1"):
                page.select_option("#sample", sample)
                with page.expect_response(lambda r: r.url.endswith("/fraud")) as scored:
                    page.click("#score")
                body = scored.value.json()
                verdict = page.wait_for_selector("#fraud-verdict").inner_text()
                assert verdict.startswith("FRAUD" if body["is_fraud"] else "not fraud")
                assert "threshold" in verdict and body["model_version"] in page.inner_text("#fraud-result")
                fill = page.locator("#fraud-result .bar .fill").evaluate("(e) => getComputedStyle(e).backgroundColor")
                assert fill == ("rgb(198, 40, 40)" if body["is_fraud"] else "rgb(31, 157, 85)")
                left = page.locator("#fraud-result .bar .threshold").evaluate("(e) => e.style.left")
                assert left == f"{100 * body['threshold']:.2f}%"
                verdicts.add(body["is_fraud"])
                if body["is_fraud"]:
                    page.screenshot(path=str(ARTIFACTS / "playground-fraud.png"), full_page=True)
            assert verdicts == {True, False}, "the samples show one transaction of each kind"

            page.fill("#transaction", '{"Time": 1}')
            page.click("#score")
            error = page.wait_for_selector("#fraud-result .error")
            assert "Error 422" in error.inner_text()
            # One line per reason with every field it applies to: the 29 missing fields on one line.
            reasons = [li.inner_text() for li in error.query_selector_all("li")]
            assert len(reasons) == 1 and reasons[0].startswith("V1, V2, ") and "Amount: " in reasons[0]

            # Adapter management: the table shows each adapter's tier (or state), unload and load send the token.
            # Tiers change with traffic (the batch above loaded gamma): refresh the table, then compare.
            with page.expect_response(lambda r: r.url.endswith("/adapters") and r.request.method == "GET"):
                page.click("#refresh-adapters")
            page.wait_for_load_state("networkidle")
            listed = page.evaluate("fetch('/adapters').then((r) => r.json())")["adapters"]
            column = "tier" if "tier" in listed[0] else "state"
            assert column in page.inner_text("#adapter-table tr >> nth=0")
            gamma = next(a for a in listed if a["name"] == "gamma")
            assert page.inner_text("#adapter-table tr[data-adapter='gamma'] .state") == str(gamma[column])

            page.fill("#admin-token", "wrong")
            page.click("#adapter-table button[data-unload='gamma']")
            assert "Error 403" in page.wait_for_selector("#admin-result .error").inner_text()
            page.fill("#admin-token", ADMIN_TOKEN)
            page.click("#adapter-table button[data-unload='gamma']")
            assert "unloaded gamma" in page.wait_for_selector("#admin-done").inner_text()
            page.wait_for_selector("#adapter-table tr[data-adapter='gamma']", state="detached")
            assert page.locator("#adapter option[value='gamma']").count() == 0

            page.fill("#load-name", "gamma2")
            page.fill("#load-path", str(embedded_adapters / "gamma"))
            page.click("#load-adapter")
            assert "loaded gamma2" in page.wait_for_selector("#admin-done:has-text('gamma2')").inner_text()
            page.wait_for_selector("#adapter-table tr[data-adapter='gamma2']")
            page.wait_for_selector("#adapter option[value='gamma2']", state="attached")

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
