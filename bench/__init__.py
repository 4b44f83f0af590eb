"""Benchmarks of cvt_jax against the PyTorch reference (`python -m bench.run --help`)."""
