"""`loraswap-serve`: run the service with uvicorn, one worker process (batching happens inside it)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import socket
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.config import Settings
from app.logs import configure_logging


def settings_or_exit() -> Settings:
    """The settings, or one line per bad setting naming it and what it expects (exit 2), never a traceback."""
    try:
        return Settings()
    except SettingsError as exc:  # a list setting that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"LORASWAP_{match.group(1).upper()}" if match else "a LORASWAP_ setting"
        print(f'loraswap-serve: {name}: not valid JSON; list settings are JSON, e.g. \'["mnli", "rte"]\'', file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"LORASWAP_{field.upper()}" if field else "settings"
            print(f"loraswap-serve: {name}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def check_port_free(host: str, port: int) -> None:
    """Fail before the models load (seconds to minutes), not after, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            print(f"loraswap-serve: cannot listen on {host}:{port}: {reason} (set --port or LORASWAP_PORT)", file=sys.stderr)
            raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    defaults = settings_or_exit()
    parser = argparse.ArgumentParser(
        prog="loraswap-serve",
        description="Serve NLI LoRA adapters over one frozen encoder, and the fraud scorer. Every setting "
        "is also read from LORASWAP_* environment variables (see the README's settings table); the "
        "options here override the host, port and log level only.",
    )
    parser.add_argument("--host", default=defaults.host, help=f"interface to bind (default {defaults.host})")
    parser.add_argument("--port", type=int, default=defaults.port, help=f"TCP port (default {defaults.port})")
    parser.add_argument(
        "--log-level", default=defaults.log_level, choices=["debug", "info", "warning", "error"], help="log level"
    )
    args = parser.parse_args(argv)
    check_port_free(args.host, args.port)
    configure_logging(args.log_level)
    # Before torch loads (the app imports it at startup): idle OpenMP threads sleep instead of
    # spinning, so the event loop and the batcher's thread are not starved on a small CPU.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # One worker on purpose: several would each load the base model; concurrency comes from batching.
    # SIGTERM stops accepting, lets in-flight requests finish (the batcher answers what is queued),
    # then runs the app's shutdown.
    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,
        access_log=False,
        workers=1,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
