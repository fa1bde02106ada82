"""``lmforge finetune`` on 2 gloo ranks (FSDP2 zero3, LoRA) on the tiny lmforge Llama of ``test_finetune``:

- a LoRA classification run trains, saves a small adapter (LoRA tensors + head) that ``evaluate_run`` in one
  process scores exactly as the run did, and a merged model with the base's plain names;
- the same LoRA setup, fp32, matches the single-process run of the same global batch step by step (loss and
  grad norm): 15-row batches split 8/7 and class weights make per-rank means differ from the global mean, so
  only a correct loss normalisation and data split pass; an sft run checks the token-count normalisation;
- short runs of the other methods and strategies (ddp, zero2; full, adapter, prefix, adalora) match too.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.helpers.ranks import run_ranks
from tests.helpers.finetune import ft_cfg

from lmforge.config import ConfigError
from lmforge.finetune.config import load_finetune_config

pytestmark = pytest.mark.multiprocess

LORA = {"method.name": "lora", "method.lora_r": 4, "optimizer.lr": 1e-2, "base.pooling": "mean", "train.log_every": 1}
TRAIN = {**LORA, "train.max_steps": 45, "train.eval_every": 15}
EQUIV_STEPS = 6
EQUIV = {**LORA, "train.batch_size": 15, "data.class_weights": True, "train.max_steps": EQUIV_STEPS,
         "train.eval_every": 3}
SFT = {"method.name": "lora", "method.lora_r": 4, "optimizer.lr": 1e-2, "train.batch_size": 7,
       "train.max_steps": 4, "train.eval_every": 4, "train.log_every": 1}
SHORT = {"train.batch_size": 13, "train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "optimizer.lr": 1e-2,
         "method.adapter_size": 8, "method.prefix_len": 4, "method.adalora_init_r": 4, "method.adalora_target_r": 2,
         "method.adalora_delta_t": 2}
COMBOS = ["ddp_lora", "zero2_adapter", "zero3_prefix", "zero3_full", "ddp_adalora"]  # strategy_method
EQUIVALENT = ["equiv", "sft", *COMBOS]


def _configs(run, files, chat, root: Path) -> dict:
    """name → FinetuneConfig (a single process ignores the distributed section)."""
    z3 = {"distributed.strategy": "zero3"}
    tr, dev = files / "train.tsv", files / "dev.tsv"
    cfgs = {
        "train": ft_cfg(run, root / "train", tr, **{**TRAIN, **z3, "data.validation": dev}),
        "equiv": ft_cfg(run, root / "equiv", tr, **{**EQUIV, **z3, "data.validation": dev}),
        "sft": ft_cfg(run, root / "sft", chat, task="sft", **{**SFT, **z3}),
    }
    for name in COMBOS:
        strategy, method = name.split("_")
        cfgs[name] = ft_cfg(run, root / name, tr, **{**SHORT, "distributed.strategy": strategy, "method.name": method})
    return cfgs


def _no_head_dropout() -> None:
    """Equivalence runs only: the task head's dropout draws a different mask per rank than one process does."""
    import lmforge.finetune.trainer as tr
    from lmforge.finetune.model import TaskModel

    tr.TaskModel = partial(TaskModel, dropout=0.0)


def _ranks_body(rank, world, out, run, files, chat):
    from datetime import timedelta

    import torch.distributed as dist

    from lmforge.finetune.trainer import finetune

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    cfgs = _configs(run, files, chat, out)
    res = {"train": finetune(cfgs["train"])}
    _no_head_dropout()
    res.update({name: finetune(cfgs[name]) for name in EQUIVALENT})
    dist.destroy_process_group()
    return res


def _run(root: Path, name: str) -> Path:
    return root / name / "ft"  # test_finetune._cfg's run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_run, cls_files, chat_file, tmp_path_factory, monkeypatch_module):
    """(2-rank results, their folder, single-process summaries, their folder)."""
    from lmforge.finetune.trainer import finetune

    root = tmp_path_factory.mktemp("ft_dist")
    dist_out = root / "w2"
    results = run_ranks(_ranks_body, 2, dist_out, 120, tiny_run, cls_files, chat_file)
    single_out = root / "w1"
    import lmforge.finetune.trainer as tr
    from lmforge.finetune.model import TaskModel

    monkeypatch_module.setattr(tr, "TaskModel", partial(TaskModel, dropout=0.0))
    cfgs = _configs(tiny_run, cls_files, chat_file, single_out)
    single = {name: finetune(cfgs[name]) for name in EQUIVALENT}
    return results, dist_out, single, single_out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_lora_zero3_trains_and_saves_a_single_process_run(runs, cls_files):
    from safetensors.torch import load_file

    from lmforge.finetune.evaluation import evaluate_run

    results, out, single, single_out = runs
    s = results[0]["train"]
    assert results[1]["train"] == s  # every rank returns rank 0's summary
    run = _run(out, "train")
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    assert len(losses) == 45
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert s["validation"]["val_accuracy"] >= s["majority_baseline_accuracy"] + 0.15, s
    # best/: only LoRA factors and the head, full (unsharded) shapes, a small fraction of the model
    meta = json.loads((run / "best" / "adapter.json").read_text())
    tensors = load_file(str(run / "best" / "adapter.safetensors"))
    assert sorted(tensors) == meta["tensors"]
    assert tensors and all("lora_" in k or k.startswith("head.") for k in tensors), sorted(tensors)
    assert tensors["head.weight"].shape == (2, 32)
    assert any(t.shape == (4, 32) for k, t in tensors.items() if "lora_A" in k)
    assert sum(t.numel() for t in tensors.values()) == s["params"]["trainable"] < s["params"]["total"] / 10
    # one process reloads base + adapter and reproduces the run's validation numbers
    rep = evaluate_run(str(run), str(cls_files / "dev.tsv"), "again", show=False)
    assert rep["accuracy"] == pytest.approx(s["validation"]["val_accuracy"])
    assert rep["val_loss"] == pytest.approx(s["validation"]["val_loss"], rel=1e-5)
    # merged/ has the format of a single-process run's: the base's plain names and shapes, no LoRA layers
    merged = load_file(str(_run(out, "equiv") / "merged" / "model.safetensors"))
    merged_1 = load_file(str(_run(single_out, "equiv") / "merged" / "model.safetensors"))
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in merged_1.items()}
    assert not any("lora" in k for k in merged)
    for f in ("finetune.yaml", "summary.json", "reports/validation.json", "merged/labels.json"):
        assert (run / f).is_file(), f
    assert not list(run.glob("best.tmp-*"))


@pytest.mark.parametrize("name", EQUIVALENT)
def test_matches_one_process_step_by_step(runs, name):
    """Same global batches, loss normalised over the global batch: losses and grad norms agree to float
    rounding; so do the validation numbers and the weights saved as best."""
    from safetensors.torch import load_file

    results, out, single, single_out = runs
    got, ref = _records(_run(out, name)), _records(_run(single_out, name))
    steps = [r for r in got if "loss" in r]
    assert [r["step"] for r in steps] == [r["step"] for r in ref if "loss" in r]
    for a, b in zip(steps, [r for r in ref if "loss" in r]):
        for k in ("loss", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (name, a["step"], k, a[k], b[k])
        if "val_loss" in a:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert results[0][name]["best_step"] == single[name]["best_step"]
    assert results[0][name]["validation"]["val_loss"] == pytest.approx(single[name]["validation"]["val_loss"],
                                                                        rel=1e-4)
    w, w_ref = (load_file(str(_run(d, name) / "best" / "adapter.safetensors")) for d in (out, single_out))
    assert sorted(w) == sorted(w_ref)
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], rtol=1e-3, atol=1e-5, msg=k)


def test_finetune_rejects_what_it_cannot_shard(tiny_run, tmp_path):
    from lmforge.finetune.distributed import check_method

    base = ["--base.path=x", "--data.train=y"]
    with pytest.raises(ConfigError, match=r"distributed\.tp=2 is not supported by finetune"):
        load_finetune_config(None, base + ["--distributed.tp=2"])
    with pytest.raises(ConfigError, match=r"distributed\.pp=2"):
        load_finetune_config(None, base + ["--distributed.pp=2"])
    with pytest.raises(ConfigError, match="zero1"):
        load_finetune_config(None, base + ["--distributed.strategy=zero1"])
    with pytest.raises(ConfigError, match="adalora.*distributed.strategy=ddp"):
        check_method(load_finetune_config(None, base + ["--method.name=adalora"]))
    check_method(load_finetune_config(None, base + ["--method.name=adalora", "--distributed.strategy=ddp"]))


def test_blocks_found_inside_task_model_and_transformers_encoder():
    """FSDP2 shards per block: ``blocks`` finds them through the task model and peft layers, and in a
    transformers encoder (``encoder.layer``)."""
    from lmforge.config import ModelConfig
    from lmforge.distributed.parallelize import blocks
    from lmforge.finetune.config import MethodConfig
    from lmforge.finetune.methods import apply_method
    from lmforge.finetune.model import LmforgeBackbone, TaskModel
    from lmforge.models import build_model

    mc = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_seq_len=64)
    llama = build_model(mc, seed=0)
    applied = apply_method(TaskModel(LmforgeBackbone(llama), "classification", 2), MethodConfig(name="lora", lora_r=2))
    found = blocks(applied.model)
    assert [n for n, _ in found] == ["0", "1", "2"]
    assert all(b is llama.layers[i] for i, (_, b) in enumerate(found))
    assert any("lora_A" in n for n, _ in found[0][1].named_parameters())
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32))
    assert [b for _, b in blocks(bert)] == list(bert.encoder.layer)
    with pytest.raises(TypeError, match="no 'layers'"):
        blocks(torch.nn.Linear(2, 2))


def test_rank_rows_partition_each_global_batch():
    """Shares are contiguous, disjoint and cover the batch (trimmed to their own longest row); a rank left
    without rows gets one row whose targets are all ignored (it still runs forward/backward)."""
    from lmforge.models.losses import IGNORE_INDEX as IGNORE
    from lmforge.finetune.data import collate
    from lmforge.finetune.data import rank_rows

    lengths = [3, 7, 2, 5, 4]
    batch = collate([{"input_ids": list(range(1, n + 1)), "label": i % 2} for i, n in enumerate(lengths)], 0)
    shares = [rank_rows(batch, r, 2) for r in range(2)]
    assert [s["input_ids"].shape for s in shares] == [(3, 7), (2, 5)]
    assert torch.cat([s["label"] for s in shares]).tolist() == batch["label"].tolist()
    for s, rows in zip(shares, ([0, 1, 2], [3, 4])):
        T = s["input_ids"].shape[1]
        assert torch.equal(s["input_ids"], batch["input_ids"][rows, :T])
        assert torch.equal(s["attention_mask"], batch["attention_mask"][rows, :T])
    tokens = collate([{"input_ids": [1, 2, 3], "labels": [IGNORE, 5, 6]}], 0)
    empty = rank_rows(tokens, 1, 2)
    assert empty["input_ids"].shape == (1, 3) and (empty["labels"] == IGNORE).all()
    assert torch.equal(rank_rows(tokens, 0, 2)["labels"], tokens["labels"])
