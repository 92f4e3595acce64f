"""Metrics, distributed offline evaluation, confidence intervals and the paired comparison of two evaluations."""
