"""Hostile input, table-driven: each body gets its documented 4xx (never a 5xx, never a dropped
connection), an error body that is strict JSON and small, and the server keeps serving; the body size
is capped before parsing; memory stays bounded through a burst of multi-megabyte bodies."""

from __future__ import annotations

import gc
import json
import threading
import time

import psutil
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.reliability.conftest import HYPOTHESIS, PREMISE, copy_adapters, settings_for, well_formed

MB = 1024 * 1024
MAX_REQUEST_BYTES = 8 * MB  # the default of LORASWAP_MAX_REQUEST_BYTES
TX = {"Time": 10.0, **{f"V{i}": 0.1 * i for i in range(1, 29)}, "Amount": 12.5}
GOOD_PAIR = {"premise": PREMISE, "hypothesis": HYPOTHESIS}
ELAPSED: dict[str, float] = {}


@pytest.fixture(scope="module")
def client(embedded_adapters, tmp_path_factory):
    root = copy_adapters(embedded_adapters, tmp_path_factory.mktemp("hostile-adapters"))
    settings = settings_for(root, max_request_bytes=MAX_REQUEST_BYTES, max_queue_wait_ms=60_000)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def documented(client) -> dict[tuple[str, str], set[int]]:
    paths = client.get("/openapi.json").json()["paths"]
    return {(m.upper(), p): {int(s) for s in op["responses"]} for p, ops in paths.items() for m, op in ops.items()}


def strict_json(text: str):
    """json.loads that refuses NaN and +-Infinity, as a strict client (JavaScript's JSON.parse) would."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def raw(text: str) -> bytes:
    return text.encode()


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def many(field: str, item: dict, count: int) -> bytes:
    """`{field: [item, item, ...]}` built by joining one serialised item (json.dumps of the list is slow)."""
    return ('{"' + field + '": [' + ",".join([json.dumps(item)] * count) + "]}").encode()


def fraud_with(field: str, literal: str) -> bytes:
    body = json.dumps({**TX, field: "__X__"})
    return body.replace('"__X__"', literal).encode()


def chunks(total: int, size: int = 256 * 1024):
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


JSON = "application/json"

# (id, method, path, body builder, content type, expected status). Builders run lazily, in the test.
CASES = [
    # sizes
    ("3 MB premise", "POST", "/nli", lambda: dumps({"premise": "x" * 3 * MB, "hypothesis": "h"}), JSON, 422),
    ("3 MB hypothesis in a batch", "POST", "/nli/batch", lambda: dumps({"pairs": [{"premise": "p", "hypothesis": "y" * 3 * MB}]}), JSON, 422),
    ("3 MB adapter name", "POST", "/nli", lambda: dumps({**GOOD_PAIR, "adapter": "a" * 3 * MB}), JSON, 422),
    ("3 MB adapter path", "PUT", "/adapters/big", lambda: dumps({"path": "p" * 3 * MB}), JSON, 422),
    ("12 MB body with Content-Length", "POST", "/nli", lambda: dumps({"premise": "x" * 12 * MB, "hypothesis": "h"}), JSON, 413),
    ("12 MB body streamed without length", "POST", "/fraud", lambda: chunks(12 * MB), JSON, 413),
    ("100,000-pair batch", "POST", "/nli/batch", lambda: many("pairs", GOOD_PAIR, 100_000), JSON, 413),
    ("100,000 short pairs (under the size cap)", "POST", "/nli/batch", lambda: many("pairs", {"premise": "p", "hypothesis": "h"}, 100_000), JSON, 422),
    ("100,000 empty pairs", "POST", "/nli/batch", lambda: many("pairs", {}, 100_000), JSON, 422),
    ("100,000-transaction batch", "POST", "/fraud/batch", lambda: many("transactions", TX, 100_000), JSON, 413),
    ("100,000 empty transactions", "POST", "/fraud/batch", lambda: many("transactions", {}, 100_000), JSON, 422),
    ("500,000 unknown keys", "POST", "/fraud", lambda: raw("{" + ",".join(f'"k{i}":0' for i in range(500_000)) + "}"), JSON, 422),
    # structure
    ("100,000 levels of [", "POST", "/nli", lambda: b"[" * 100_000, JSON, 422),
    ("100,000 levels of {", "POST", "/fraud", lambda: b'{"a":' * 100_000, JSON, 422),
    ("nesting inside a field", "POST", "/nli", lambda: raw('{"premise": ' + "[" * 5000 + "]" * 5000 + ', "hypothesis": "h"}'), JSON, 422),
    ("truncated JSON", "POST", "/nli", lambda: raw('{"premise": "p", "hyp'), JSON, 422),
    ("empty body", "POST", "/nli/batch", lambda: b"", JSON, 422),
    ("body is null", "POST", "/nli", lambda: raw("null"), JSON, 422),
    ("duplicate keys", "POST", "/nli", lambda: raw('{"premise": "p", "premise": "", "hypothesis": "h"}'), JSON, 422),
    # encodings
    ("invalid UTF-8", "POST", "/nli", lambda: b'{"premise": "t\xc3\x28", "hypothesis": "h"}', JSON, 422),
    ("overlong UTF-8 for /", "POST", "/nli", lambda: b'{"premise": "\xc0\xaf", "hypothesis": "h"}', JSON, 422),
    ("UTF-16 BOM", "POST", "/nli", lambda: b"\xff\xfe{\x00}\x00", JSON, 422),
    ("lone surrogate escape", "POST", "/nli", lambda: raw('{"premise": "\\ud800", "hypothesis": "h"}'), JSON, 422),
    ("latin-1 body declared as latin-1", "POST", "/nli", lambda: '{"premise": "caf\xe9", "hypothesis": "h"}'.encode("latin-1"), "application/json; charset=latin-1", 422),
    # content types
    ("text/plain", "POST", "/nli", lambda: dumps(GOOD_PAIR), "text/plain", 422),
    ("form-urlencoded", "POST", "/nli", lambda: raw("premise=a&hypothesis=b"), "application/x-www-form-urlencoded", 422),
    ("multipart", "POST", "/fraud", lambda: raw("--x\r\nContent-Disposition: form-data; name=Time\r\n\r\n1\r\n--x--\r\n"), "multipart/form-data; boundary=x", 422),
    ("xml", "POST", "/fraud/batch", lambda: raw("<transactions/>"), "application/xml", 422),
    ("no content type", "POST", "/nli", lambda: dumps(GOOD_PAIR), None, 422),
    ("bogus content type", "PUT", "/adapters/x", lambda: dumps({"path": "alpha"}), "application/json\x7f; x", 422),
    # numbers
    ("NaN", "POST", "/fraud", lambda: fraud_with("V4", "NaN"), JSON, 422),
    ("Infinity", "POST", "/fraud", lambda: fraud_with("V5", "Infinity"), JSON, 422),
    ("-Infinity", "POST", "/fraud", lambda: fraud_with("V6", "-Infinity"), JSON, 422),
    ("NaN in a batch item", "POST", "/fraud/batch", lambda: raw('{"transactions": [' + fraud_with("V1", "NaN").decode() + "]}"), JSON, 422),
    ("NaN as premise", "POST", "/nli", lambda: raw('{"premise": NaN, "hypothesis": "h"}'), JSON, 422),
    ("Infinity as adapter path", "PUT", "/adapters/x", lambda: raw('{"path": Infinity}'), JSON, 422),
    ("1e309", "POST", "/fraud", lambda: fraud_with("Amount", "1e309"), JSON, 422),
    ("-1e309", "POST", "/fraud", lambda: fraud_with("V11", "-1e309"), JSON, 422),
    ("10**400 as an integer literal", "POST", "/fraud", lambda: fraud_with("V2", "1" + "0" * 400), JSON, 422),
    ("an integer of 5,000 digits", "POST", "/fraud", lambda: fraud_with("V3", "9" * 5000), JSON, 422),
    ("5e307 (finite, overflows the scaler)", "POST", "/fraud", lambda: fraud_with("V28", "5.3e307"), JSON, 422),
    ("1e300 in a batch", "POST", "/fraud/batch", lambda: raw('{"transactions": [' + fraud_with("V7", "1e300").decode() + "]}"), JSON, 422),
    ("negative zero Amount is zero", "POST", "/fraud", lambda: fraud_with("Amount", "-0.0"), JSON, 200),
    ("negative zero Time is zero", "POST", "/fraud", lambda: fraud_with("Time", "-0"), JSON, 200),
    ("number as premise", "POST", "/nli", lambda: dumps({"premise": 1e308, "hypothesis": "h"}), JSON, 422),
    # control characters
    ("NUL premise", "POST", "/nli", lambda: dumps({"premise": "\x00", "hypothesis": "h"}), JSON, 200),
    ("bidi override and zero-width", "POST", "/nli", lambda: dumps({"premise": "\u202e\u200bpay\u2066", "hypothesis": "h"}), JSON, 200),
    ("C0 and C1 controls only", "POST", "/nli", lambda: dumps({"premise": "\x07\x1b[2J\x85", "hypothesis": "\x01"}), JSON, 200),
    ("whitespace only", "POST", "/nli", lambda: dumps({"premise": "\u2003\u3000\n\t", "hypothesis": "h"}), JSON, 422),
    # names and paths
    ("adapter ../", "POST", "/nli", lambda: dumps({**GOOD_PAIR, "adapter": "../alpha"}), JSON, 404),
    ("adapter %2e%2e", "POST", "/nli", lambda: dumps({**GOOD_PAIR, "adapter": "%2e%2e/alpha"}), JSON, 404),
    ("adapter absolute path", "POST", "/nli", lambda: dumps({**GOOD_PAIR, "adapter": "/etc/passwd"}), JSON, 404),
    ("adapter with NUL", "POST", "/nli", lambda: dumps({**GOOD_PAIR, "adapter": "alpha\x00"}), JSON, 404),
    ("pair adapter ../ in a batch", "POST", "/nli/batch", lambda: dumps({"pairs": [{**GOOD_PAIR, "adapter": "../../beta"}]}), JSON, 404),
    ("PUT path /etc", "PUT", "/adapters/evil", lambda: dumps({"path": "/etc"}), JSON, 403),
    ("PUT path ../../..", "PUT", "/adapters/evil", lambda: dumps({"path": "../../../../../../etc"}), JSON, 403),
    ("PUT path with NUL", "PUT", "/adapters/evil", lambda: dumps({"path": "alpha\x00/../../etc"}), JSON, 403),
    ("PUT path ~root", "PUT", "/adapters/evil", lambda: dumps({"path": "~root/.ssh"}), JSON, 403),
    ("PUT path %2e%2e (a literal name)", "PUT", "/adapters/evil", lambda: dumps({"path": "%2e%2e/%2e%2e/etc"}), JSON, 404),
    ("PUT path empty", "PUT", "/adapters/evil", lambda: dumps({"path": ""}), JSON, 422),
]


@pytest.mark.parametrize(
    "method, path, build, content_type, expected",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_hostile_input_gets_its_status_and_the_server_keeps_serving(
    client, documented, request, figures, method, path, build, content_type, expected
):
    headers = {"content-type": content_type} if content_type else {}
    started = time.perf_counter()
    response = client.request(method, path, content=build(), headers=headers)
    ELAPSED[request.node.callspec.id] = time.perf_counter() - started
    record_case_figures(figures)

    assert response.status_code == expected, response.text[:500]
    assert response.status_code in documented[(method, path if not path.startswith("/adapters/") else "/adapters/{name}")]
    body = strict_json(response.text)  # a NaN in an error body would fail here
    if expected >= 400:
        assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
        assert len(response.content) < 64 * 1024, "the error body must not echo or amplify the input"
    follow_up = client.post("/nli", json=GOOD_PAIR)
    assert follow_up.status_code == 200 and well_formed(follow_up.json(), "alpha")


def record_case_figures(figures) -> None:
    """The figures of the table cases run so far (all of them by the end of a full run, in any order)."""
    figures("cases", len(ELAPSED))
    figures("slowest_case_s", round(max(ELAPSED.values()), 3))
    figures("slowest_case", max(ELAPSED, key=ELAPSED.get))
    figures("median_case_s", round(sorted(ELAPSED.values())[len(ELAPSED) // 2], 4))


@pytest.mark.parametrize("path", ["/nli", "/nli/batch", "/fraud", "/fraud/batch"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_give_a_422_whose_body_is_strict_json(client, path, literal):
    """The GUIDE's trap: FastAPI echoes the input in its 422, and a NaN there makes the error itself
    unserialisable (a 500 or a dropped connection). Every route, every literal."""
    bodies = {
        "/nli": f'{{"premise": {literal}, "hypothesis": "h"}}',
        "/nli/batch": f'{{"pairs": [{{"premise": "p", "hypothesis": {literal}}}]}}',
        "/fraud": fraud_with("V9", literal).decode(),
        "/fraud/batch": '{"transactions": [' + fraud_with("Amount", literal).decode() + "]}",
    }
    response = client.post(path, content=bodies[path], headers={"content-type": JSON})
    assert response.status_code == 422
    body = strict_json(response.text)
    assert body["error"]["code"] == "invalid_input"
    assert "NaN" not in response.text and "Infinity" not in response.text
    assert client.post("/nli", json=GOOD_PAIR).status_code == 200


def test_body_size_is_capped_before_parsing(client):
    """A body over LORASWAP_MAX_REQUEST_BYTES gets 413 whether it declares its length or streams
    without one; one byte under the cap is parsed (and judged on its content)."""
    at_cap = b'{"premise": "' + b"x" * (MAX_REQUEST_BYTES - 40) + b'", "hypothesis": "h"}'
    assert len(at_cap) <= MAX_REQUEST_BYTES
    assert client.post("/nli", content=at_cap, headers={"content-type": JSON}).status_code == 422
    over = at_cap + b" " * (MAX_REQUEST_BYTES - len(at_cap) + 1)
    declared = client.post("/nli", content=over, headers={"content-type": JSON})
    assert declared.status_code == 413
    assert declared.json()["error"]["details"] == {"max_request_bytes": MAX_REQUEST_BYTES}
    streamed = client.post("/nli", content=chunks(len(over)), headers={"content-type": JSON})
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"
    lying = client.post("/nli", content=chunks(2 * MAX_REQUEST_BYTES), headers={"content-type": JSON, "content-length": "10"})
    assert lying.status_code in (413, 422)
    assert client.post("/nli", json=GOOD_PAIR).status_code == 200


def test_memory_stays_bounded_through_a_burst_of_large_bodies(client, figures):
    """20 bodies of 6 MB (parsed, then refused) and 20 of 12 MB (refused by size): resident memory
    after the burst is within a generous bound of what it was before. The client is in the same
    process, so the peak counts its copy of each body too."""
    process = psutil.Process()
    parsed = dumps({"premise": "x" * 6 * MB, "hypothesis": "h"})
    oversized = dumps({"premise": "x" * 12 * MB, "hypothesis": "h"})
    cold = process.memory_info().rss
    for _ in range(3):  # warm-up: allocator arenas and caches reach their working size
        client.post("/nli", content=parsed, headers={"content-type": JSON})
    gc.collect()
    before = process.memory_info().rss
    peak = before
    sampling = threading.Event()

    def sample() -> None:  # the peak happens inside a request, not between two
        nonlocal peak
        while not sampling.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(20):
        assert client.post("/nli", content=parsed, headers={"content-type": JSON}).status_code == 422
        assert client.post("/nli", content=oversized, headers={"content-type": JSON}).status_code == 413
    sampling.set()
    sampler.join()
    gc.collect()
    after = process.memory_info().rss
    growth_mb = (after - before) / MB
    figures("burst_bodies", 40)
    figures("burst_input_mb", round(20 * (len(parsed) + len(oversized)) / MB))
    figures("rss_before_mb", round(before / MB))
    figures("rss_growth_mb", round(growth_mb, 1))
    figures("rss_growth_with_warm_up_mb", round((after - cold) / MB, 1))
    figures("rss_peak_over_before_mb", round((peak - before) / MB, 1))
    assert growth_mb < 100, f"resident memory grew by {growth_mb:.0f} MB over a burst of 40 large bodies"
    assert client.post("/nli", json=GOOD_PAIR).status_code == 200
