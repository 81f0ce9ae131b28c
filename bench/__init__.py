"""Benchmarks and workload generators; they print figures and assert nothing about time."""
