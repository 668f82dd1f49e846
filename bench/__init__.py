"""GPU benchmarks and parity runs: python -m bench.<name> from the repository root."""
