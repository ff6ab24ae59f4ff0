"""Benchmarks: perf_analyzer input data and scripts for the Triton services."""
