"""`loraswap-ray`: start a local Ray cluster, serve the loraswap application on it until SIGINT or
SIGTERM, then shut Serve and Ray down (in-flight requests drain within the graceful timeout)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from app.config import Settings
from app.logs import configure_logging

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loraswap-ray", description=__doc__)
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (each its own base and batcher)")
    parser.add_argument("--host", default=None, help="interface to bind (default LORASWAP_HOST)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default LORASWAP_PORT)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs per engine replica")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs per engine replica (1 on GPU hosts)")
    parser.add_argument("--split-mixed-batches", action="store_true", help="send each adapter of a mixed /nli/batch separately")
    parser.add_argument(
        "--routing", choices=("multiplex", "affinity"), default=None,
        help="how requests find a replica holding their adapter: Ray's model multiplexing or loraswap's "
        "adapter-affine request router (default: the one docs/scaling.md measured better)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    # Ray's C++ failure-signal handler turns SIGTERM into an abort in this (driver) process, before
    # Serve can drain; it reads this switch when ray is imported, and workers keep theirs.
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    import ray
    from ray import serve

    os.environ.pop("RAY_DISABLE_FAILURE_SIGNAL_HANDLER")

    from app.serving.ray_app import APP_NAME, DEFAULT_ROUTING, build_app

    host = args.host or settings.host
    port = args.port or settings.port
    stop = threading.Event()
    ray.init(include_dashboard=False)
    # After ray.init, which installs a SIGTERM handler of its own: ours end the wait (also one that
    # arrives while the app is still starting), then Serve drains and stops, then Ray.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(
                settings,
                engine_replicas=args.replicas,
                engine_num_cpus=args.cpus_per_replica,
                engine_num_gpus=args.gpus_per_replica,
                split_mixed_batches=args.split_mixed_batches,
                routing=args.routing or DEFAULT_ROUTING,
            ),
            name=APP_NAME,
            route_prefix="/",
        )
        logger.info("loraswap on Ray Serve: http://%s:%d with %d engine replicas", host, port, args.replicas)
        while not stop.wait(0.5):
            pass
        logger.info("stopping: draining in-flight requests")
    except SystemExit as exc:  # a handler of Ray's that still held the signal
        if exc.code not in (signal.SIGTERM, signal.SIGINT):
            raise
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
