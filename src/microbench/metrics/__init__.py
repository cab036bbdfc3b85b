"""Metrics: closed-VQA accuracy with slices, bootstrap confidence intervals."""
