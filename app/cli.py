"""`loraswap-serve`: run the service with uvicorn, one worker process (batching happens inside it)."""

from __future__ import annotations

import argparse
import os
import uvicorn

from app.config import Settings
from app.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
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
