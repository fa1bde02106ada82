"""lmforge: train language models from raw text to a served model with one config."""

__version__ = "0.1.0"
