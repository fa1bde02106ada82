"""What ``lmforge compress`` works on: a SOURCE folder loaded once, and its quality numbers.

A SOURCE is a pretraining run (``config.yaml``: an lmforge decoder), a fine-tuning run (``finetune.yaml`` +
``best/``: a classifier ``TaskModel``) or a Hugging Face folder (``config.json``: a Llama / GPT-2 decoder).
Each loads through the loader its kind already has (``inference.load_run``, ``finetune.evaluation``'s rebuild,
``models.hf.load_hf``), so a compressed output, which is again a run folder, loads the same way.

Quality: decoders, perplexity on the validation split of the run's data (``eval.data`` for an HF folder);
classifiers, accuracy and macro-F1 on the run's validation examples.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.losses import IGNORE_INDEX


@dataclass
class Source:
    path: Path
    kind: str  # "lm" | "classifier"
    model: nn.Module  # lm: an lmforge decoder; classifier: a TaskModel (eval mode, CPU, fp32)
    tok: object
    cfg: object  # lm: lmforge.config.Config; classifier: FinetuneConfig
    meta: dict = field(default_factory=dict)  # classifier: labels, base info; lm: {"hf": True} for HF folders
    data: object = None  # classifier: TaskData
    compression: list = field(default_factory=list)  # compression.json steps already applied to the source

    @property
    def lm(self) -> nn.Module:
        """The language model (a classifier's backbone)."""
        return self.model if self.kind == "lm" else self.model.backbone.model

    def copy_model(self) -> nn.Module:
        return copy.deepcopy(self.model)


def load_source(path: str | Path, eval_data: Optional[str] = None) -> Source:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"source: {p} does not exist")
    if (p / "finetune.yaml").is_file():
        return _load_finetune(p, eval_data)
    if (p / "config.yaml").is_file():
        from lmforge.inference import load_run

        model, tok, cfg, _ = load_run(p)
        _decoder_only(cfg.model.arch, p)
        if eval_data:
            cfg.data.path = eval_data
        return Source(p, "lm", model, tok, cfg, compression=read_compression(p))
    if (p / "config.json").is_file():
        return _load_hf(p, eval_data)
    raise ConfigError(f"source: {p} is neither an lmforge run (config.yaml), a fine-tuning run (finetune.yaml) "
                      "nor a Hugging Face folder (config.json)")


def read_compression(run: Path) -> list:
    f = Path(run) / "compression.json"
    return json.loads(f.read_text()).get("steps", []) if f.is_file() else []


def _decoder_only(arch: str, p: Path) -> None:
    if arch == "bert":
        raise ConfigError(f"source: {p} is a BERT encoder run without a task head; compress a fine-tuning run "
                          "of it (finetune.yaml) or a decoder run")


def _load_hf(p: Path, eval_data: Optional[str]) -> Source:
    from lmforge.config import Config, DataConfig
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models.hf import hf_config_to_lmforge, load_hf

    try:
        mc = hf_config_to_lmforge(p)
    except ValueError as e:
        raise ConfigError(f"source: {e}") from None
    _decoder_only(mc.arch, p)
    cfg = Config(run_dir=str(p), model=mc, data=DataConfig(path=eval_data, seq_len=min(mc.max_seq_len, 256)))
    return Source(p, "lm", load_hf(p).eval(), load_tokenizer(p), cfg, meta={"hf": True})


def _load_finetune(p: Path, eval_data: Optional[str]) -> Source:
    """The fine-tuning run's best weights as a plain TaskModel (LoRA folded in), like ``lmforge evaluate``."""
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.data import load_task_data
    from lmforge.finetune.methods import load_adapter, merge
    from lmforge.finetune.model import load_base
    from lmforge.finetune.trainer import build_task_model
    from lmforge.finetune.vocab import load_run_tokenizer

    if not (p / "best" / "adapter.json").is_file():
        raise ConfigError(f"source: {p} is not a finished fine-tuning run (no best/adapter.json)")
    cfg = load_finetune_config(p / "finetune.yaml")
    if cfg.task != "classification":
        raise ConfigError(f"source: {p} has task={cfg.task}; compress supports classification fine-tuning runs "
                          "(and decoder runs)")
    if cfg.method.name not in ("full", "lora", "adalora"):
        raise ConfigError(f"source: {p} was tuned with method.name={cfg.method.name}, whose modules cannot be "
                          "folded into plain weights; compress a full / lora / adalora run")
    meta = json.loads((p / "best" / "adapter.json").read_text())
    backbone, tok, info = load_base(cfg.base.path, cfg.base.tokenizer)
    tok = load_run_tokenizer(p, backbone, tok)
    applied = build_task_model(cfg, 1, meta.get("labels") or [], backbone)
    load_adapter(applied, p / "best")
    model = merge(applied).eval()
    if eval_data:
        cfg.data.validation = eval_data
    cfg.train.precision = "fp32"
    data = load_task_data(cfg, tok)
    return Source(p, "classifier", model, tok, cfg, meta={"labels": meta.get("labels") or [], "base": info},
                  data=data, compression=read_compression(p))


# ----------------------------------------------------------------------------------------------- quality


def val_batches(src: Source, ec) -> list[dict]:
    """The decoder's validation windows (the same list for every model scored in one run)."""
    from lmforge.data.loader import SequentialEvalLoader, TokenShards

    path = src.cfg.data.path
    if not path or not (Path(path) / "manifest.json").is_file():
        raise ConfigError(f"eval.data: no prepared data folder for {src.path} (data.path={path!r}); give "
                          "--eval.data=FOLDER (written by `lmforge data prepare`)")
    try:
        shards = TokenShards(path, "val")
    except KeyError:
        raise ConfigError(f"eval.data={path}: the data has no validation split") from None
    seq = ec.seq_len or min(src.cfg.data.seq_len or src.cfg.model.max_seq_len, src.cfg.model.max_seq_len)
    return list(SequentialEvalLoader(shards, seq, ec.batch_size, ec.batches))


def train_batches(src: Source, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """``n`` training windows batches of the run's own data (calibration for classifiers uses their examples)."""
    from lmforge.data.loader import RandomWindowLoader, TokenShards

    shards = TokenShards(src.cfg.data.path, "train")
    seq = min(src.cfg.data.seq_len or src.cfg.model.max_seq_len, src.cfg.model.max_seq_len)
    loader = RandomWindowLoader(shards, seq, batch_size, seed=seed)
    return [loader.next_batch() for _ in range(n)]


@torch.inference_mode()
def lm_perplexity(model: nn.Module, batches: list[dict]) -> dict:
    """exp(Σ CE / Σ targets) over the batches (next-token CE of ``forward(labels_BT=...)``)."""
    total, n = 0.0, 0
    for b in batches:
        total += float(model(b["input_ids"], labels_BT=b["labels"], reduction="sum"))
        n += int((b["labels"] != IGNORE_INDEX).sum())
    loss = total / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n}


def classifier_quality(model: nn.Module, src: Source, ec) -> dict:
    from lmforge.finetune.evaluation import evaluate_examples

    examples = src.data.val[: ec.max_examples] if ec.max_examples else src.data.val
    pad = src.tok.pad_id if src.tok.pad_id is not None else 0
    rep = evaluate_examples(model, examples, "classification", src.meta["labels"], pad, 64, "fp32")
    return {"val_accuracy": rep["accuracy"], "val_macro_f1": rep["averages"]["macro"]["f1"],
            "val_loss": rep["val_loss"], "val_examples": len(examples)}


def quality(model: nn.Module, src: Source, ec, batches: Optional[list[dict]] = None) -> dict:
    if src.kind == "classifier":
        return classifier_quality(model, src, ec)
    return lm_perplexity(model, batches if batches is not None else val_batches(src, ec))
