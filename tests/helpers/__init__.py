"""Shared test helpers: ``ranks`` (spawn gloo ranks with a timeout), ``runs`` (tiny packed data and run
configs), ``dist_runs`` (multi-process trainer configs and a subprocess launcher), ``finetune`` (tiny
fine-tuning configs), ``paths`` (the repository and the shared data folder)."""
