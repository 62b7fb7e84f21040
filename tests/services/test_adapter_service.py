"""AdapterService's two guards alone: who may manage adapters (`authorize`: a bearer token when one is
configured, else loopback only) and which directories may be loaded (`resolve_path`: under a configured
root, symlinks resolved, no NUL). Table-driven, asserting error codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.errors import ServiceError
from app.services.adapter_registry import AdapterRegistry
from app.services.adapters import AdapterService
from tests.services.fakes import FakeDevice

TOKEN = "s3cret-token"


class NoLoader:
    """Neither guard loads anything: a call here is a bug."""

    def read_adapter(self, *args, **kwargs):
        raise AssertionError("the guards must not load an adapter")



def service(roots: list[Path], admin_token: str | None = None) -> AdapterService:
    return AdapterService(AdapterRegistry(NoLoader(), FakeDevice()), roots=roots, admin_token=admin_token)


def outcome(call) -> str:
    """'ok', or the code of the ServiceError raised."""
    try:
        call()
    except ServiceError as exc:
        return exc.code
    return "ok"


# -- authorize ------------------------------------------------------------------------------------------

# (id, configured token, Authorization header, client host, expected)
AUTHORIZE = [
    ("token: no header", TOKEN, None, "127.0.0.1", "unauthorized"),
    ("token: empty bearer", TOKEN, "Bearer ", "127.0.0.1", "unauthorized"),
    ("token: basic scheme", TOKEN, f"Basic {TOKEN}", "127.0.0.1", "unauthorized"),
    ("token: no scheme", TOKEN, TOKEN, "127.0.0.1", "unauthorized"),
    ("token: wrong token", TOKEN, "Bearer nope", "127.0.0.1", "forbidden"),
    ("token: a prefix of it", TOKEN, f"Bearer {TOKEN[:-1]}", "127.0.0.1", "forbidden"),
    ("token: it and more", TOKEN, f"Bearer {TOKEN}x", "127.0.0.1", "forbidden"),
    ("token: right, loopback", TOKEN, f"Bearer {TOKEN}", "127.0.0.1", "ok"),
    ("token: right, remote", TOKEN, f"Bearer {TOKEN}", "203.0.113.7", "ok"),
    ("token: right, no client address", TOKEN, f"Bearer {TOKEN}", None, "ok"),
    ("token: lower-case scheme", TOKEN, f"bearer {TOKEN}", "203.0.113.7", "ok"),
    ("token: loopback is not enough", TOKEN, None, "::1", "unauthorized"),
    ("no token: 127.0.0.1", None, None, "127.0.0.1", "ok"),
    ("no token: 127.8.9.10", None, None, "127.8.9.10", "ok"),
    ("no token: ::1", None, None, "::1", "ok"),
    ("no token: localhost", None, None, "localhost", "ok"),
    ("no token: the test client", None, None, "testclient", "ok"),
    ("no token: loopback with any header", None, "Bearer whatever", "127.0.0.1", "ok"),
    ("no token: remote", None, None, "203.0.113.7", "forbidden"),
    ("no token: private address", None, None, "10.0.0.1", "forbidden"),
    ("no token: 0.0.0.0", None, None, "0.0.0.0", "forbidden"),
    ("no token: ::", None, None, "::", "forbidden"),
    ("no token: a host name", None, None, "example.com", "forbidden"),
    ("no token: loopback-looking name", None, None, "127.0.0.1.example.com", "forbidden"),
    ("no token: empty address", None, None, "", "forbidden"),
    ("no token: no address", None, None, None, "forbidden"),
    ("no token: remote with a bearer", None, "Bearer anything", "203.0.113.7", "forbidden"),
    ("empty token is no token: loopback", "", None, "127.0.0.1", "ok"),
    ("empty token is no token: remote", "", "Bearer ", "203.0.113.7", "forbidden"),
]


@pytest.mark.parametrize(
    "admin_token, authorization, host, expected", [c[1:] for c in AUTHORIZE], ids=[c[0] for c in AUTHORIZE]
)
def test_authorize(tmp_path, admin_token, authorization, host, expected):
    guard = service([tmp_path], admin_token)
    assert outcome(lambda: guard.authorize(authorization, host)) == expected


# -- resolve_path ---------------------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path) -> dict[str, Path]:
    """root/good, a second root, and outside/good; symlinks that stay inside or lead out."""
    root, second, outside = tmp_path / "root", tmp_path / "second", tmp_path / "outside"
    for directory in (root / "good", root / "nested" / "deep", second / "other", outside / "good"):
        directory.mkdir(parents=True)
        (directory / "adapter_model.safetensors").write_bytes(b"weights")
    os.symlink(root / "good", root / "link-in")  # stays inside
    os.symlink(outside / "good", root / "link-out")  # a directory symlink leading out
    os.symlink(root, root / "up")  # the root itself
    os.symlink("/etc", root / "etc")
    (root / "file-link").mkdir()  # a directory inside whose weights file leads out
    os.symlink(outside / "good" / "adapter_model.safetensors", root / "file-link" / "adapter_model.safetensors")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    os.symlink(root, tmp_path / "root-link")  # a root configured through a symlink
    return {"root": root, "second": second, "outside": outside, "base": tmp_path}


# (id, raw path with {root}/{second}/{outside} placeholders, expected: a path relative to the base, or a code)
RESOLVE = [
    ("relative, inside", "good", "root/good"),
    ("absolute, inside", "{root}/good", "root/good"),
    ("nested", "nested/deep", "root/nested/deep"),
    ("relative, found under the second root", "other", "second/other"),
    ("dot segments that stay inside", "nested/../good", "root/good"),
    ("not there yet (the loader says so)", "missing", "root/missing"),
    ("symlink that stays inside", "link-in", "root/good"),
    ("under the second root, absolute", "{second}/other", "second/other"),
    ("relative from the first root into the second", "../second/other", "second/other"),
    ("the root itself", ".", "path_not_allowed"),
    ("empty", "", "path_not_allowed"),
    ("the root, absolute", "{root}", "path_not_allowed"),
    ("dot segments out", "../outside/good", "path_not_allowed"),
    ("dot segments far out", "../../../../../../etc", "path_not_allowed"),
    ("absolute, outside", "{outside}/good", "path_not_allowed"),
    ("/etc", "/etc", "path_not_allowed"),
    ("/", "/", "path_not_allowed"),
    ("symlink escape (directory)", "link-out", "path_not_allowed"),
    ("symlink escape (a file inside)", "file-link", "path_not_allowed"),
    ("symlink to the root", "up", "path_not_allowed"),
    ("symlink to /etc", "etc", "path_not_allowed"),
    ("symlink loop", "loop-a", "path_not_allowed"),
    ("NUL byte", "good\x00", "path_not_allowed"),
    ("NUL byte then dot segments", "good\x00/../../etc", "path_not_allowed"),
    ("home directory", "~", "path_not_allowed"),
    ("unknown user's home", "~nosuchuser-loraswap/adapters", "path_not_allowed"),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in RESOLVE], ids=[c[0].replace("\x00", "NUL") for c in RESOLVE])
def test_resolve_path(layout, raw, expected):
    guard = service([layout["root"], layout["second"]])
    raw = raw.format(root=layout["root"], second=layout["second"], outside=layout["outside"])
    if expected == "path_not_allowed":
        assert outcome(lambda: guard.resolve_path(raw)) == expected
    else:
        assert guard.resolve_path(raw) == (layout["base"] / expected).resolve()


def test_a_root_configured_through_a_symlink_is_resolved(layout):
    guard = service([layout["base"] / "root-link"])
    assert guard.resolve_path("good") == (layout["root"] / "good").resolve()
    assert guard.resolve_path(str(layout["root"] / "good")) == (layout["root"] / "good").resolve()
    assert outcome(lambda: guard.resolve_path(str(layout["outside"] / "good"))) == "path_not_allowed"
