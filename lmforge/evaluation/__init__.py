"""LM evaluation: perplexity / bits-per-byte with a sliding window, and an lm-evaluation-harness adapter."""
