"""Benchmarks: each prints figures; none is a timed test."""
