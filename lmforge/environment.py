"""``lmforge env``: what matters for a run on this machine, as text or JSON; ``environment_facts()`` is the
same dict for ``summary.json`` and bug reports.

Schema (``SCHEMA_VERSION``): lmforge / python / platform strings; ``torch`` (version, cuda, cudnn, nccl,
hip); ``cpu`` (``hardware.cpu_facts``); ``memory_gb``; ``devices`` (``hardware.device_facts``); ``probe``
(``ProbeResult.to_dict`` of the default device, or None); ``mfu_peak`` (dtype → {flops, source});
``precision_auto`` (``PrecisionChoice.to_dict`` for ``auto`` on the default device, or None);
``distributed`` (gloo / nccl / mpi: available, works / version / launcher); ``launch`` (``LaunchEnv`` of this
process, or {"error": ...}); ``extras`` (extra → {installed, packages: name → version or None}).
Only the standard library is imported at module level, so registering the command costs nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

SCHEMA_VERSION = 1


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> dict:
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    from lmforge.hardware.facts import device_facts

    return {"version": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
            "cudnn": cudnn, "nccl": device_facts()["cuda"]["nccl"]}


def extras_facts() -> dict:
    """Every extra of lmforge's package metadata → installed (all its packages importable by metadata) and
    each package's installed version (None when missing). {} when lmforge is not installed as a package."""
    from importlib import metadata

    try:
        requires = metadata.requires("lmforge") or []
    except metadata.PackageNotFoundError:
        return {}
    extras: dict[str, dict] = {}
    for req in requires:
        m = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", req)
        if not m:
            continue
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)
        extras.setdefault(m.group(1), {})[name] = _version(name)
    return {k: {"installed": all(v is not None for v in pkgs.values()), "packages": pkgs}
            for k, pkgs in sorted(extras.items())}


def gloo_works(timeout_s: float = 20.0) -> tuple[bool, Optional[str]]:
    """A real one-process gloo group on 127.0.0.1 (own TCP store, not the default group) runs an all-reduce."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return False, "torch.distributed has no gloo backend"
    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        Gloo = dist.ProcessGroupGloo
        if hasattr(Gloo, "_Options"):
            opts = Gloo._Options()
            opts._devices = [Gloo.create_device(hostname="127.0.0.1")]
            opts._timeout = timedelta(seconds=timeout_s)
            pg = Gloo(store, 0, 1, opts)
        else:
            pg = Gloo(store, 0, 1, timedelta(seconds=timeout_s))
        t = torch.ones(4)
        pg.allreduce([t]).wait()
        ok = bool(torch.equal(t, torch.ones(4)))
        return ok, None if ok else f"all-reduce returned {t.tolist()}"
    except Exception as e:  # the point is to report what fails, whatever it is
        return False, f"{type(e).__name__}: {e}"


def _mpirun() -> dict:
    path = shutil.which("mpirun") or shutil.which("mpiexec")
    version = None
    if path:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
            version = next((ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()), None)
        except (OSError, subprocess.SubprocessError):
            pass
    return {"path": path, "version": version}


def distributed_facts(check_gloo: bool = True) -> dict:
    import torch
    import torch.distributed as dist

    avail = dist.is_available()
    gloo = {"available": avail and dist.is_gloo_available(), "works": None, "error": None}
    if check_gloo and gloo["available"]:
        gloo["works"], gloo["error"] = gloo_works()
    nccl_ok = avail and dist.is_nccl_available()
    from lmforge.hardware.facts import device_facts

    nccl = {"available": nccl_ok, "usable": nccl_ok and torch.cuda.is_available(),
            "version": device_facts()["cuda"]["nccl"]}
    mpi = {"available": avail and dist.is_mpi_available(), "launcher": _mpirun()}
    return {"gloo": gloo, "nccl": nccl, "mpi": mpi}


def launch_facts() -> dict:
    from lmforge.distributed.launch_env import discover
    from lmforge.errors import SetupError

    try:
        return discover().to_dict()
    except SetupError as e:
        return {"error": str(e)}


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def environment_facts(*, probe: bool = True, check_gloo: bool = True, refresh: bool = False,
                      device: Optional[str] = None) -> dict:
    """Everything ``lmforge env`` reports, as a JSON-ready dict (schema in the module docstring). ``probe``:
    include the (cached) matmul probe, MFU peaks and the ``auto`` precision; ``refresh``: re-measure."""
    import torch

    from lmforge.hardware import cpu_facts, device_facts, memory_gb

    device = device or default_device()
    facts = {"schema": SCHEMA_VERSION, "lmforge": _version("lmforge"), "python": platform.python_version(),
             "platform": platform.platform(), "torch": torch_facts(), "cpu": cpu_facts(), "memory_gb": memory_gb(),
             "devices": device_facts(), "device": device, "probe": None, "mfu_peak": None, "precision_auto": None}
    if probe:
        from lmforge.hardware import peak_info, resolve_precision
        from lmforge.hardware import probe as run_probe

        result = run_probe(device, refresh=refresh)
        facts["probe"] = result.to_dict()
        facts["mfu_peak"] = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            flops, source = peak_info(device, dtype, result)
            facts["mfu_peak"][name] = {"flops": flops, "source": source}
        facts["precision_auto"] = resolve_precision("auto", device, probe=result).to_dict()
    facts["distributed"] = distributed_facts(check_gloo)
    facts["launch"] = launch_facts()
    facts["extras"] = extras_facts()
    return facts


# ---------------------------------------------------------------------------------------------
# Text output and the command
# ---------------------------------------------------------------------------------------------


def _gf(v) -> str:
    return "n/a" if v is None else f"{v / 1e9:,.1f}"


def _yes(ok) -> str:
    return "yes" if ok else ("no" if ok is not None else "not checked")


def _device_lines(f: dict) -> list[tuple[str, str]]:
    cuda, mps = f["devices"]["cuda"], f["devices"]["mps"]
    rows = []
    if cuda["devices"]:
        for d in cuda["devices"]:
            rows.append((f"cuda:{d['index']}", f"{d['name']} · capability {d['capability']} · {d['memory_gb']} GB · "
                                               f"native bf16 {_yes(d['bf16'])}"))
    else:
        rows.append(("cuda", "not available" + (f" (torch built for CUDA {cuda['version']})" if cuda["version"] else "")))
    rows.append(("mps", "available" if mps["available"] else ("built, not available" if mps["built"] else "not built")))
    return rows


def format_facts(f: dict) -> str:
    """The human-readable report of ``environment_facts()``: one aligned ``label  value`` line per fact."""
    t, c = f["torch"], f["cpu"]
    flags = " ".join(("+" if on else "-") + name for name, on in c["flags"].items())
    rows = [("lmforge", f"{f['lmforge'] or 'not installed'} · Python {f['python']} · {f['platform']}"),
            ("torch", f"{t['version']} · CUDA {t['cuda'] or 'none'} · cuDNN {t['cudnn'] or 'none'} · "
                      f"NCCL {t['nccl'] or 'none'}" + (f" · HIP {t['hip']}" if t["hip"] else "")),
            ("cpu", f"{c['model']} ({c['arch']}) · {c['logical_cpus']} CPUs, {c['usable_cpus']} usable · "
                    f"kernels {c['capability']}"),
            ("cpu flags", f"{flags} · native bf16 {_yes(c['native_bf16'])}"),
            ("threads", f"torch {c['torch_threads']} intra-op, {c['torch_interop_threads']} inter-op"),
            ("memory", f"{f['memory_gb']} GB" if f["memory_gb"] else "unknown"),
            *_device_lines(f)]
    p = f["probe"]
    if p:
        peaks = ", ".join(f"{k} {_gf(v)}" for k, v in p["peaks"].items())
        how = "cached" if p["cached"] else f"measured in {p['seconds']:.2f} s"
        noisy = f"; disturbed: cpu share {p['cpu_share']:.2f}, re-measured next time" if p.get("cpu_share") is not None \
            and p["cpu_share"] < 0.75 else ""
        rows.append(("matmul peak", f"{f['device']}: {peaks} GFLOP/s ({how}, {p['threads']} threads{noisy})"))
        rows.append(("MFU peak", ", ".join(f"{k} {_gf(v['flops'])} ({v['source']})" for k, v in f["mfu_peak"].items())
                     + " GFLOP/s"))
        a = f["precision_auto"]
        rows.append(("precision", f"auto → {a['precision']}: {a['reason']}"))
    d = f["distributed"]
    gloo = "works (1-process group on 127.0.0.1)" if d["gloo"]["works"] else (
        f"FAILS: {d['gloo']['error']}" if d["gloo"]["works"] is False else _yes(d["gloo"]["available"]))
    nccl = ("usable" if d["nccl"]["usable"] else "built, no GPU" if d["nccl"]["available"] else "not available")
    launcher = d["mpi"]["launcher"]
    mpi = ("torch mpi backend " + ("built" if d["mpi"]["available"] else "not built") + "; mpirun "
           + (f"{launcher['path']} ({launcher['version']})" if launcher["path"] else "not found"))
    rows += [("gloo", gloo), ("nccl", nccl + (f" ({d['nccl']['version']})" if d["nccl"]["version"] else "")),
             ("mpi", mpi)]
    launch = f["launch"]
    rows.append(("launch", launch["error"] if "error" in launch else (
        "single process (no launcher)" if launch["source"] == "none" else
        f"{launch['source']}: rank {launch['rank']}/{launch['world_size']}, local {launch['local_rank']}/"
        f"{launch['local_world_size']}, master {launch['master_addr']}:{launch['master_port']}")))
    for name, e in f["extras"].items():
        pkgs = ", ".join(f"{k} {v}" if v else f"{k} MISSING" for k, v in e["packages"].items())
        rows.append((f"extra {name}", ("installed: " if e["installed"] else "not installed: ") + pkgs))
    if not f["extras"]:
        rows.append(("extras", "unknown (lmforge is not installed as a package)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _cmd_env(args: argparse.Namespace, extra: list[str]) -> int:
    from lmforge.errors import ConfigError

    if extra:
        raise ConfigError(f"env: unexpected arguments {' '.join(extra)}")
    facts = environment_facts(probe=not args.no_probe, check_gloo=not args.no_gloo, refresh=args.reprobe)
    if args.out:
        Path(args.out).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    elif args.json:
        print(json.dumps(facts, indent=2))
    else:
        print(format_facts(facts))
    return 0


def add_env_commands(subparsers) -> None:
    e = subparsers.add_parser("env", help="this machine as a run sees it: versions, devices, CPU flags, measured "
                              "matmul peaks, the precision auto picks, distributed backends, installed extras")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    e.add_argument("--out", metavar="FILE", help="write the JSON to FILE")
    e.add_argument("--reprobe", action="store_true", help="measure the matmul peaks again (ignore the cache)")
    e.add_argument("--no-probe", action="store_true", help="skip the matmul probe (and the auto precision)")
    e.add_argument("--no-gloo", action="store_true", help="skip the 1-process gloo check")
    e.set_defaults(func=_cmd_env)
