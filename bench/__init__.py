"""Benchmarks that print their figure against a raw baseline measured in the same run."""
