"""Score a task model on a list of encoded examples → report dict (see ``reports.py``)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lmforge.data.tasks_conll import word_predictions
from lmforge.finetune.data import eval_batches
from lmforge.finetune.reports import classification_report, entity_report
from lmforge.models.losses import IGNORE_INDEX
from lmforge.training.step import autocast_ctx, to_device as tensor_to_device


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a CPU batch on ``device`` (pinned and asynchronous to CUDA: ``training.step.to_device``)."""
    return {k: tensor_to_device(v, device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_examples(model, examples: list[dict], task: str, label_names: list[str], pad_id: int,
                      batch_size: int = 64, precision: str = "fp32", class_weights: Optional[torch.Tensor] = None) -> dict:
    """Report with ``val_loss`` added (mean per example for classification, per labelled token otherwise)."""
    was_training = model.training
    model.eval()
    loss_sum, loss_n = 0.0, 0
    y_true, y_pred, tags_true, tags_pred = [], [], [], []
    id2label = dict(enumerate(label_names))
    device = next(model.parameters()).device
    for chunk, batch in eval_batches(examples, batch_size, pad_id):
        batch = to_device(batch, device)
        with autocast_ctx(device, precision):
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
        if task == "classification":
            loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            loss_n += len(chunk)
            y_true += batch["label"].tolist()
            y_pred += logits.argmax(-1).tolist()
        elif task == "token-classification":
            labels = batch["labels"]
            loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum").item()
            loss_n += int((labels != IGNORE_INDEX).sum())
            pred = logits.argmax(-1).tolist()
            for e, p in zip(chunk, pred):
                tags_true.append(e["tags"])
                tags_pred.append(word_predictions(p[: len(e["word_ids"])], e["word_ids"], len(e["tags"]), id2label))
        else:
            labels = batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum").item()
            loss_n += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    val_loss = loss_sum / max(loss_n, 1)
    if task == "classification":
        rep = classification_report(y_true, y_pred, label_names)
    elif task == "token-classification":
        rep = entity_report(tags_true, tags_pred, "iob2")
    else:
        rep = {"task": "sft", "n": len(examples), "tokens": loss_n, "perplexity": math.exp(min(val_loss, 50.0))}
    rep["val_loss"] = val_loss
    return rep


def flat_metrics(report: dict, prefix: str = "val_") -> dict:
    """Scalars for logging/selection: val_loss, accuracy, macro_f1, micro_f1 (where defined)."""
    out = {"val_loss": report["val_loss"]}
    if "averages" in report:
        out.update(accuracy=report["accuracy"], macro_f1=report["averages"]["macro"]["f1"],
                   micro_f1=report["averages"]["micro"]["f1"])
    else:
        out["perplexity"] = report["perplexity"]
    return {(k if k == "val_loss" else prefix + k): v for k, v in out.items()}


def majority_baseline(train: list[dict], evalset: list[dict], task: str) -> Optional[float]:
    """Accuracy of always predicting the most frequent training label (token-level for token tasks)."""
    from collections import Counter

    if task == "classification":
        top = Counter(e["label"] for e in train).most_common(1)[0][0]
        return sum(e["label"] == top for e in evalset) / max(len(evalset), 1)
    if task == "token-classification":
        top = Counter(t for e in train for t in e["tags"]).most_common(1)[0][0]
        n = sum(len(e["tags"]) for e in evalset)
        return sum(t == top for e in evalset for t in e["tags"]) / max(n, 1)
    return None


def evaluate_run(run_dir: str, data_file: str, name: str = "eval", max_examples: Optional[int] = None,
                 batch_size: Optional[int] = None, show: bool = True, runtime: str = "torch") -> dict:
    """Score a finished fine-tuning run's best weights on any file; writes ``reports/{name}.*``.
    ``runtime="onnxruntime"``: score the classifier graph ``lmforge compress export`` wrote into the run."""
    import json
    from pathlib import Path

    from lmforge.config import ConfigError
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.data import read_eval_file
    from lmforge.finetune.methods import load_adapter
    from lmforge.finetune.model import load_base
    from lmforge.finetune.reports import print_report, write_report
    from lmforge.finetune.trainer import build_task_model
    from lmforge.finetune.vocab import load_run_tokenizer

    run = Path(run_dir)
    if not (run / "finetune.yaml").is_file() or not (run / "best" / "adapter.json").is_file():
        raise ConfigError(f"{run} is not a finished fine-tuning run (needs finetune.yaml and best/adapter.json)")
    if not Path(data_file).is_file():
        raise ConfigError(f"--data: file not found: {data_file}")
    cfg = load_finetune_config(run / "finetune.yaml")
    meta = json.loads((run / "best" / "adapter.json").read_text())
    labels = meta.get("labels") or []
    backbone, tok, _ = load_base(cfg.base.path, cfg.base.tokenizer)
    tok = load_run_tokenizer(run, backbone, tok)  # a vocabulary extended by base.add_unknown_chars
    applied = build_task_model(cfg, 1, labels, backbone)
    load_adapter(applied, run / "best")
    examples = read_eval_file(cfg, data_file, tok, labels, max_examples)  # DataError when nothing to score
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    model = applied.model
    if runtime == "onnxruntime":
        from lmforge.compress.restore import onnx_model

        model = onnx_model(run, "classifier")
    rep = evaluate_examples(model, examples, cfg.task, labels, pad_id, batch_size or cfg.train.eval_batch_size,
                            cfg.train.precision)
    rep["data"] = str(data_file)
    write_report(rep, run / "reports", name, title=f"{name}: {Path(data_file).name}")
    if show:
        print_report(rep, title=f"{name}: {Path(data_file).name}")
    return rep
