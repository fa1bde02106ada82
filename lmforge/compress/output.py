"""The output folder of every ``lmforge compress`` command: built whole under a temporary name, verified by
loading it back through the normal loaders, then renamed into place.

``Staging(out)``: ``OUT.tmp-<pid>/`` next to ``OUT`` (``out`` must not exist yet). Inside, the weights are an
ordinary checkpoint written by ``lmforge.checkpoint`` (its folder protocol: temp → fsync → sha256 manifest →
COMPLETE → rename), beside ``config.yaml`` / ``tokenizer.json`` (decoders) or ``finetune.yaml`` + ``best/`` +
``base/`` (classifiers), ``compression.json`` and ``report.{json,md,html}``. ``publish()`` loads the folder
back, compares its logits with the in-memory model, fsyncs and renames it to ``OUT``. A failure (or a kill) at
any point leaves at most the ``.tmp-`` folder, which no loader reads as ``OUT``; ``Staging`` removes its own on
an exception and stale ones of dead processes on start.

Decoder output = a run folder (``lmforge generate --run OUT``, ``lmforge hf export OUT``); classifier output =
a fine-tuning run folder whose base is ``OUT/base`` (``lmforge evaluate --run OUT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from lmforge.compress.restore import FILE
from lmforge.errors import CheckpointError, ConfigError


class Staging:
    def __init__(self, out: str | Path):
        if not str(out):
            raise ConfigError("out: no output folder given (--out OUT)")
        self.final = Path(out).absolute()
        if self.final.exists():
            raise ConfigError(f"out={out}: exists already", hint="give a new folder; compress never overwrites")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f"{self.final.name}.tmp-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.final.parent / f"{self.final.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def publish(self, verify: Callable[[Path], None]) -> Path:
        """``verify(tmp)`` (raises when the folder does not load right), fsync, rename to the final name."""
        verify(self.tmp)
        for p in sorted(self.tmp.rglob("*"), key=lambda q: -len(q.parts)):
            _fsync(p)
        _fsync(self.tmp)
        os.rename(self.tmp, self.final)
        _fsync(self.final.parent)
        return self.final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def write_compression(folder: Path, steps: list[dict]) -> None:
    (folder / FILE).write_text(json.dumps({"format_version": 1, "steps": steps}, indent=2) + "\n")


def write_lm_run(folder: Path, model: nn.Module, tok, cfg, final: Path, steps: list[dict]) -> None:
    """An lmforge run folder: resolved ``config.yaml`` (run_dir = the final name), ``tokenizer.json``, one
    checkpoint of ``model`` (whatever its modules: quantized buffers included), ``compression.json``."""
    from lmforge.checkpoint import CheckpointManager, DictState
    from lmforge.config import save_config

    cfg = cfg.model_copy(deep=True)
    cfg.run_dir = str(final)
    cfg.model = model.cfg.model_copy(deep=True)
    save_config(cfg, folder / "config.yaml")
    tok.save(folder / "tokenizer.json")
    write_compression(folder, steps)
    CheckpointManager(folder, model=model, shared={"compress": DictState({"steps": steps})}).save(1)


def write_classifier_run(folder: Path, task_model: nn.Module, src, final: Path, steps: list[dict]) -> None:
    """A fine-tuning run folder: ``base/`` (the backbone as an lmforge run, quantized layers and all),
    ``finetune.yaml`` (method full over ``final/base``), ``best/`` (the task head's tensors; the backbone's
    are all in ``base/``, which ``backbone_in_base`` tells the loader), ``compression.json``."""
    from lmforge.config import Config, DataConfig
    from lmforge.finetune.config import save_finetune_config
    from lmforge.finetune.methods import Applied, adapter_tensors, save_adapter

    lm = task_model.backbone.model
    base = folder / "base"
    base.mkdir()
    with _with_heads(lm):
        write_lm_run(base, lm, src.tok, Config(run_dir=str(final / "base"), model=lm.cfg, data=DataConfig()),
                     final / "base", steps)
    cfg = src.cfg.model_copy(deep=True)
    cfg.run_dir, cfg.base.path, cfg.base.tokenizer = str(final), str(final / "base"), None
    cfg.method = type(cfg.method)(name="full")
    save_finetune_config(cfg, folder / "finetune.yaml")
    applied = Applied(task_model, cfg.method)
    for p in task_model.parameters():
        p.requires_grad_(True)
    head = {k: v for k, v in adapter_tensors(applied).items() if not k.startswith("backbone.")}
    save_adapter(applied, folder / "best", {"task": cfg.task, "labels": src.meta["labels"], "base": str(final / "base"),
                                            "compressed": True, "backbone_in_base": True}, tensors=head)
    for p in task_model.parameters():
        p.requires_grad_(False)
    write_compression(folder, steps)


@contextlib.contextmanager
def _with_heads(lm: nn.Module):
    """A BERT backbone with the pre-training heads a run's checkpoint carries while it is saved
    (``LmforgeBackbone`` dropped them; fresh seed-0 ones, unused by the classifier, stand in)."""
    if lm.cfg.arch != "bert" or lm.mlm_head is not None:
        yield
        return
    from lmforge.models import build_model

    full = build_model(lm.cfg, seed=0)
    lm.pooler = full.pooler
    if isinstance(lm.tok_embeddings, nn.Embedding):  # an int8 table: the loader leaves the tied head out
        lm.mlm_head = full.mlm_head
        lm.mlm_head.decoder.weight = lm.tok_embeddings.weight
    try:
        yield
    finally:
        lm.pooler = lm.mlm_head = None


def load_output(folder: Path, kind: str) -> nn.Module:
    """The model of an output folder through the normal loaders (decoder: ``load_run``; classifier: the
    backbone via ``load_run`` of ``base/`` and the task tensors of ``best/``, as ``lmforge evaluate`` does)."""
    from lmforge.inference import load_run

    if kind == "lm":
        return load_run(folder)[0]
    from lmforge.finetune.config import load_finetune_config
    from lmforge.finetune.methods import load_adapter
    from lmforge.finetune.model import LmforgeBackbone
    from lmforge.finetune.trainer import build_task_model

    cfg = load_finetune_config(folder / "finetune.yaml")
    labels = json.loads((folder / "best" / "adapter.json").read_text())["labels"]
    backbone = LmforgeBackbone(load_run(folder / "base")[0])
    applied = build_task_model(cfg, 1, labels, backbone)
    load_adapter(applied, folder / "best")
    return applied.model.eval()


def check_same(expected: nn.Module, loaded: nn.Module, sample: dict, kind: str, atol: float = 1e-4) -> float:
    """Max |logit difference| of the in-memory and the reloaded model on ``sample``; CheckpointError above atol."""
    with torch.inference_mode():
        if kind == "lm":
            a, b = expected(sample["input_ids"]), loaded(sample["input_ids"])
        else:
            a = expected(sample["input_ids"], sample["attention_mask"])
            b = loaded(sample["input_ids"], sample["attention_mask"])
    diff = float((a.float() - b.float()).abs().max())
    if diff > atol:
        raise CheckpointError(f"the output folder reloads with logits {diff:.3g} away from the compressed model "
                              f"(allowed {atol:g}); nothing was published")
    return diff


def sample_inputs(src, batches: Optional[list[dict]] = None) -> dict:
    """A small fixed input for the reload check and the export parity (3 rows)."""
    if src.kind == "lm":
        if batches:
            return {"input_ids": batches[0]["input_ids"][:3, :32]}
        return {"input_ids": torch.randint(0, src.cfg.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))}
    from lmforge.finetune.data import collate

    pad = src.tok.pad_id if src.tok.pad_id is not None else 0
    return collate(src.data.val[:3], pad)
