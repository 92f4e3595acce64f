"""Metrics, protocols, distributed offline evaluation."""
