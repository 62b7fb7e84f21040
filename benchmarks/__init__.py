"""Benchmarks of the service and its baselines: timings live here, never in the tests."""
