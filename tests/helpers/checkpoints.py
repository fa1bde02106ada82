"""Shared by the checkpoint tests: tiny models and optimizers, a manager over them, named optimizer state,
full model state and exact comparison, a corrupter, and the legacy fixtures (tests/fixtures/legacy_v1)."""

from __future__ import annotations

import json
import os
import platform
import signal
from pathlib import Path

import torch

from lmforge.checkpoint import CheckpointManager, DictState, RNGState
from lmforge.config import build_config, load_config
from lmforge.models import build_model
from lmforge.training.optim import build_optimizer
from lmforge.training.schedule import build_scheduler

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v1"
EXPECTED = json.loads((FIX / "expected.json").read_text())
TIMEOUT = 150
VOCAB, SEQ = 48, 8


def fixture_kernels() -> dict:
    """What decides the last bits of an fp32 step here: the instruction set torch dispatches to and the CPU
    vendor (MKL and oneDNN take different GEMM paths on AMD and Intel at the same ISA). ``expected.json`` holds
    those of the machine that wrote the fixtures; only there is a resumed run bitwise the original."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    vendor = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("vendor_id")), platform.processor())
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_vendor": vendor}


def same_kernels_as_fixture() -> bool:
    return fixture_kernels() == {k: EXPECTED.get(k) for k in ("cpu_capability", "cpu_vendor")}


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


def save_and_die(run: str, where: str) -> None:
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
