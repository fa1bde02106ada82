"""``lmforge tune``: hyperparameter search and throughput autotuning on Optuna (see docs/tuning.md)."""
