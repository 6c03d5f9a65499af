"""Benchmarks of crow (BENCHMARKS.md): ratios measured side by side in one run."""
