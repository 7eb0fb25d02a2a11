"""Benchmarks of the running pipeline: `make bench` (`python -m bench.run`).

Not part of the test run. `bench.run` drives one campaign through the platform started by
`make up` and measures it, then measures the SMTP sink alone for comparison; figures go to the
terminal and to bench/results/ (git-ignored).
"""
