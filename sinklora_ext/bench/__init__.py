"""Benchmarks against the peers (`sinklora bench TARGET` or `python -m sinklora_ext.bench.TARGET`)."""
