"""Benchmarks: programs, not tests. Each prints ratios against a reference measured in the same
run and writes bench/results/<name>.json."""
