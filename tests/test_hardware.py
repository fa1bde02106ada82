"""lmforge.hardware: the precision rules with injected probe results (AVX2-only CPU, AVX-512-bf16/AMX CPU,
CUDA with/without bf16, MPS), the matmul probe's budget/cache/RNG contract, and the MFU peak's sources.
Nothing here assumes bf16 is fast or slow on the machine running the tests."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.hardware import facts, matmul as probe_mod, peak, precision
from lmforge.hardware.precision import resolve_precision
from lmforge.hardware.matmul import ProbeResult

G = 1e9
# The AMD EPYC Zen 3 (AVX2, bf16 emulated ~60× slower) and this project's AMX Xeon.
AVX2 = ProbeResult("cpu", {"fp32": 43.7 * G, "bf16": 0.7 * G, "fp16": 1.1 * G})
AMX = ProbeResult("cpu", {"fp32": 330 * G, "bf16": 1350 * G, "fp16": 260 * G})
EPYC, XEON = "AMD EPYC 7B13 64-Core Processor", "Intel(R) Xeon(R) Platinum 8481C"


def cpu(want, probe, model=EPYC):
    return resolve_precision(want, "cpu", probe=probe, cpu_model=model)


# ----- CPU rules -----

def test_avx2_cpu_auto_picks_fp32_and_says_why():
    c = cpu("auto", AVX2)
    assert (c.precision, c.requested, c.device, c.loss_scaling, c.warning) == ("fp32", "auto", "cpu", False, None)
    assert "43.7" in c.reason and "0.7" in c.reason
    assert c.peak_flops == 43.7 * G and c.dtype is torch.float32


def test_amx_cpu_auto_picks_bf16():
    c = cpu("auto", AMX, XEON)
    assert c.precision == "bf16" and c.warning is None and c.peak_flops == 1350 * G
    assert "4.1×" in c.reason


def test_explicit_bf16_on_avx2_runs_but_warns_with_the_measured_slowdown():
    c = cpu("bf16", AVX2)
    assert c.precision == "bf16"
    assert "62× slower" in c.warning and EPYC in c.warning and "auto picks fp32" in c.warning
    assert "training.precision=bf16" in c.warning


def test_explicit_bf16_on_amx_and_explicit_fp32_are_quiet():
    assert cpu("bf16", AMX, XEON).warning is None
    assert cpu("fp32", AMX, XEON).precision == "fp32" and cpu("fp32", AMX, XEON).warning is None
    assert cpu("fp32", AVX2).warning is None


@pytest.mark.parametrize("probe", [AVX2, AMX], ids=["avx2", "amx"])
def test_cpu_fp16_is_honoured_with_a_warning_and_loss_scaling(probe):
    c = cpu("fp16", probe)
    assert c.precision == "fp16" and c.loss_scaling and "auto" in c.warning


def test_auto_never_picks_fp16_on_cpu_even_when_it_measures_fastest():
    fast_fp16 = ProbeResult("cpu", {"fp32": 100 * G, "bf16": 90 * G, "fp16": 500 * G})
    assert cpu("auto", fast_fp16).precision == "fp32"


def test_bf16_must_clearly_beat_fp32():
    close = ProbeResult("cpu", {"fp32": 100 * G, "bf16": 110 * G, "fp16": None})
    assert cpu("auto", close).precision == "fp32"
    clear = ProbeResult("cpu", {"fp32": 100 * G, "bf16": 120 * G, "fp16": None})
    assert cpu("auto", clear).precision == "bf16"


def test_a_disturbed_probe_is_named_in_the_reason():
    noisy = ProbeResult("cpu", AVX2.peaks, cpu_share=0.3)
    assert "disturbed" in cpu("auto", noisy).reason


def test_the_config_key_is_named_and_bad_values_rejected():
    assert "train.precision=bf16" in resolve_precision("bf16", "cpu", probe=AVX2, key="train.precision",
                                                       cpu_model=EPYC).warning
    with pytest.raises(ConfigError, match=r"'training.precision'.*'bf15'.*auto, fp32, bf16, fp16"):
        resolve_precision("bf15", "cpu", probe=AVX2)


def test_warning_prints_once_per_process(monkeypatch):
    monkeypatch.setattr(precision, "_WARNED", set())
    c = cpu("bf16", AVX2)
    out = io.StringIO()
    assert c.warn(out) is True and cpu("bf16", AVX2).warn(out) is False
    assert out.getvalue().count("warning:") == 1
    assert cpu("auto", AVX2).warn(out) is False  # nothing to say


def test_choice_serialises_for_config_and_summary():
    d = cpu("auto", AMX, XEON).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"precision", "requested", "device", "reason", "peaks", "loss_scaling", "warning"}
    assert cpu("auto", AMX, XEON).log_line().startswith("precision bf16 (auto): ")


# ----- CUDA and MPS rules -----

def test_cuda_with_native_bf16_picks_bf16():
    c = resolve_precision("auto", "cuda", probe=AMX, bf16_supported=True)
    assert (c.precision, c.loss_scaling, c.warning, c.device) == ("bf16", False, None, "cuda")


def test_cuda_without_bf16_picks_fp16_with_loss_scaling_and_warns_on_explicit_bf16():
    c = resolve_precision("auto", "cuda", probe=AMX, bf16_supported=False)
    assert c.precision == "fp16" and c.loss_scaling and "loss scaling" in c.reason
    b = resolve_precision("bf16", "cuda", probe=AMX, bf16_supported=False)
    assert b.precision == "bf16" and "emulated" in b.warning
    assert resolve_precision("fp32", "cuda", probe=AMX, bf16_supported=False).precision == "fp32"


@pytest.mark.parametrize("peaks,want", [
    ({"fp32": 5 * G, "bf16": 10 * G, "fp16": 10 * G}, "bf16"),  # both work and are fast: bf16 (no loss scale)
    ({"fp32": 5 * G, "bf16": None, "fp16": 10 * G}, "fp16"),  # older macOS: no bf16
    ({"fp32": 5 * G, "bf16": 6 * G, "fp16": 12 * G}, "fp16"),  # fp16 clearly fastest
    ({"fp32": 5 * G, "bf16": None, "fp16": None}, "fp32"),
    ({"fp32": 5 * G, "bf16": 5.2 * G, "fp16": 5.1 * G}, "fp32"),  # no real gain
])
def test_mps_picks_the_fastest_that_works(peaks, want):
    c = resolve_precision("auto", "mps", probe=ProbeResult("mps", peaks))
    assert c.precision == want and c.loss_scaling == (want == "fp16")


def test_mps_explicit_dtype_it_cannot_run_warns():
    c = resolve_precision("bf16", "mps", probe=ProbeResult("mps", {"fp32": 5 * G, "bf16": None, "fp16": 9 * G}))
    assert c.precision == "bf16" and "could not run bf16" in c.warning


# ----- facts -----

EPYC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni
"""
SPR_CPUINFO = """model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 avx512_fp16
"""


def test_cpuinfo_parsing_and_bf16_flags():
    model, flags = facts.parse_cpuinfo(EPYC_CPUINFO)
    f = facts.flag_facts(flags, "x86_64")
    assert model == EPYC and f["flags"]["avx2"] and not f["flags"]["avx512f"] and not f["native_bf16"]
    model, flags = facts.parse_cpuinfo(SPR_CPUINFO)
    f = facts.flag_facts(flags, "x86_64")
    assert f["native_bf16"] and f["flags"]["amx_bf16"] and f["flags"]["amx_tile"]
    arm = facts.flag_facts(facts.parse_cpuinfo("Features\t: fp asimd sve bf16\n")[1], "aarch64")
    assert arm["native_bf16"] and arm["flags"]["sve"] and "avx2" not in arm["flags"]


def test_facts_of_this_machine_have_the_documented_types():
    c = facts.cpu_facts()
    assert isinstance(c["flags"], dict) and all(isinstance(v, bool) for v in c["flags"].values())
    assert c["torch_threads"] == torch.get_num_threads() and c["usable_cpus"] >= 1
    d = facts.device_facts()
    assert set(d) == {"cuda", "mps"} and isinstance(d["cuda"]["devices"], list)
    assert d["cuda"]["available"] == torch.cuda.is_available()


# ----- the probe -----

def test_probe_measures_every_dtype_fast_without_touching_rng_or_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    t0 = time.perf_counter()
    r = probe_mod.probe("cpu")
    took = time.perf_counter() - t0
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert set(r.peaks) == {"fp32", "bf16", "fp16"} and r.peaks["fp32"] > 1e8
    assert all(v is None or v > 0 for v in r.peaks.values())
    assert r.best_shape["fp32"] in {"×".join(map(str, s)) for s in probe_mod.CPU_SHAPES}
    assert took < (3.0 if r.disturbed else 1.5), (took, r)  # budget ~0.45 s; twice that when re-measured
    assert f"threads {threads}" in r.key and torch.__version__ in r.key


def test_probe_cache_is_keyed_and_skips_disturbed_results(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    calls = []

    def fake_measure(device, budgets=None):
        calls.append(device)
        return ProbeResult("cpu", dict(AMX.peaks), {}, 2, 0.4, probe_mod.probe_key(torch.device("cpu")),
                           cpu_share=share)

    monkeypatch.setattr(probe_mod, "measure", fake_measure)
    monkeypatch.setattr(probe_mod, "_DISTURBED", {})
    share = 0.2  # neighbours took the cores: measured twice, used, not cached on disk ...
    r = probe_mod.probe("cpu")
    assert r.disturbed and len(calls) == 2 and not (tmp_path / "hardware_probe.json").exists()
    assert probe_mod.probe("cpu") is r and len(calls) == 2  # ... but not measured again by this process
    probe_mod._DISTURBED.clear()  # a new process
    share = 0.95
    first = probe_mod.probe("cpu")
    again = probe_mod.probe("cpu")
    assert len(calls) == 3 and not first.cached and again.cached and again.peaks == AMX.peaks
    stored = json.loads((tmp_path / "hardware_probe.json").read_text())
    assert list(stored) == [first.key] and "measured_at" in stored[first.key]
    probe_mod.probe("cpu", refresh=True)
    assert len(calls) == 4


def test_probe_key_follows_the_instruction_sets_torch_may_use(monkeypatch):
    """Capping oneDNN / MKL (or ATEN_CPU_CAPABILITY) below the CPU's flags changes which dtype is fast, so it is
    a different cache entry: a probe of the uncapped machine is never reused for the capped one."""
    from lmforge.hardware.facts import cpu_identity

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    plain = probe_mod.probe_key(torch.device("cpu"))
    assert f"isa:{torch.backends.cpu.get_cpu_capability()}" in cpu_identity()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = probe_mod.probe_key(torch.device("cpu"))
    assert capped != plain and "ONEDNN_MAX_CPU_ISA=AVX2" in capped


def test_merge_keeps_the_better_figure_per_dtype():
    a = ProbeResult("cpu", {"fp32": 10 * G, "bf16": None, "fp16": 3 * G}, {"fp32": "a", "fp16": "a"}, cpu_share=0.3)
    b = ProbeResult("cpu", {"fp32": 8 * G, "bf16": 2 * G, "fp16": 4 * G}, {"fp32": "b", "bf16": "b", "fp16": "b"},
                    cpu_share=0.9)
    m = probe_mod._merge(a, b)
    assert m.peaks == {"fp32": 10 * G, "bf16": 2 * G, "fp16": 4 * G}
    assert m.best_shape == {"fp32": "a", "bf16": "b", "fp16": "b"} and not m.disturbed


def test_an_emulated_dtype_stops_the_ladder_early(monkeypatch):
    """A dtype at ~1 GFLOP/s must not run the big shapes (each would take seconds)."""
    seen = []

    def slow(shape, dtype, device, gen, deadline, clock):
        seen.append(shape)
        time.sleep(2.0 * shape[0] * shape[1] * shape[2] / 1e9 * 2)  # warm-up + one sample at 1 GFLOP/s
        return 1e9

    monkeypatch.setattr(probe_mod, "_time_shape", slow)
    best, shape = probe_mod.measure_dtype(torch.bfloat16, torch.device("cpu"), 0.15)
    assert best == 1e9 and seen == list(probe_mod.CPU_SHAPES[:2])


def test_a_dtype_the_device_cannot_run_is_none(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(probe_mod, "_time_shape", boom)
    assert probe_mod.measure_dtype(torch.float16, torch.device("cpu"), 0.1) == (None, None)


# ----- MFU peak -----

def test_peak_sources(monkeypatch):
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS", raising=False)
    assert peak.peak_info("cpu", torch.bfloat16, AVX2) == (0.7 * G, "measured")
    assert peak.peak_info("cpu", torch.float32, AVX2) == (43.7 * G, "measured")
    no_fp16 = ProbeResult("cpu", {"fp32": 5 * G, "bf16": 1 * G, "fp16": None})
    assert peak.peak_info("cpu", torch.float16, no_fp16) == (5 * G, "measured")
    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    assert peak.peak_info("cpu", torch.float32, AVX2) == (1e11, "env")
    from lmforge.training.metrics import peak_flops

    assert peak_flops(torch.device("cpu"), torch.bfloat16) == 1e11  # the trainer's hook delegates here


def test_datasheet_longest_name_wins():
    assert peak.datasheet_peak("NVIDIA H100 80GB HBM3 H100 SXM") == 989e12
    assert peak.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert peak.datasheet_peak("NVIDIA GH200 480GB") == 989e12
    assert peak.datasheet_peak("Radeon Pro W7900") is None
