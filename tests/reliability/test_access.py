"""Access: adapter management needs the configured token (401 without, 403 wrong), or with no token
comes from loopback only, whatever the headers claim; reading stays open. No route reads or writes a
file outside the configured roots: not through the PUT body's path (absolute, `..`, `~`, NUL, symlinked
directories or files), not through percent-encoded segments in the route, not through /static."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.reliability.conftest import HYPOTHESIS, PREMISE, asgi_call, copy_adapters, settings_for

TOKEN = "s3cret-token"
PROBE = '{"path": "spare/gamma"}'


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots, with its size and mtime (symlinks not followed)."""
    entries = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            info = path.lstat()
            entries[str(path)] = (info.st_size, info.st_mtime_ns)
    return entries


@pytest.fixture(scope="module")
def layout(embedded_adapters, tmp_path_factory):
    base = tmp_path_factory.mktemp("access")
    root = copy_adapters(embedded_adapters, base / "root", names=("alpha", "beta"))
    spare = copy_adapters(embedded_adapters, root / "spare", names=("gamma",))
    outside = copy_adapters(embedded_adapters, base / "outside", names=("gamma",))
    (outside / "secret.txt").write_text("not for the API")
    os.symlink(outside / "gamma", spare / "link-out")  # a directory symlink leading out of the root
    os.symlink(spare / "gamma", spare / "link-in")  # one that stays inside
    shutil.copytree(spare / "gamma", spare / "file-link")
    (spare / "file-link" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "gamma" / "adapter_model.safetensors", spare / "file-link" / "adapter_model.safetensors")
    os.symlink(spare / "loop-b", spare / "loop-a")
    os.symlink(spare / "loop-a", spare / "loop-b")
    os.symlink(root, spare / "up")
    os.symlink("/etc", spare / "etc")
    return {"root": root, "outside": outside, "before": tree(root, outside)}


@pytest.fixture(autouse=True)
def no_file_is_written_or_changed(layout):
    """After each test of this module, whatever it attempted, the roots and the outside directory hold
    exactly the files they held before the module started."""
    yield
    assert tree(layout["root"], layout["outside"]) == layout["before"]


@pytest.fixture(scope="module")
def open_client(layout):
    """No admin token configured: management from loopback only."""
    with TestClient(create_app(settings_for(layout["root"], fraud_enabled=False, max_queue_wait_ms=60_000))) as client:
        yield client


@pytest.fixture(scope="module")
def token_client(layout):
    settings = settings_for(layout["root"], fraud_enabled=False, admin_token=TOKEN, max_queue_wait_ms=60_000)
    with TestClient(create_app(settings)) as client:
        yield client


def names(client) -> set[str]:
    return {a["name"] for a in client.get("/adapters").json()["adapters"]}


def call(client, method, path, body="", headers=None, host="testclient"):
    headers = {"content-type": "application/json", **(headers or {})}
    return asgi_call(client, method, path, body.encode(), headers, client_host=host)


# -- who may manage adapters -------------------------------------------------------------------------------

TOKEN_CASES = [
    ("no header", {}, "testclient", 401),
    ("empty bearer", {"authorization": "Bearer "}, "testclient", 401),
    ("basic scheme", {"authorization": f"Basic {TOKEN}"}, "testclient", 401),
    ("token without scheme", {"authorization": TOKEN}, "testclient", 401),
    ("wrong token", {"authorization": "Bearer nope"}, "testclient", 403),
    ("a prefix of the token", {"authorization": f"Bearer {TOKEN[:-1]}"}, "testclient", 403),
    ("the token and more", {"authorization": f"Bearer {TOKEN}x"}, "testclient", 403),
    ("token in another header", {"x-admin-token": TOKEN}, "testclient", 401),
    ("right token, loopback", {"authorization": f"Bearer {TOKEN}"}, "testclient", 200),
    ("right token, lower-case scheme", {"authorization": f"bearer {TOKEN}"}, "testclient", 200),
    ("right token, remote client", {"authorization": f"Bearer {TOKEN}"}, "203.0.113.7", 200),
    ("loopback without token", {}, "127.0.0.1", 401),
]


@pytest.mark.parametrize("headers, host, expected", [c[1:] for c in TOKEN_CASES], ids=[c[0] for c in TOKEN_CASES])
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_token_guards_management(token_client, method, headers, host, expected):
    before = names(token_client)
    body = PROBE if method == "PUT" else ""
    target = "/adapters/probe" if method == "PUT" else "/adapters/beta"
    status, _, _ = call(token_client, method, target, body, headers, host)
    assert status == expected
    restore = {"authorization": f"Bearer {TOKEN}"}
    if status == 200 and method == "PUT":
        assert call(token_client, "DELETE", "/adapters/probe", headers=restore)[0] == 200
    if status == 200 and method == "DELETE":
        assert call(token_client, "PUT", "/adapters/beta", '{"path": "beta"}', headers=restore)[0] == 200
    assert names(token_client) == before


LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "localhost", "testclient"]
REMOTE = ["203.0.113.7", "10.0.0.1", "0.0.0.0", "::", "example.com", "127.0.0.1.example.com", ""]
SPOOFS = [
    {"x-forwarded-for": "127.0.0.1"},
    {"x-real-ip": "127.0.0.1"},
    {"forwarded": "for=127.0.0.1"},
    {"host": "localhost"},
]


@pytest.mark.parametrize("host", LOOPBACK)
def test_without_a_token_loopback_may_manage(open_client, host):
    assert call(open_client, "PUT", "/adapters/probe", PROBE, host=host)[0] == 200
    assert call(open_client, "DELETE", "/adapters/probe", host=host)[0] == 200


@pytest.mark.parametrize("host", REMOTE)
@pytest.mark.parametrize("headers", [{}, *SPOOFS], ids=["plain", *[next(iter(h)) for h in SPOOFS]])
def test_without_a_token_remote_clients_may_not_manage_whatever_they_claim(open_client, host, headers):
    before = names(open_client)
    assert call(open_client, "PUT", "/adapters/probe", PROBE, headers, host)[0] == 403
    assert call(open_client, "DELETE", "/adapters/alpha", "", headers, host)[0] == 403
    assert names(open_client) == before


@pytest.mark.parametrize("fixture", ["open_client", "token_client"])
def test_reading_and_inference_stay_open_to_anyone(request, fixture):
    client = request.getfixturevalue(fixture)
    remote = "203.0.113.7"
    nli = f'{{"premise": "{PREMISE}", "hypothesis": "{HYPOTHESIS}"}}'
    for method, path, body in [
        ("GET", "/adapters", ""),
        ("GET", "/adapters/alpha", ""),
        ("POST", "/nli", nli),
        ("POST", "/nli/batch", f'{{"pairs": [{nli}]}}'),
        ("GET", "/healthz", ""),
        ("GET", "/readyz", ""),
        ("GET", "/metrics", ""),
        ("GET", "/openapi.json", ""),
    ]:
        assert call(client, method, path, body, host=remote)[0] == 200, path


# -- where adapters may be loaded from --------------------------------------------------------------------

PATH_CASES = [
    ("/etc", 403),
    ("/etc/passwd", 403),
    ("/", 403),
    ("/proc/self", 403),
    ("../../../../etc", 403),
    ("spare/../../", 403),
    (".", 403),
    ("spare/up", 403),  # a symlink to the root itself
    ("spare/etc", 403),  # a symlink to /etc
    ("spare/link-out", 403),  # a directory symlink to a valid adapter outside the root
    ("spare/file-link", 403),  # a directory inside whose weights file links outside
    ("spare/loop-a", 403),  # a symlink loop
    ("OUTSIDE", 403),  # the absolute path of a valid adapter outside the roots
    ("~", 403),
    ("~nosuchuser/adapters", 403),
    ("spare/gamma\x00", 403),
    ("spare\\..\\..\\etc", 404),  # backslashes are part of a name on POSIX
    ("%2e%2e/%2e%2e/etc", 404),  # percent signs too: nothing decodes the body's path
    ("spare/gamma/adapter_model.safetensors", 404),  # a file, not an adapter directory
    ("spare/link-in", 200),  # a symlink that stays inside the root is fine
]


@pytest.mark.parametrize("raw, expected", PATH_CASES, ids=[c[0].replace("\x00", "NUL") for c in PATH_CASES])
def test_put_paths_stay_inside_the_roots(open_client, layout, raw, expected):
    raw = str(layout["outside"] / "gamma") if raw == "OUTSIDE" else raw
    before = names(open_client)
    response = open_client.put("/adapters/probe", json={"path": raw})
    assert response.status_code == expected, response.text
    if expected == 200:
        assert response.json()["path"].startswith(str(layout["root"]))
        assert open_client.delete("/adapters/probe").status_code == 200
    else:
        assert "probe" not in names(open_client)
    assert names(open_client) == before


RAW_ROUTES = [
    ("PUT", "/adapters/..%2F..%2Fetc", PROBE, 404),
    ("PUT", "/adapters/%2e%2e", PROBE, 422),
    ("PUT", "/adapters/%2E%2E%2Fetc", PROBE, 404),
    ("PUT", "/adapters/alpha%00", PROBE, 422),
    ("PUT", "/adapters/%2Fetc%2Fpasswd", PROBE, 404),
    ("PUT", "/adapters/../adapters/probe2", PROBE, 404),
    ("DELETE", "/adapters/..%2Falpha", "", 404),
    ("DELETE", "/adapters/alpha%2F..", "", 404),
    ("DELETE", "/adapters/%61lpha%00", "", 404),  # no adapter has that name
    ("GET", "/adapters/..%2f..%2fetc%2fpasswd", "", 404),
    ("GET", "/adapters/%2e%2e", "", 404),
    ("GET", "/static/../../config.py", "", 404),
    ("GET", "/static/..%2f..%2fconfig.py", "", 404),
    ("GET", "/static/%2e%2e/%2e%2e/main.py", "", 404),
    ("GET", "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml", "", 404),
    ("GET", "/static//etc/passwd", "", 404),
    ("GET", "/../../../etc/passwd", "", 404),
]


@pytest.mark.parametrize("method, raw_path, body, expected", RAW_ROUTES, ids=[f"{m} {p}" for m, p, _, _ in RAW_ROUTES])
def test_encoded_segments_in_routes_reach_nothing(open_client, method, raw_path, body, expected):
    before = names(open_client)
    status, _, content = call(open_client, method, raw_path, body)
    assert status == expected, content[:300]
    assert b"root:" not in content and b"BaseSettings" not in content and b"[project]" not in content
    assert names(open_client) == before
    assert call(open_client, "GET", "/static/playground.html")[0] == 200  # the mount still serves its own files

