"""Baselines the benchmarks compare loraswap against, each written the way a practitioner would."""
