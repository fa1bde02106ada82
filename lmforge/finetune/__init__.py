"""Fine-tuning: task heads, parameter-efficient methods (LoRA, AdaLoRA, adapters, prefix), trainer, reports."""
