"""Benchmarks: one script per question; results in benchmarks/results/ (JSON + markdown)."""
