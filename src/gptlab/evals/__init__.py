"""Measuring a model: loss, perplexity and bits per byte; downstream tasks; lm-eval's adapter."""
