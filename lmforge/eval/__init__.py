"""Evaluation after (and during) training: task metrics, perplexity, lm-evaluation-harness, before/after report."""
