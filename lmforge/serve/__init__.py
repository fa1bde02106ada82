"""``lmforge serve``: an OpenAI-compatible, authenticated, continuously batching model server.

Layout: ``kv_pool`` (paged KV blocks + the per-step cache view) → ``runner`` (prefill / decode / probe /
batch-invariance check) → ``scheduler`` (the continuous-batching loop) → ``handlers`` + ``app`` (HTTP) behind
``security.Gate``; ``server`` owns the process lifecycle (background load, SIGTERM drain). See docs/serving.md.
"""
