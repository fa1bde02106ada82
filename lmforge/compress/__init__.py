"""``lmforge compress``: quantization, pruning, distillation and export of lmforge runs, each judged by one
report (size, speed, quality) measured on this machine. See docs/compression.md."""
