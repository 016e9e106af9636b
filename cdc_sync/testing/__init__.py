"""Helpers for cdc-sync's tests and benchmarks, shipped in the package so users can test too."""
