"""Serving past one process: the Ray Serve application (ingress + engine replicas) and its launcher."""
