"""Every schedule against its formula (written out independently here), through a real LambdaLR."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ConfigError, SchedulerConfig
from lmforge.training.schedule import build_scheduler

LR, N, W, M = 0.5, 50, 5, 0.1


def _lrs(cfg: SchedulerConfig, steps: int = N) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=LR)
    sched = build_scheduler(opt, cfg, N)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _warm_or(s, after):
    return LR * (s + 1) / W if s < W else after(s)


def _p(s):
    return min(max((s - W) / (N - W), 0.0), 1.0)


EXPECTED = {
    "cosine": lambda s: _warm_or(s, lambda s: LR * (M + (1 - M) * 0.5 * (1 + math.cos(math.pi * _p(s))))),
    "linear": lambda s: _warm_or(s, lambda s: LR * (1 - (1 - M) * _p(s))),
    "constant": lambda s: _warm_or(s, lambda s: LR),
    "inverse_sqrt": lambda s: _warm_or(s, lambda s: LR * math.sqrt(W / (s + 1))),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_native(name):
    got = _lrs(SchedulerConfig(name=name, warmup_steps=W, min_lr_ratio=M), N + 5)
    for s, lr in enumerate(got):
        assert lr == pytest.approx(EXPECTED[name](s), rel=1e-12, abs=1e-15), (name, s)
    if name in ("cosine", "linear"):
        assert got[N] == pytest.approx(LR * M) and got[-1] == pytest.approx(LR * M)  # holds after the end


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd(shape):
    got = _lrs(SchedulerConfig(name="wsd", warmup_steps=W, min_lr_ratio=M,
                               params={"decay_fraction": 0.2, "decay_shape": shape}))
    start = N - 10
    for s, lr in enumerate(got):
        if s < W:
            want = LR * (s + 1) / W
        elif s < start:
            want = LR
        else:
            q = (s - start) / 10
            f = {"linear": q, "sqrt": math.sqrt(q), "cosine": 1 - 0.5 * (1 + math.cos(math.pi * q))}[shape]
            want = LR * (1 - (1 - M) * f)
        assert lr == pytest.approx(want, rel=1e-12), (shape, s)


def test_deepspeed_warmup_lr_log_and_linear():
    for kind in ("log", "linear"):
        params = {"warmup_min_lr": 0.01, "warmup_max_lr": 0.3, "warmup_num_steps": 8, "warmup_type": kind}
        got = _lrs(SchedulerConfig(name="WarmupLR", params=params))
        for s, lr in enumerate(got):
            gamma = (math.log(s + 1) / math.log(8) if kind == "log" else s / 8) if s < 8 else 1.0
            assert lr == pytest.approx(0.01 + 0.29 * gamma, rel=1e-12), (kind, s)


def test_deepspeed_warmup_decay_lr():
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.2, "warmup_num_steps": 10, "total_num_steps": 40}
    got = _lrs(SchedulerConfig(name="WarmupDecayLR", params=params))
    for s, lr in enumerate(got):
        gamma = math.log(s + 1) / math.log(10) if s < 10 else max(0.0, (40 - s) / 30)
        assert lr == pytest.approx(0.2 * gamma, rel=1e-12, abs=1e-15), s


def test_deepspeed_warmup_cosine_lr():
    params = {"warmup_min_ratio": 0.1, "warmup_num_steps": 6, "total_num_steps": 40, "cos_min_ratio": 0.05,
              "warmup_type": "linear"}
    got = _lrs(SchedulerConfig(name="WarmupCosineLR", params=params))
    for s, lr in enumerate(got):
        if s < 6:
            r = 0.1 + (s / 6) * 0.9
        else:
            r = max(0.0, 0.05 + 0.95 * (1 + math.cos(math.pi * (s - 6 + 1) / 34)) / 2)
        assert lr == pytest.approx(LR * r, rel=1e-12), s


def test_deepspeed_one_cycle():
    params = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 10, "cycle_second_step_size": 15,
              "decay_lr_rate": 0.5, "decay_step_size": 5}
    got = _lrs(SchedulerConfig(name="OneCycle", params=params))
    for s, lr in enumerate(got):  # DeepSpeed 0.19 OneCycle: cycle position uses iteration s+1
        if s < 25:
            b = s + 1
            x = 1 + b / 25 - math.floor(1 + b / 25)
            scale = x / 0.4 if x <= 0.4 else (x - 1) / (0.4 - 1)
            want = 0.01 + 0.09 * scale
        else:
            want = 0.01 / (1 + 0.5 * (s - 25 + 1) / 5)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), s
    assert max(got) == pytest.approx(0.1) and got.index(max(got)) == 9


def test_deepspeed_lr_range_test():
    for stair in (False, True):
        params = {"lr_range_test_min_lr": 0.001, "lr_range_test_step_size": 4, "lr_range_test_step_rate": 2.0,
                  "lr_range_test_staircase": stair}
        got = _lrs(SchedulerConfig(name="LRRangeTest", params=params))
        for s, lr in enumerate(got):
            interval = (s + 1) / 4
            interval = math.floor(interval) if stair else interval
            assert lr == pytest.approx(0.001 * (1 + 2.0 * interval), rel=1e-12), (stair, s)


def test_state_dict_resume_continues_exactly():
    cfg = SchedulerConfig(name="cosine", warmup_steps=W, min_lr_ratio=M)
    full = _lrs(cfg)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=LR)
    sched = build_scheduler(opt, cfg, N)
    for _ in range(17):
        opt.step()
        sched.step()
    sd_opt, sd_sched = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched2 = build_scheduler(opt2, cfg, N)
    opt2.load_state_dict(sd_opt)
    sched2.load_state_dict(sd_sched)
    rest = []
    for _ in range(N - 17):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == full[17:]


def test_bad_params_named():
    with pytest.raises(ConfigError, match="scheduler.params.warmup_steps"):
        _lrs(SchedulerConfig(name="WarmupLR", params={"warmup_steps": 3}))
    with pytest.raises(ConfigError, match="decay_shape"):
        _lrs(SchedulerConfig(name="wsd", params={"decay_shape": "exp"}))
