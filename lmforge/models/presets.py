"""Named model shapes. A preset fills ``model.*`` defaults; keys given in the config override it.

Kept free of torch so the config can be validated without importing it.
"""

PRESETS: dict[str, dict] = {
    # for unit tests: builds and steps in milliseconds
    "tiny": dict(arch="llama", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=128),
    # the quickstart: a few minutes on two CPU cores (sized for ~0.5-2.5M training tokens: docs/hardware.md)
    "quickstart": dict(arch="llama", d_model=192, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=512,
                       max_seq_len=256),
    # the shape benchmarked against HF LlamaForCausalLM (benchmarks/train_throughput.py)
    "bench-6l": dict(arch="llama", d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_hidden=1024,
                     max_seq_len=256),
    "llama-60m": dict(arch="llama", d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_hidden=1376,
                      max_seq_len=1024),
    "llama-125m": dict(arch="llama", d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_hidden=2048,
                       max_seq_len=2048),
    "llama-350m": dict(arch="llama", d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_hidden=2816,
                       max_seq_len=2048),
    "llama-1b": dict(arch="llama", d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=5632,
                     max_seq_len=2048, tie_embeddings=True),
}
