"""Synthetic data, readers of raw formats, Ray Data preparation, training-sample expansion."""
