"""`loraswap-ray`: start a local Ray cluster, serve the loraswap application on it until SIGINT or
SIGTERM, then shut Serve and Ray down (in-flight requests drain within the graceful timeout)."""

from __future__ import annotations

import argparse
import logging
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    import ray
    from ray import serve

    from app.serving.ray_app import APP_NAME, build_app

    host = args.host or settings.host
    port = args.port or settings.port
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(
                settings,
                engine_replicas=args.replicas,
                engine_num_cpus=args.cpus_per_replica,
                engine_num_gpus=args.gpus_per_replica,
                split_mixed_batches=args.split_mixed_batches,
            ),
            name=APP_NAME,
            route_prefix="/",
        )
        logger.info("loraswap on Ray Serve: http://%s:%d with %d engine replicas", host, port, args.replicas)
        stop.wait()
        logger.info("stopping: draining in-flight requests")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
