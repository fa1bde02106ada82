"""The typed config of ``lmforge compress`` (one root, read by the one loader ``config_loader.load_root``).

    lmforge compress quantize RUN --out OUT --quantize.scheme=int8_dynamic
    lmforge compress prune RUN --out OUT --config prune.yaml --prune.sparsity=0.3

Every section exists for every subcommand; each subcommand reads its own plus ``train`` (the short fine-tune
of QAT, pruning recovery and distillation), ``eval`` (quality numbers) and ``bench`` (speed numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from lmforge.config import Section
from lmforge.config_loader import load_root

Scheme = Literal["int8_weight", "int8_dynamic", "int4_weight"]


class QuantizeConfig(Section):
    scheme: Scheme = Field("int8_dynamic", description="int8_weight: int8 weights, float activations; int8_dynamic: "
                           "int8 weights and activations quantized at run time (per call with fbgemm, per token with "
                           "torchao); int4_weight: 4-bit grouped weights (only where a kernel exists: see "
                           "docs/compression.md)")
    kernel: Literal["auto", "torchao", "fbgemm", "dequantized"] = Field(
        "auto", description="the kernel that runs the int8 weights at load time; auto: the faster on this machine by "
        "a short probe (recorded in compression.json). torchao: torchao's Int8Tensor; fbgemm: torch's quantized "
        "dynamic linear (x86/fbgemm engine, int8_dynamic only); dequantized: float weights rebuilt at load")
    group_size: int = Field(32, ge=8, description="int4_weight: weights per scale group")
    qat_steps: int = Field(0, ge=0, description="> 0: quantization-aware fine-tune (torchao fake quantization) for "
                           "this many steps before quantizing")
    skip: list[str] = Field(default_factory=lambda: ["output", "head", "pooler"],
                            description="module-name substrings left in float (the head tied to the embeddings)")
    smooth_alpha: Optional[float] = Field(
        None, description="int8_dynamic: SmoothQuant migration strength α in [0, 1] on the FFN down projections "
        "(per input channel s = max|x|^α / max|w|^(1-α) from calibration activations moves the activations' "
        "outliers into the weights; compress/smooth.py); 0: off; None: 0.5 for int8_dynamic without QAT, off "
        "otherwise")
    calib_batches: int = Field(8, ge=1, description="SmoothQuant: validation batches whose activation maxima set "
                               "the scales")
    embeddings: bool = Field(True, description="also store embedding tables as int8 rows (those no head shares: a "
                             "tied output head keeps its table in float)")

    @model_validator(mode="after")
    def _smooth(self) -> "QuantizeConfig":
        a = self.smooth_alpha
        if a is not None and not 0.0 <= a <= 1.0:
            raise ValueError(f"quantize.smooth_alpha={a} must be in [0, 1]")
        if a and self.scheme != "int8_dynamic":
            raise ValueError(f"quantize.smooth_alpha={a}: SmoothQuant scales balance int8 activations, so it "
                             f"needs quantize.scheme=int8_dynamic (not {self.scheme})")
        return self

    def alpha(self, export_scheme: Optional[str] = None) -> float:
        """The SmoothQuant α this run uses (``smooth_alpha``, its None resolved); ``export_scheme``: for the
        graphs ``export.quantize`` quantizes (no QAT there) instead of ``quantize.scheme``."""
        scheme = export_scheme or self.scheme
        if scheme != "int8_dynamic":
            return 0.0
        if self.smooth_alpha is not None:
            return self.smooth_alpha
        return 0.0 if self.qat_steps and export_scheme is None else 0.5


class PruneConfig(Section):
    method: Literal["magnitude", "wanda", "2:4", "structured"] = "wanda"
    sparsity: float = Field(0.5, description="magnitude / wanda: share of each layer's weights set to zero, in (0, 1)")
    ffn_fraction: float = Field(0.3, description="structured: share of FFN channels removed per layer, in [0, 1)")
    heads_fraction: float = Field(0.0, description="structured: share of attention heads removed per layer, in "
                                  "[0, 1) (kept whole; the per-layer count stays uniform)")
    calib_batches: int = Field(8, ge=1, description="wanda / structured: validation batches whose activation norms "
                               "score the weights")
    recover_steps: int = Field(0, ge=0, description="structured: recovery fine-tune steps through the training loop "
                               "(0: none)")

    @field_validator("method", mode="before")
    @classmethod
    def _sexagesimal(cls, v):
        return "2:4" if v == 124 else v  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124

    @model_validator(mode="after")
    def _ranges(self) -> "PruneConfig":
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"prune.sparsity={self.sparsity} must be in (0, 1)")
        for key in ("ffn_fraction", "heads_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"prune.{key}={getattr(self, key)} must be in [0, 1)")
        return self


class DistillConfig(Section):
    n_layers: Optional[int] = Field(None, ge=1, description="student depth (None: half the teacher's)")
    layers: list[int] = Field(default_factory=list, description="teacher layers the student starts from (empty: "
                              "evenly spaced, first and last included)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the KL term")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha·T²·KL(teacher‖student) + (1-alpha)·CE(labels)")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state MSE (student layer i ↔ its "
                                 "teacher layer)")
    attention_weight: float = Field(0.0, ge=0, description="weight of the attention-output MSE (per mapped layer)")
    cache_teacher: bool = Field(True, description="keep the teacher's logits on disk keyed by the batch, reused when "
                                "the same batch repeats (epochs over a fixed set)")
    baseline: bool = Field(False, description="also train the same student without KD (alpha=0) for the same steps "
                           "and report both")


class ExportConfig(Section):
    format: Literal["onnx", "pt2"] = "onnx"
    cached_decode: bool = Field(True, description="decoders: also export the KV-cache decode step")
    quantize: Literal["none", "int8_dynamic", "int4_weight"] = Field(
        "none", description="onnx: ONNX Runtime's quantizer on the exported graph (int8_dynamic: MatMulInteger; "
        "int4_weight: MatMulNBits)")
    parity_atol: float = Field(1e-4, gt=0, description="max |logit difference| vs eager fp32 allowed")
    opset: int = Field(18, ge=13)


class TrainConfig(Section):
    """The short fine-tune (QAT, structured-pruning recovery, distillation) run through the one training loop."""

    steps: int = Field(100, ge=1)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="decoders: windows per step; classifiers: examples per step")
    warmup_steps: int = Field(10, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_minutes: Optional[float] = Field(None, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate at the end only")
    seed: int = 0


class EvalConfig(Section):
    data: Optional[str] = Field(None, description="decoders: a prepared data folder (default: the run's data.path); "
                                "classifiers: a labelled file (default: the run's validation split)")
    batches: int = Field(20, ge=1, description="decoders: validation windows batches for perplexity")
    batch_size: int = Field(8, ge=1)
    seq_len: Optional[int] = Field(None, ge=2, description="decoders: tokens per window (default: the run's)")
    max_examples: Optional[int] = Field(None, ge=1, description="classifiers: first N validation examples")


class BenchConfig(Section):
    prompt_len: int = Field(16, ge=1)
    new_tokens: int = Field(32, ge=1, description="batch-1 greedy decode length (tokens/s)")
    batch: int = Field(8, ge=1, description="batch-N throughput batch size")
    seq_len: int = Field(64, ge=2, description="batch-N throughput: tokens per row")
    repeats: int = Field(3, ge=1, description="best of N timings")
    threads: Optional[int] = Field(None, ge=1, description="torch threads for the timings (None: torch default)")
    enabled: bool = True


class CompressConfig(Section):
    source: str = Field("", description="the run / fine-tuning run / HF folder to compress (the command's SOURCE)")
    out: str = Field("", description="the output folder (--out); must not exist")
    quantize: QuantizeConfig = QuantizeConfig()
    prune: PruneConfig = PruneConfig()
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    bench: BenchConfig = BenchConfig()


def load_compress_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> CompressConfig:
    """YAML (optional) + ``--section.key=value`` overrides, through the one loader (errors name file:line and key)."""
    return load_root(CompressConfig, path, overrides)
