"""loraswap-serve's start-up checks: a bad setting is one line naming it, a busy port is found before
any model loads; both exit 2 without a traceback."""

from __future__ import annotations

import socket

import pytest

from app.cli import check_port_free, settings_or_exit


@pytest.mark.parametrize(
    "env,named",
    [
        ({"LORASWAP_PINNED_ADAPTERS": "mnli"}, "LORASWAP_PINNED_ADAPTERS"),  # not JSON
        ({"LORASWAP_PORT": "eighty"}, "LORASWAP_PORT"),
        ({"LORASWAP_PINNED_ADAPTERS": '["a", "b"]', "LORASWAP_MAX_RESIDENT_ADAPTERS": "2"}, "LORASWAP_PINNED_ADAPTERS"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(monkeypatch, capsys, env, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as caught:
        settings_or_exit()
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in lines[0]


def test_a_busy_port_is_reported_before_anything_loads(capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as caught:
            check_port_free("127.0.0.1", port)
    assert caught.value.code == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_a_free_port_passes():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_free("127.0.0.1", port)
