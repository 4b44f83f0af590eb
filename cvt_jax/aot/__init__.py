"""Ahead-of-time compiles for devices that need not be here: TPU slices and GPU nodes from any host."""
