"""Reproducible training of the bundled example models."""
