"""lmforge.checkpoint: the manager's round trip, fallback and refusal policy, pruning, crash safety, resharding
(zero3 → zero3 / ddp / zero1 / tp / pp at 2 ranks, 2 → 1, 2 → 4), the pre-refactor fixtures
(tests/fixtures/legacy_v1), the weights readers for every format and the DeepSpeed engine hook.

Multi-process cases run in one spawn per world size (gloo ranks, hard timeout) and are checked here.
"""

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

from tests.helpers.ranks import run_ranks
from tests.fixtures.make_legacy_runs import tensor_sha256

from lmforge.checkpoint import (CheckpointError, CheckpointManager, DictState, RNGState, complete_folders,
                                consolidate, full_weights, load_model_weights, newest_valid, read_manifest,
                                read_state, resolve_source)
from lmforge.config import build_config, load_config
from lmforge.models import build_model
from lmforge.training.optim import build_optimizer
from lmforge.training.schedule import build_scheduler

FIX = Path(__file__).parent / "fixtures" / "legacy_v1"
EXPECTED = json.loads((FIX / "expected.json").read_text())
TIMEOUT = 150
VOCAB, SEQ = 48, 8


def _cfg(tie: bool = True, d_model: int = 16, opt: str = "adamw", **dist):
    return build_config({"model": {"arch": "llama", "vocab_size": VOCAB, "d_model": d_model, "n_layers": 2,
                                   "n_heads": 2, "ffn_hidden": 32, "max_seq_len": SEQ, "tie_embeddings": tie},
                         "optimizer": {"name": opt, "lr": 1e-2, "weight_decay": 0.1},
                         "scheduler": {"name": "cosine", "warmup_steps": 1},
                         "training": {"device": "cpu"}, "distributed": dist})


def _step(model, opt, seed: int, rows: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    x_BT = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    model(x_BT).float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _plain(seed: int = 0, tie: bool = True, d_model: int = 16, opt: str = "adamw"):
    cfg = _cfg(tie, d_model, opt)
    model = build_model(cfg.model, seed=seed)
    opt = build_optimizer(model, cfg.optimizer)
    return model, opt, build_scheduler(opt, cfg.scheduler, 10)


def _manager(run, model, opt, sched=None, counters=None, **kw):
    return CheckpointManager(run, model=model, optimizer=opt,
                             shared={"scheduler": sched, "trainer": DictState({} if counters is None else counters)},
                             per_rank={"rng": RNGState()}, **kw)


def _trained(run, steps=(1, 2), **kw):
    """A plain model trained and saved after each of ``steps``; returns (model, optimizer, manager)."""
    model, opt, sched = _plain(0)
    mgr = _manager(run, model, opt, sched, {"step": 0}, **kw)
    for s in steps:
        _step(model, opt, s)
        sched.step()
        mgr.shared["trainer"].data["step"] = s
        mgr.save(s, {"val_loss": 10.0 - s})
    return model, opt, mgr


def _named_optim(model, opt) -> dict:
    """Optimizer state by parameter name, read from torch's own structures (independent of the package)."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer holds its partition in .optim
    return {f"{names[id(p)]}.{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for p, st in inner.state.items() for k, v in st.items()}


def _full_model(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{what}: {k}"


def _corrupt(folder: Path, pattern: str = "__0_0.distcp") -> Path:
    victim = next(folder.glob(pattern))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


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


def _save_and_die(run: str, where: str) -> None:
    """Child process: one good checkpoint, then SIGKILL itself inside the writer or just before the rename."""
    model, opt, mgr = _trained(run, steps=(1,))

    class Dies:
        def state_dict(self):
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "rename":  # the folder's own rename (DCP renames files of its own before that)
        real = os.rename
        os.rename = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL) if ".tmp-" in Path(src).name \
            else real(src, dst)
    else:
        mgr.per_rank["dies"] = Dies()
    mgr.save(2)


@pytest.mark.parametrize("where", ["writer", "rename"])
def test_a_crash_mid_save_never_yields_a_loadable_folder(tmp_path, where):
    child = multiprocessing.get_context("fork").Process(target=_save_and_die, args=(str(tmp_path), where))
    child.start()
    child.join(60)
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


def _fixture_parts(run: str, seed: int = 5):
    cfg = load_config(FIX / run / "config.yaml")
    model = build_model(cfg.model, seed=seed)
    opt = build_optimizer(model, cfg.optimizer)
    return cfg, model, opt, build_scheduler(opt, cfg.scheduler, cfg.training.max_steps)


def _fixture_manager(run, model, opt, sched, counters, loader):
    return CheckpointManager(FIX / run, model=model, optimizer=opt,
                             shared={"scheduler": sched, "trainer": DictState(counters), "early_stop": None,
                                     "scaler": None, "master": None},
                             per_rank={"rng": RNGState(), "loader": DictState(loader)})


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
    if torch.backends.cpu.get_cpu_capability() == EXPECTED["cpu_capability"]:  # the kernels that wrote it: bitwise
        assert {k: tensor_sha256(v) for k, v in weights.items()} == EXPECTED["single"]["step4_sha256"]
        assert losses == EXPECTED["single"]["losses"]
        return
    # other CPU kernels (e.g. AVX2 only) round the same steps differently in the last bits: the continuation
    # must still be the original run's to float noise (a wrong optimizer state, RNG or data position is not)
    original = full_weights(FIX / "single" / "checkpoints" / "step_0000004")
    for k, v in original.items():
        assert torch.allclose(weights[k], v, rtol=1e-4, atol=1e-6), k
    assert losses == pytest.approx(EXPECTED["single"]["losses"], rel=1e-5)


# ------------------------------------------------------------------------------------------- multi-process


OPT = "adam"  # ZeroRedundancyOptimizer cannot rebuild AdamW (its groups' decoupled_weight_decay key)


def _dist_parts(cfg, rank: int, world: int, seed: int):
    from lmforge.distributed.mesh import ParallelDims
    from lmforge.distributed.parallelize import parallelize_model, shard_optimizer

    pdims = ParallelDims.from_config(cfg.distributed, world, rank)
    pdims.build_mesh()
    model = parallelize_model(build_model(cfg.model, seed=seed), pdims, cfg)
    return pdims, model, shard_optimizer(build_optimizer(model, cfg.optimizer), pdims, cfg)


def _dist_manager(run, pdims, model, opt, counters: dict, loader: dict):
    return CheckpointManager(run, model=model, optimizer=opt, pdims=pdims,
                             shared={"trainer": DictState(counters), "early_stop": None, "scaler": None,
                                     "master": None},
                             per_rank={"rng": RNGState(), "loader": DictState(loader)})


def _snapshot(model, opt, **extra) -> dict:
    return {"model": _full_model(model), "optim": _named_optim(model, opt), **extra}


def _slug(case: str) -> str:
    return case.replace("<-", "_from_")


def _fixture_cfg(run: str, **dist):
    cfg = load_config(FIX / run / "config.yaml")
    return cfg.model_copy(update={"distributed": _cfg(**dist).distributed})


LOADS = {  # case: (source run, distributed section, tied, model config source)
    "zero3<-zero3": ("zero3", dict(strategy="zero3"), True, None),
    "ddp<-zero3": ("zero3", dict(strategy="ddp"), True, None),
    "zero1<-zero3": ("zero3", dict(strategy="zero1"), True, None),
    "tp<-zero3": ("zero3", dict(strategy="zero3", dp_shard=1, tp=2), True, None),
    "pp<-zero3_untied": ("zero3_untied", dict(strategy="zero3", dp_shard=1, pp=2), False, None),
    "zero3<-zero1": ("zero1", dict(strategy="zero3"), True, None),
    "zero3<-legacy_dcp": (FIX / "zero3" / "checkpoints" / "step_0000002", dict(strategy="zero3"), True, "zero3"),
    "zero2<-legacy_single": (FIX / "single" / "checkpoints" / "step_0000002", dict(strategy="zero2"), True, "single"),
}


def _ranks_save_and_reshard(rank, world, out, loads):
    """Save zero3 / zero3-untied / zero1 checkpoints after one step, then load each case into fresh objects."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    res = {}
    for name, strategy, tie in (("zero3", "zero3", True), ("zero3_untied", "zero3", False), ("zero1", "zero1", True)):
        if world != 2:
            break
        pdims, model, opt = _dist_parts(_cfg(tie, opt=OPT, strategy=strategy), rank, world, seed=0)
        _step(model, opt, seed=10 + rank, rows=1)
        _dist_manager(out / name, pdims, model, opt, {"step": 1}, {"rank": rank}).save(1)
        res[f"saved/{name}"] = _snapshot(model, opt)
    for name, (source, dist_kw, tie, fixture) in loads.items():
        cfg = _fixture_cfg(fixture, **dist_kw) if fixture else _cfg(tie, opt=OPT, **dist_kw)
        pdims, model, opt = _dist_parts(cfg, rank, world, seed=7)
        counters, loader = {}, {}
        src = source if isinstance(source, Path) else out.parent / "w2" / source / "checkpoints" / "step_0000001"
        _dist_manager(out, pdims, model, opt, counters, loader).load(src)
        res[name] = _snapshot(model, opt, counters=counters, loader=loader)
        _dist_manager(out / "resaved" / _slug(name), pdims, model, opt, counters, loader).save(1)
    if world == 2:
        res["deepspeed"] = _deepspeed_round_trip(rank, world, out)
        res["resume"] = _resume_legacy_zero3(rank, out)
    dist.destroy_process_group()
    return res


class DeepSpeedAdapter:
    """The hook as the DeepSpeed engine adapter implements it: DeepSpeed's own files inside the folder."""

    def __init__(self, engine):
        self.engine = engine

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load_checkpoint(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag="deepspeed")


def _deepspeed_round_trip(rank: int, world: int, out: Path) -> dict:
    """A real ZeRO-2 DeepSpeed engine: one step, a checkpoint through the manager and one in the old engine's
    layout (``engine.save_checkpoint(checkpoints/, tag=step_N)`` + COMPLETE), then a reload after zeroing."""
    import importlib

    import deepspeed
    import torch.distributed as dist

    from lmforge.distributed.mesh import ParallelDims

    # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU worlds in a cache every venv on the machine
    # shares (so it is rebuilt, ~90 s, whenever another venv built it last); gloo's all-reduce serves here
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    cfg = _cfg(opt=OPT, strategy="zero2")
    model = build_model(cfg.model, seed=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optimizer), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "gradient_clipping": 0.0})
    engine.backward(engine(torch.randint(0, VOCAB, (1, SEQ))).float().square().mean())
    engine.step()
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    mgr = CheckpointManager(out / "ds", model=engine.module, engine=DeepSpeedAdapter(engine),
                            pdims=ParallelDims.from_config(cfg.distributed, world, rank))
    mgr.save(1)
    engine.save_checkpoint(str(out / "ds_old" / "checkpoints"), tag="step_0000001")
    dist.barrier()
    if rank == 0:
        (out / "ds_old" / "checkpoints" / "step_0000001" / "COMPLETE").write_text('{"step": 1}')
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    mgr.load("auto")
    reloaded = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"saved": saved, "reloaded": reloaded}


def _resume_legacy_zero3(rank: int, out: Path) -> str | None:
    """Resume the fixture's 2-rank zero3 run from step 2 with ``train`` (None, or the error)."""
    import torch.distributed as dist

    from lmforge.training.trainer import train

    if rank == 0:
        shutil.copytree(FIX, out / "fx")
    dist.barrier()
    run = out / "fx" / "zero3"
    cfg = load_config(run / "config.yaml", [f"--run_dir={run}", f"--data.path={out / 'fx' / 'data'}",
                                            f"--checkpoint.resume={run / 'checkpoints' / 'step_0000002'}"])
    try:
        train(cfg)
    except Exception as e:  # noqa: BLE001 - reported by the test, not by the spawn
        return f"{type(e).__name__}: {e}"
    return None


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "w2"
    return out, run_ranks(_ranks_save_and_reshard, 2, out, TIMEOUT, LOADS, env={"LMFORGE_PEAK_FLOPS": "1e11"})


def _merged(results, case, part):
    got: dict = {}
    for r in results:  # pipeline stages and ZeRO-1 partitions each hold a part
        got.update(r[case][part])
    return got


def _assert_case(results, case, saved):
    want_model = {k: v for k, v in saved["model"].items() if k in _merged(results, case, "model")}
    assert len(want_model) >= 1
    _assert_same(_merged(results, case, "model"), want_model, f"{case}: weights")
    want_optim = {k: v for k, v in saved["optim"].items() if k.rsplit(".", 1)[0] in want_model}
    _assert_same(_merged(results, case, "optim"), want_optim, f"{case}: optimizer")


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [c for c in LOADS if "legacy" not in c])
def test_two_rank_checkpoints_reshard_across_strategies(world2, case):
    _, results = world2
    source = LOADS[case][0]
    saved = {"model": results[0][f"saved/{source}"]["model"], "optim": _merged(results, f"saved/{source}", "optim")}
    _assert_case(results, case, saved)
    assert [r[case]["loader"] for r in results] == [{"rank": 0}, {"rank": 1}]  # same world size: own rank file
    assert all(r[case]["counters"] == {"step": 1} for r in results)
    if case.startswith("pp"):
        assert len(results[0][case]["model"]) < len(saved["model"])  # each stage loaded only its part
    resaved = read_state(world2[0] / "resaved" / _slug(case))  # and saves from this layout again
    _assert_same(resaved["model"], {k: v for k, v in saved["model"].items() if k != "output.weight" or
                                    not torch.equal(v, saved["model"]["tok_embeddings.weight"])}, f"{case}: resaved")
    _assert_same({k[len("state."):]: v for k, v in resaved["optim"].items() if k.startswith("state.")},
                 saved["optim"], f"{case}: resaved optimizer")
    assert (resaved["manifest"]["world_size"], resaved["manifest"]["strategy"]) == (2, LOADS[case][1]["strategy"])


@pytest.mark.multiprocess
def test_legacy_fixtures_load_into_two_sharded_ranks(world2, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _, results = world2
    path = FIX / "zero3" / "checkpoints" / "step_0000002"
    dcp_to_torch_save(path, tmp_path / "all.pt")
    ref = torch.load(tmp_path / "all.pt", weights_only=False)
    optim = {k[len("state."):]: v for k, v in ref["optim"].items() if k.startswith("state.")}
    _assert_case(results, "zero3<-legacy_dcp", {"model": ref["model"], "optim": optim})
    assert [r["zero3<-legacy_dcp"]["loader"]["world_size"] for r in results] == [2, 2]
    single = FIX / "single" / "checkpoints" / "step_0000002"
    raw = torch.load(single / "state.pt", weights_only=False)
    names = [n for g in raw["optimizer"]["param_groups"] for n in g["param_names"]]
    ids = [i for g in raw["optimizer"]["param_groups"] for i in g["params"]]
    optim = {f"{n}.{k}": v for n, i in zip(names, ids) for k, v in raw["optimizer"]["state"][i].items()}
    weights = load_file(str(single / "model.safetensors"))
    _assert_case(results, "zero2<-legacy_single", {"model": {**weights, "output.weight": weights[
        "tok_embeddings.weight"]}, "optim": optim})
    assert all(r["zero2<-legacy_single"]["loader"]["world_size"] == 1 for r in results)


@pytest.mark.multiprocess
def test_two_ranks_to_one_process_and_the_readers(world2, tmp_path):
    from safetensors.torch import load_file

    out, results = world2
    saved = {"model": results[0]["saved/zero3"]["model"], "optim": _merged(results, "saved/zero3", "optim")}
    model, opt, _ = _plain(seed=3, opt=OPT)
    counters, loader = {}, {}
    CheckpointManager(out / "zero3", model=model, optimizer=opt,
                      shared={"trainer": DictState(counters), "early_stop": None, "scaler": None, "master": None},
                      per_rank={"rng": RNGState(), "loader": DictState(loader)}).load("auto")
    _assert_same(model.state_dict(), saved["model"], "2 → 1 weights")
    _assert_same(_named_optim(model, opt), saved["optim"], "2 → 1 optimizer")
    assert loader == {"rank": 0} and counters == {"step": 1}  # other world size: rank 0's file
    tied_once = {k: v for k, v in saved["model"].items() if k != "output.weight"}
    _assert_same(full_weights(out / "zero3"), tied_once, "full_weights")
    _assert_same(load_file(str(consolidate(out / "zero3", tmp_path / "m.safetensors"))), tied_once, "consolidate")
    fresh, _, _ = _plain(seed=4)
    assert load_model_weights(fresh, out / "zero3")["world_size"] == 2
    _assert_same(fresh.state_dict(), saved["model"], "load_model_weights")
    state = read_state(out / "zero3")
    assert state["rank0"]["loader"] == {"rank": 0} and state["shared"]["trainer"] == {"step": 1}
    _assert_same({k[len("state."):]: v for k, v in state["optim"].items() if k.startswith("state.")},
                 saved["optim"], "read_state")


@pytest.mark.multiprocess
def test_two_ranks_to_four(world2):
    out, results2 = world2
    loads = {"zero3x4<-zero3": ("zero3", dict(strategy="zero3"), True, None),
             "zero3_tp<-zero3": ("zero3", dict(strategy="zero3", dp_shard=2, tp=2), True, None)}
    results = run_ranks(_ranks_save_and_reshard, 4, out.parent / "w4", TIMEOUT, loads)
    saved = {"model": results2[0]["saved/zero3"]["model"], "optim": _merged(results2, "saved/zero3", "optim")}
    for case in loads:
        _assert_case(results, case, saved)
        assert all(r[case]["loader"] == {"rank": 0} for r in results)  # new world size: rank 0's state


@pytest.mark.multiprocess
def test_deepspeed_checkpoints_through_the_hook_and_zero_to_fp32(world2, tmp_path):
    from safetensors.torch import load_file

    out, results = world2
    saved = results[0]["deepspeed"]["saved"]
    for r in results:
        _assert_same(r["deepspeed"]["reloaded"], saved, "reloaded through engine.load_checkpoint")
    tied_once = {k: v for k, v in saved.items() if k != "output.weight"}
    new, old = out / "ds", out / "ds_old" / "checkpoints" / "step_0000001"
    assert read_manifest(complete_folders(new)[-1])["format"] == "deepspeed"
    for src in (new, old):
        _assert_same(full_weights(src), tied_once, f"full_weights {src}")
        _assert_same(load_file(str(consolidate(src, tmp_path / "ds.safetensors"))), tied_once, f"consolidate {src}")
    model, _, _ = _plain(seed=2)
    load_model_weights(model, new)
    _assert_same(model.state_dict(), saved, "load_model_weights")


@pytest.mark.multiprocess
def test_legacy_zero3_run_resumes_on_two_ranks(world2):
    from safetensors.torch import load_file

    out, results = world2
    assert results[0]["resume"] is None and results[1]["resume"] is None, results[0]["resume"]
    run = out / "fx" / "zero3"
    want = load_file(str(FIX / "zero3" / "model.safetensors"))  # the step-4 weights of the original run
    assert {k: tensor_sha256(v) for k, v in want.items()} == \
        {k: v for k, v in EXPECTED["zero3"]["step4_sha256"].items() if k != "output.weight"}
    got = full_weights(run / "checkpoints" / "step_0000004")
    assert got.keys() == want.keys()
    for k, v in want.items():  # the distributed loss moves from plain to fused cross-entropy: not bitwise
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=k)
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert losses == pytest.approx(EXPECTED["zero3"]["losses"], rel=1e-6, abs=1e-6)
