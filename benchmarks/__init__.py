"""Performance and parity benchmarks of trl-resets; run each as ``python -m benchmarks.NAME``."""
