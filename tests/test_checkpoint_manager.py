"""lmforge.checkpoint at world size 1: the manager's round trip, fallback and refusal policy, pruning, crash
safety, bf16 masters, the DeepSpeed engine hook, the pre-refactor fixtures (tests/fixtures/legacy_v1) and the
weights readers for every format. Multi-process resharding: test_checkpoint_reshard.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.fixtures.make_legacy_runs import tensor_sha256
from tests.helpers.checkpoints import (EXPECTED, FIX, SEQ, VOCAB, _assert_same, _cfg, _corrupt, _fixture_manager,
                                     _fixture_parts, _manager, _named_optim, _plain, _step, _trained,
                                     same_kernels_as_fixture, save_and_die)

from lmforge.checkpoint import (CheckpointError, CheckpointManager, DictState, complete_folders, consolidate,
                                full_weights, load_model_weights, newest_valid, read_manifest, read_state,
                                resolve_source)
from lmforge.config import build_config, load_config
from lmforge.models import build_model
from lmforge.training.optim import build_optimizer


# ----------------------------------------------------------------------------------------------- world size 1


def test_round_trip_restores_everything_bitwise(tmp_path):
    model, opt, mgr = _trained(tmp_path)
    path = mgr.last_saved
    assert path == tmp_path / "checkpoints" / "step_0000002" and mgr.last_saved == complete_folders(tmp_path)[-1]
    man = read_manifest(path)
    assert (man["format_version"], man["format"], man["step"], man["world_size"]) == (2, "dcp", 2, 1)
    assert set(man["files"]) == {".metadata", "__0_0.distcp", "trainer.pt", "rank_00000.pt"}
    after_save = torch.rand(4)
    model2, opt2, sched2 = _plain(seed=9)
    counters: dict = {}
    mgr2 = _manager(tmp_path, model2, opt2, sched2, counters)
    assert mgr2.load("auto") == path and counters == {"step": 2}
    _assert_same(model2.state_dict(), model.state_dict(), "model")
    assert model2.output.weight is model2.tok_embeddings.weight  # the tie survives
    _assert_same(_named_optim(model2, opt2), _named_optim(model, opt), "optimizer")
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert sched2.state_dict() == mgr.shared["scheduler"].state_dict()
    assert torch.equal(torch.rand(4), after_save)  # RNG restored to the moment of the save
    for m, o in ((model, opt), (model2, opt2)):  # and training continues identically
        _step(m, o, seed=3)
    _assert_same(model2.state_dict(), model.state_dict(), "model after one more step")
    assert mgr2.load(None) is None and mgr2.load("") is None


def test_corrupted_newest_falls_back_with_a_warning(tmp_path, capsys):
    _trained(tmp_path)
    victim = _corrupt(tmp_path / "checkpoints" / "step_0000002")
    model, opt, sched = _plain(3)
    counters: dict = {}
    assert _manager(tmp_path, model, opt, sched, counters).load("auto").name == "step_0000001"
    assert f"warning: skipping checkpoint step_0000002: {victim}: sha256 differs" in capsys.readouterr().err
    assert counters == {"step": 1}
    assert resolve_source(tmp_path).name == "step_0000001"  # the readers follow the same policy
    assert "skipping checkpoint step_0000002" in capsys.readouterr().err


def test_all_corrupt_lists_each_and_touches_nothing(tmp_path):
    _trained(tmp_path)
    root = tmp_path / "checkpoints"
    _corrupt(root / "step_0000002")
    (root / "step_0000001" / "trainer.pt").write_bytes(b"truncated")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    model, opt, sched = _plain(3)
    for call in (lambda: _manager(tmp_path, model, opt, sched).load("auto"), lambda: full_weights(tmp_path)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError, match="none of the 2 checkpoints") as e:
                call()
        assert "step_0000002/__0_0.distcp: sha256 differs" in str(e.value)
        assert "step_0000001/trainer.pt: 9 bytes, manifest says" in str(e.value)
        assert "nothing was loaded, deleted or overwritten" in e.value.hint
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_explicit_paths_missing_or_incomplete(tmp_path, capsys):
    model, opt, mgr = _trained(tmp_path, steps=(1,))
    with pytest.raises(CheckpointError, match=r"cannot resume from .*nope: .*nope: does not exist"):
        mgr.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"--checkpoint .*nope: does not exist"):
        resolve_source(tmp_path, checkpoint=tmp_path / "nope")
    half = tmp_path / "checkpoints" / "step_0000005"
    shutil.copytree(mgr.last_saved, half)
    (half / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        mgr.load(half)
    assert newest_valid(tmp_path).name == "step_0000001"
    assert re.search("skipping checkpoint step_0000005: .*no COMPLETE marker", capsys.readouterr().err)
    mgr.save(6)
    assert half.is_dir()  # a step folder without the marker is never read and never deleted
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(model, tmp_path / "missing-run")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*empty-run/checkpoints"):
        (tmp_path / "empty-run").mkdir()
        load_model_weights(model, tmp_path / "empty-run")


def test_shape_mismatch_names_the_tensors(tmp_path):
    _, _, mgr = _trained(tmp_path, steps=(1,))
    big, opt, _ = _plain(0, d_model=32)
    for call in (lambda: _manager(tmp_path, big, opt).load("auto"), lambda: load_model_weights(big, tmp_path)):
        with pytest.raises(CheckpointError, match=r"shape: tok_embeddings.weight \(48, 16\) in the checkpoint, "
                                                  r"\(48, 32\) in the model; layers.0.attention.wq.weight"):
            call()
    untied, opt, _ = _plain(0, tie=False)
    with pytest.raises(CheckpointError, match="missing from the checkpoint: output.weight"):
        _manager(tmp_path, untied, opt).load("auto")


def test_keep_last_and_keep_best(tmp_path):
    model, opt, _ = _plain(0)
    mgr = _manager(tmp_path, model, opt, keep_last=2, keep_best=1)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.8}
    for step, loss in losses.items():
        mgr.save(step, {"val_loss": loss})
    assert [p.name for p in complete_folders(tmp_path)] == ["step_0000002", "step_0000004", "step_0000005"]
    mgr.save(5, {"val_loss": 0.5})  # re-saving a step replaces it
    assert read_manifest(complete_folders(tmp_path)[-1])["metrics"] == {"val_loss": 0.5}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004", "step_0000005"]


@pytest.mark.parametrize("where", ["writer", "rename"])
def test_a_crash_mid_save_never_yields_a_loadable_folder(tmp_path, where):
    # spawn, not fork: a child forked after this process ran a parallel kernel can hang in OpenMP
    child = multiprocessing.get_context("spawn").Process(target=save_and_die, args=(str(tmp_path), where))
    child.start()
    child.join(60)
    if child.exitcode is None:  # hung: fail, but leave no process behind
        child.kill()
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert leftovers == ["step_0000001", f"step_0000002.tmp-{child.pid}"]
    if where == "rename":  # everything was written, the marker too: the temporary name alone keeps it out
        assert (tmp_path / "checkpoints" / leftovers[1] / "COMPLETE").is_file()
    model, opt, sched = _plain(1)
    mgr = _manager(tmp_path, model, opt, sched)
    assert mgr.load("auto").name == "step_0000001" and resolve_source(tmp_path).name == "step_0000001"
    mgr.save(2)  # the next save removes the dead process's leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]


def test_model_filter_saves_and_expects_only_the_chosen_tensors(tmp_path):
    model, opt, _ = _plain(0)
    trainable = lambda name, t: name.startswith("layers.1.")  # noqa: E731
    CheckpointManager(tmp_path, model=model, model_filter=trainable).save(1)
    saved = full_weights(tmp_path)
    assert saved and all(k.startswith("layers.1.") for k in saved)
    other, _, _ = _plain(4)
    CheckpointManager(tmp_path, model=other, model_filter=trainable).load("auto")
    for k, v in model.state_dict().items():
        if k.startswith("layers.1.") or v.ndim > 1:  # (norm gains start equal)
            assert torch.equal(other.state_dict()[k], v) == k.startswith("layers.1."), k


def test_bf16_master_weights_round_trip(tmp_path):
    from lmforge.training.precision import MasterWeights

    tc = build_config({"training": {"param_dtype": "bfloat16", "master_weights": True}}).training

    def parts(seed):
        model = build_model(_cfg().model, seed=seed)
        master = MasterWeights.maybe(model, tc)  # the optimizer steps fp32 copies named by its param_names
        return model, master, build_optimizer(model, _cfg().optimizer, master.substitute())

    model, master, opt = parts(0)
    model(torch.randint(0, VOCAB, (2, SEQ))).float().square().mean().backward()
    master.grads_to_master()
    opt.step()
    master.master_to_model()
    CheckpointManager(tmp_path, model=model, optimizer=opt, shared={"master": master}).save(1)
    model2, master2, opt2 = parts(1)
    CheckpointManager(tmp_path, model=model2, optimizer=opt2, shared={"master": master2}).load("auto")
    _assert_same(model2.state_dict(), model.state_dict(), "bf16 model")
    _assert_same(master2.state_dict(), master.state_dict(), "fp32 master copies")
    _assert_same(_named_masters(master2, opt2), _named_masters(master, opt), "optimizer over the copies")


def _named_masters(master, opt) -> dict:
    names = {id(m): n for n, m in zip(master.names, master.master_params)}
    return {f"{names[id(p)]}.{k}": v.detach().clone() for p, st in opt.state.items() for k, v in st.items()}


class FakeEngine:
    """Stands in for the DeepSpeed adapter: model weights in its own file inside the folder."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def save_checkpoint(self, folder: Path) -> None:
        self.calls.append(("save", folder.name))
        (folder / "engine").mkdir()
        torch.save(self.model.state_dict(), folder / "engine" / "weights.pt")

    def load_checkpoint(self, folder: Path) -> None:
        self.calls.append(("load", folder.name))
        self.model.load_state_dict(torch.load(folder / "engine" / "weights.pt"))


def test_deepspeed_engine_hook_inside_the_folder_protocol(tmp_path):
    model, opt, _ = _plain(0)
    engine = FakeEngine(model)
    counters = {"step": 7}
    path = CheckpointManager(tmp_path, model=model, engine=engine, shared={"trainer": DictState(counters)}).save(7)
    assert engine.calls == [("save", "step_0000007.tmp-%d" % os.getpid())]
    man = read_manifest(path)
    assert man["format"] == "deepspeed" and set(man["files"]) == {"engine/weights.pt", "trainer.pt", "rank_00000.pt"}
    other, _, _ = _plain(5)
    got: dict = {}
    engine2 = FakeEngine(other)
    assert CheckpointManager(tmp_path, model=other, engine=engine2, shared={"trainer": DictState(got)}).load("auto")
    assert engine2.calls == [("load", "step_0000007")] and got == counters
    _assert_same(other.state_dict(), model.state_dict(), "engine-loaded model")
    with pytest.raises(CheckpointError, match="written by the deepspeed engine; resume it with distributed.engine="):
        CheckpointManager(tmp_path, model=other, optimizer=opt).load("auto")
    _corrupt(path, "engine/weights.pt")  # the engine's files are covered by the manifest too
    with pytest.raises(CheckpointError, match="engine/weights.pt: sha256 differs"):
        CheckpointManager(tmp_path, model=other, engine=engine2).load(path)
    _trained(tmp_path / "native", steps=(1,))
    with pytest.raises(CheckpointError, match="written by the native engine"):
        CheckpointManager(tmp_path / "native", model=other, engine=engine2).load("auto")


def test_missing_deepspeed_is_a_setup_error(tmp_path, monkeypatch):
    from lmforge.errors import SetupError

    model, _, _ = _plain(0)
    CheckpointManager(tmp_path, model=model, engine=FakeEngine(model)).save(1)
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")] or ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import deepspeed` (and its submodules) raises ImportError
    with pytest.raises(SetupError, match="needs DeepSpeed") as e:
        full_weights(tmp_path)
    assert "lmforge[deepspeed]" in e.value.hint


# ------------------------------------------------------------------------------------------------- fixtures


def test_legacy_single_process_fixture_loads_every_tensor():
    from safetensors.torch import load_file

    _, model, opt, sched = _fixture_parts("single")
    counters, loader = {}, {}
    path = _fixture_manager("single", model, opt, sched, counters, loader).load("auto")
    assert path.name == "step_0000004" and counters["step"] == 4 and loader["samples"] == 16
    weights = load_file(str(path / "model.safetensors"))
    _assert_same(model.state_dict(), {**weights, "output.weight": weights["tok_embeddings.weight"]}, "weights")
    raw = torch.load(path / "state.pt", weights_only=False)
    now = opt.state_dict()
    assert now["param_groups"] == raw["optimizer"]["param_groups"]
    for i, st in raw["optimizer"]["state"].items():
        _assert_same(now["state"][i], st, f"optimizer state {i}")
    assert sched.state_dict() == raw["scheduler"]
    assert torch.equal(torch.get_rng_state(), raw["rng"]["torch"])


def test_legacy_dcp_fixture_loads_every_tensor_into_one_process(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _, model, opt, sched = _fixture_parts("zero3")
    counters, loader = {}, {}
    path = _fixture_manager("zero3", model, opt, sched, counters, loader).load("auto")
    assert path.name == "step_0000002" and counters["step"] == 2
    assert loader["world_size"] == 2 and loader["samples"] == 8  # world size changed: rank 0's state
    dcp_to_torch_save(path, tmp_path / "all.pt")  # torch's own reader as the reference
    ref = torch.load(tmp_path / "all.pt", weights_only=False)
    _assert_same(model.state_dict(), ref["model"], "weights")
    _assert_same(_named_optim(model, opt), {k[len("state."):]: v for k, v in ref["optim"].items()
                                            if k.startswith("state.")}, "optimizer")


def test_weights_readers_for_every_format(tmp_path):
    from safetensors.torch import load_file

    from lmforge.inference import load_run

    single = FIX / "single" / "checkpoints" / "step_0000004"
    meta = FIX / "distcp_meta" / "step_0000001"
    sha = EXPECTED["single"]["step4_sha256"]
    assert {k: tensor_sha256(v) for k, v in full_weights(FIX / "single").items()} == \
        {k: v for k, v in sha.items() if k != "output.weight"}
    z3 = full_weights(FIX / "zero3")
    assert "output.weight" not in z3 and z3.keys() == load_file(str(single / "model.safetensors")).keys()
    assert {k: tensor_sha256(v) for k, v in full_weights(meta).items()} == \
        {k: v for k, v in EXPECTED["distcp_meta"]["step1_sha256"].items() if k != "output.weight"}
    model, _, _, used = load_run(FIX / "single")
    assert used == single and torch.equal(model.output.weight, load_file(str(single / "model.safetensors"))[
        "tok_embeddings.weight"])
    for src in (single, FIX / "zero3", meta, consolidate(single, tmp_path / "c.safetensors")):
        out = consolidate(src, tmp_path / "out.safetensors")
        _assert_same(load_file(str(out)), full_weights(src), f"consolidate {src}")
        load_model_weights(model, out)
        _assert_same({k: v for k, v in model.state_dict().items() if k != "output.weight"}, full_weights(src), str(src))
    state = read_state(FIX / "zero3")
    assert state["shared"]["trainer"]["step"] == 2 and state["rank0"]["loader"]["batch_size"] == 1
    assert set(state["optim"]) >= {"state.norm.weight.exp_avg", "param_groups.norm.weight.lr"}


def test_legacy_single_process_run_resumes_bitwise(tmp_path, monkeypatch):
    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    shutil.copytree(FIX, tmp_path / "fx")
    run = tmp_path / "fx" / "single"
    cfg = load_config(run / "config.yaml", [f"--run_dir={run}", f"--data.path={tmp_path / 'fx' / 'data'}",
                                            f"--checkpoint.resume={run / 'checkpoints' / 'step_0000002'}"])
    train(cfg)
    weights = full_weights(run / "checkpoints" / "step_0000004")
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    if same_kernels_as_fixture():  # the kernels that wrote it: bitwise
        assert {k: tensor_sha256(v) for k, v in weights.items()} == EXPECTED["single"]["step4_sha256"]
        assert losses == EXPECTED["single"]["losses"]
        return
    # other CPU kernels (AVX2 only, or another vendor's GEMM) round the same steps differently in the last bits: the continuation
    # must still be the original run's to float noise (a wrong optimizer state, RNG or data position is not)
    original = full_weights(FIX / "single" / "checkpoints" / "step_0000004")
    for k, v in original.items():
        assert torch.allclose(weights[k], v, rtol=1e-4, atol=1e-6), k
    assert losses == pytest.approx(EXPECTED["single"]["losses"], rel=1e-5)
