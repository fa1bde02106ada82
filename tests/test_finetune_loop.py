"""Fine-tuning through the one step and loop (tiny lmforge Llama of ``test_finetune``):

- kill-and-resume is bitwise: ``lmforge finetune`` in a subprocess, SIGKILLed after a mid-run checkpoint and an
  evaluation past it, resumed with ``--resume auto``, ends with the uninterrupted run's ``best/`` and
  ``merged/`` tensors, bit for bit (LoRA and full);
- the time budget and SIGTERM stop at a step boundary with a checkpoint; AdaLoRA (rank allocator state)
  resumes bitwise;
- gradient accumulation equals one big batch (class-weighted classification, token-normalised sft);
- a non-finite step is skipped, and the run stops after ``max_bad_steps`` with nothing saved after it;
- outside logging and evaluation steps, the host reads one tensor per step (the agreed flags);
- fp16 runs with dynamic loss scaling;
- on 2 gloo ranks (zero3): a run cut by the time budget resumes bitwise, and the best weights round-trip
  through their checkpoint state into the sharded model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers.finetune import ft_cfg

from lmforge.finetune.config import save_finetune_config
from lmforge.finetune.trainer import finetune

BASE = {"train.batch_size": 8, "data.max_len": 24, "optimizer.lr": 1e-2, "base.pooling": "mean", "train.threads": 1,
        "method.lora_r": 4, "train.log_every": 1}


def _run(root: Path) -> Path:
    return root / "ft"  # test_finetune._cfg's run_dir


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _complete(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints (never a temporary folder)."""
    root = run / "checkpoints"
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file()]
    return sorted(int(p.name[5:]) for p in found)


def _assert_bitwise(a: Path, b: Path, name: str) -> None:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert sorted(x) == sorted(y), name
    for k in x:
        assert torch.equal(x[k], y[k]), (name, k, (x[k] - y[k]).abs().max())


def _kill_after_checkpoint(cmd: list[str], run: Path, past: int, timeout_s: float = 120) -> int:
    """Start ``cmd``; SIGKILL it once a complete checkpoint exists and the run has logged ``past`` steps beyond
    it. Returns the newest complete checkpoint's step after the kill."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            steps = _complete(run)
            if steps and (run / "metrics.jsonl").is_file() and any(r["step"] > steps[-1] + past for r in _records(run)):
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (rc {proc.returncode}) before the kill:\n{err}"
    assert steps and not (run / "summary.json").exists()
    return _complete(run)[-1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kill_and_resume_is_bitwise(tiny_run, cls_files, tmp_path, method):  # noqa: F811
    from lmforge.cli import main

    over = {**BASE, "method.name": method, "train.max_steps": 40, "train.eval_every": 3, "checkpoint.every_steps": 4,
            "data.validation": cls_files / "dev.tsv"}
    ref = finetune(ft_cfg(tiny_run, tmp_path / "ref", cls_files / "train.tsv", **over))
    cfg = ft_cfg(tiny_run, tmp_path / "cut", cls_files / "train.tsv", **over)
    save_finetune_config(cfg, tmp_path / "ft.yaml")
    run = _run(tmp_path / "cut")
    cmd = [sys.executable, "-m", "lmforge", "finetune", "--config", str(tmp_path / "ft.yaml")]
    at = _kill_after_checkpoint(cmd, run, past=3)  # an evaluation (every 3 steps) after the checkpoint
    assert 0 < at < 40
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml"), "--resume", "auto"]) == 0
    got = json.loads((run / "summary.json").read_text())
    assert got["resumed_from"].endswith(f"step_{at:07d}") and got["steps"] == 40
    assert (got["best_step"], got["best_value"], got["validation"]) == (ref["best_step"], ref["best_value"],
                                                                         ref["validation"])
    _assert_bitwise(run / "best", _run(tmp_path / "ref") / "best", "adapter.safetensors")
    if method == "lora":
        _assert_bitwise(run / "merged", _run(tmp_path / "ref") / "merged", "model.safetensors")
    assert [r["step"] for r in _records(run)] == [r["step"] for r in _records(_run(tmp_path / "ref"))]
    assert not list(run.glob("best.tmp-*"))


def test_time_budget_stops_at_a_step_boundary_with_a_checkpoint(tiny_run, cls_files, tmp_path):  # noqa: F811
    s = finetune(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **BASE, **{
        "method.name": "lora", "train.max_steps": 50, "train.max_minutes": 1e-6}))
    assert s["stop_reason"] == "time_budget" and s["steps"] == 1 and _complete(_run(tmp_path)) == [1]
    assert s["best_step"] == 1 and "validation" in s  # a stopped run still reports its evaluation


def test_sigterm_then_adalora_resumes_bitwise(tiny_run, cls_files, tmp_path, monkeypatch):  # noqa: F811
    """SIGTERM during step 7 stops the run after it with a checkpoint (no final outputs); the resumed AdaLoRA run
    (rank masks from step 2 on) ends bitwise equal to the uninterrupted one."""
    import os
    import signal

    from lmforge.training.step import TrainStep

    over = {**BASE, "method.name": "adalora", "method.adalora_init_r": 4, "method.adalora_target_r": 1,
            "method.adalora_delta_t": 2, "train.max_steps": 20, "train.eval_every": 10, "train.metric": "val_loss"}
    ref = finetune(ft_cfg(tiny_run, tmp_path / "ref", cls_files / "train.tsv", **over))
    real, calls = TrainStep.__call__, {"n": 0}

    def interrupted(self, micro, requests):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop: it finishes this step, checkpoints, stops
        return real(self, micro, requests)

    monkeypatch.setattr(TrainStep, "__call__", interrupted)
    cut = finetune(ft_cfg(tiny_run, tmp_path / "cut", cls_files / "train.tsv", **over))
    monkeypatch.setattr(TrainStep, "__call__", real)
    run = _run(tmp_path / "cut")
    assert cut["stop_reason"] == "signal_SIGTERM" and cut["steps"] == 7 and _complete(run) == [7]
    assert not (run / "merged").exists()  # an interrupted run leaves the final outputs to its resumption
    done = finetune(ft_cfg(tiny_run, tmp_path / "cut", cls_files / "train.tsv", **over, **{"checkpoint.resume": "auto"}))
    assert done["steps"] == 20 and done["resumed_from"].endswith("step_0000007")
    assert (done["best_step"], done["best_value"]) == (ref["best_step"], ref["best_value"])
    _assert_bitwise(run / "best", _run(tmp_path / "ref") / "best", "adapter.safetensors")
    _assert_bitwise(run / "merged", _run(tmp_path / "ref") / "merged", "model.safetensors")


@pytest.mark.parametrize("split", [8, 17])  # before and after the rank pattern is fixed (step 16)
def test_adalora_allocator_state_resumes_the_rank_allocation(split):
    """The allocator's state (importance averages, the rank pattern fixed at step 16) carried over: the
    continued allocator keeps the uninterrupted one's averages and masks; a fresh one has neither."""
    from tests.test_peft_methods import _batch, _perturb, _tiny

    from lmforge.finetune.config import MethodConfig
    from lmforge.finetune.methods import apply_method

    def make():
        applied = apply_method(_tiny(), MethodConfig(name="adalora", adalora_init_r=4, adalora_target_r=1,
                                                     adalora_delta_t=1), total_steps=20)
        applied.model.eval()  # no dropout: the three copies see the same gradients
        return applied

    def steps(applied, first, last) -> dict:
        """Run steps first..last; the importance averages after step 15 (reset when the pattern is fixed)."""
        seen = {}
        for s in range(first, last + 1):
            applied.model.zero_grad()
            applied.model(*_batch()).pow(2).sum().backward()
            applied.after_step(s)
            if s == 15:
                ra = applied.tuner.rankallocator
                seen = {(n, k): v.clone() for n in ("exp_avg_ipt", "exp_avg_unc") for k, v in getattr(ra, n).items()}
        return seen

    a = make()
    _perturb(a)  # lora_E starts at zero: every importance score would stay zero
    steps(a, 1, split)
    b, fresh = make(), make()
    for other in (b, fresh):
        other.model.load_state_dict(a.model.state_dict())
    b.state().load_state_dict(a.state().state_dict())
    got, want = steps(b, split + 1, 19), steps(a, split + 1, 19)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    if split < 15:
        alone = steps(fresh, split + 1, 15)
        assert not all(torch.equal(alone[k], want[k]) for k in want)
    else:
        assert fresh.tuner.peft_config["default"].rank_pattern is None
        assert a.tuner.peft_config["default"].rank_pattern


@pytest.mark.parametrize("task,accum", [("classification", 2), ("sft", 3)])
def test_grad_accumulation_equals_one_batch(tiny_run, cls_files, chat_file, tmp_path, monkeypatch,  # noqa: F811
                                            task, accum):
    """15-row batches split 8/7 (5/5/5), class weights: every micro-batch holds a different share of the
    targets, so only normalising over the whole global batch matches accumulation 1."""
    import lmforge.finetune.trainer as tr
    from lmforge.finetune.model import TaskModel

    monkeypatch.setattr(tr, "TaskModel", partial(TaskModel, dropout=0.0))  # dropout draws differ per split
    data = cls_files / "train.tsv" if task == "classification" else chat_file
    over = {**BASE, "method.name": "lora", "train.batch_size": 15, "train.max_steps": 6, "train.eval_every": 6,
            **({"data.class_weights": True} if task == "classification" else {"task": "sft", "data.max_len": 64})}
    runs = {}
    for n in (1, accum):
        finetune(ft_cfg(tiny_run, tmp_path / str(n), data, **over, **{"train.grad_accum_steps": n}))
        runs[n] = _run(tmp_path / str(n))
    one, many = ([r for r in _records(runs[n]) if "loss" in r] for n in (1, accum))
    assert len(one) == len(many) == 6
    for a, b in zip(one, many):
        assert a["tokens"] == b["tokens"]
        for k in ("loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (a["step"], k, a[k], b[k])
    x, y = (load_file(str(runs[n] / "best" / "adapter.safetensors")) for n in (1, accum))
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6, msg=k)


def test_accumulation_needs_an_example_per_micro_batch():
    from lmforge.errors import ConfigError
    from lmforge.finetune.config import load_finetune_config

    with pytest.raises(ConfigError, match=r"train.grad_accum_steps=9 exceeds train.batch_size=8"):
        load_finetune_config(None, ["--base.path=x", "--data.train=y", "--train.batch_size=8",
                                    "--train.grad_accum_steps=9"])


def test_non_finite_steps_are_skipped_then_the_run_stops(tiny_run, cls_files, tmp_path, monkeypatch):  # noqa: F811
    from lmforge.training.engine import NativeEngine

    real, calls = NativeEngine.forward_backward, {"n": 0}

    def poisoned(self, micro, objective, factor):
        calls["n"] += 1
        loss = real(self, micro, objective, factor)
        if calls["n"] >= 3:  # from step 3 on, every gradient is NaN
            for p in self.params:
                p.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(NativeEngine, "forward_backward", poisoned)
    s = finetune(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **BASE, **{
        "method.name": "lora", "train.max_steps": 20, "train.max_bad_steps": 3, "checkpoint.every_steps": 1}))
    assert s["stop_reason"] == "non_finite" and s["skipped_steps"] == 3 and s["steps"] == 5
    assert _complete(_run(tmp_path)) == [1, 2]  # the last good checkpoints; nothing saved after the NaNs
    assert torch.isfinite(torch.tensor(s["validation"]["val_loss"]))  # the skipped updates left the weights finite


def test_host_reads_once_per_step_outside_logging(tiny_run, cls_files, tmp_path, monkeypatch):  # noqa: F811
    """Reads of tensors (item/tolist/float/int/bool) per loop iteration, leaving out the host-side batch work
    (collating and counting the CPU batch's targets, which never touches the device): exactly one, the
    step's agreed finite/stop flags, except on logging (5, 10, 12) and evaluation (8, 12) steps."""
    from lmforge.finetune.data import TaskBatches
    from lmforge.finetune.trainer import TaskObjective
    from lmforge.training.step import TrainStep

    state = {"reads": 0, "host": 0, "at_step": []}

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            state["reads"] += state["host"] == 0
            return real(self, *a, **kw)
        return wrapper

    def host_side(fn):
        def wrapper(*a, **kw):
            state["host"] += 1
            try:
                return fn(*a, **kw)
            finally:
                state["host"] -= 1
        return wrapper

    def step_call(real):
        def wrapper(self, *a, **kw):
            state["at_step"].append(state["reads"])
            return real(self, *a, **kw)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(TaskBatches, "next_step", host_side(TaskBatches.next_step))
    monkeypatch.setattr(TaskObjective, "weight", host_side(TaskObjective.weight))
    monkeypatch.setattr(TrainStep, "__call__", step_call(TrainStep.__call__))
    finetune(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{**BASE, "train.log_every": 5}, **{
        "method.name": "lora", "train.max_steps": 12, "train.eval_every": 8, "checkpoint.every_steps": 0}))
    marks = state["at_step"]
    per_step = {i + 1: b - a for i, (a, b) in enumerate(zip(marks, marks[1:]))}  # step → reads until the next
    assert sorted(per_step) == list(range(1, 12))
    plain = {s: n for s, n in per_step.items() if s not in (5, 8, 10)}
    assert set(plain.values()) == {1}, per_step
    assert all(per_step[s] > 1 for s in (5, 8, 10)), per_step  # the counter sees the logging reads


def test_fp16_dynamic_loss_scaling(tiny_run, cls_files, tmp_path):  # noqa: F811
    s = finetune(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **BASE, **{
        "method.name": "lora", "train.max_steps": 6, "train.eval_every": 6, "train.precision": "fp16",
        "train.loss_scale_init": 2.0 ** 40}))
    recs = [r for r in _records(_run(tmp_path)) if "loss" in r]
    assert s["skipped_steps"] >= 1 and recs[-1]["loss_scale"] < 2.0 ** 40  # overflows skipped, scale lowered
    assert torch.isfinite(torch.tensor(s["validation"]["val_loss"]))


def _two_rank_body(rank, world, out, run, files):
    """(uninterrupted, cut, resumed) summaries, and whether best weights loaded from a checkpoint state are put
    back into the zero3-sharded model exactly."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    over = {**BASE, "method.name": "lora", "train.batch_size": 13, "train.max_steps": 8, "train.eval_every": 4,
            "distributed.strategy": "zero3"}

    def cfg(name, **kw):
        return ft_cfg(run, out / name, files / "train.tsv", **over, **kw)

    res = {"ref": finetune(cfg("ref")), "cut": finetune(cfg("cut", **{"train.max_minutes": 1e-6}))}
    res["done"] = finetune(cfg("cut", **{"checkpoint.resume": "auto"}))
    res["round_trip"] = _best_round_trip(cfg("unit"))
    dist.destroy_process_group()
    return res


def _best_round_trip(cfg) -> bool:
    from torch.distributed.tensor import DTensor

    from lmforge.distributed.mesh import destroy_distributed
    from lmforge.finetune.distributed import agree, start
    from lmforge.finetune.methods import adapter_tensors
    from lmforge.finetune.trainer import FinetuneRun

    pdims = start(cfg)
    run = FinetuneRun(cfg, pdims)
    assert run.best.update(1, {run.best.key: 1.0})
    saved = agree(run.best.state_dict(), pdims)  # what every rank reads from trainer.pt
    with torch.no_grad():
        for t in adapter_tensors(run.applied).values():
            (t.to_local() if isinstance(t, DTensor) else t).add_(1.0)  # the live weights move on
    run.best.load_state_dict(saved)
    run.best.restore()
    live = {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in adapter_tensors(run.applied).items()}
    ok = sorted(live) == sorted(saved["tensors"]) and all(torch.equal(live[k].cpu(), v)
                                                          for k, v in saved["tensors"].items())
    ok = ok and any(isinstance(t, DTensor) for t in adapter_tensors(run.applied).values())
    destroy_distributed()
    return ok


@pytest.mark.multiprocess
def test_two_ranks_resume_bitwise(tiny_run, cls_files, tmp_path):  # noqa: F811
    from tests.helpers.ranks import run_ranks

    results = run_ranks(_two_rank_body, 2, tmp_path, 180, tiny_run, cls_files)
    r = results[0]
    assert r["cut"]["stop_reason"] == "time_budget" and r["cut"]["steps"] == 1
    assert r["done"]["steps"] == 8 and r["done"]["resumed_from"].endswith("step_0000001")
    assert (r["done"]["best_step"], r["done"]["validation"]) == (r["ref"]["best_step"], r["ref"]["validation"])
    _assert_bitwise(_run(tmp_path / "cut") / "best", _run(tmp_path / "ref") / "best", "adapter.safetensors")
    _assert_bitwise(_run(tmp_path / "cut") / "merged", _run(tmp_path / "ref") / "merged", "model.safetensors")
    assert results[0]["round_trip"] and results[1]["round_trip"]
