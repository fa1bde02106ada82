"""Shipped recipes (configs/): each validates with its own loader; the small ones run a few real steps on tiny
overrides over the shared data (skipped with a reason without it); every path the docs, README and examples
name exists."""

from __future__ import annotations

import glob
import math
import os
import re
from pathlib import Path

import pytest

from lmforge.compress.config import load_compress_config
from lmforge.config import load_config
from lmforge.data.config import load_prepare_config
from lmforge.finetune.config import load_finetune_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = Path(os.environ.get("LMFORGE_DATA", REPO.parent / "shared" / "data"))
SHARED = "../shared/data"  # how recipes and docs name the shared data (relative to the repository root)

TRAIN, FINETUNE, PREPARE, COMPRESS = "train", "finetune", "prepare", "compress"
RECIPES = {
    "quickstart.yaml": TRAIN, "char-shakespeare.yaml": TRAIN, "char-shakespeare.prepare.yaml": PREPARE,
    "llama-125m.yaml": TRAIN, "llama-125m-8gpu-zero3.yaml": TRAIN, "bert-mlm.yaml": TRAIN,
    "bert-mlm.prepare.yaml": PREPARE, "sst2-lora.yaml": FINETUNE, "conll-ner.yaml": FINETUNE, "sft.yaml": FINETUNE,
    "compress.yaml": COMPRESS,
}
LOADERS = {TRAIN: load_config, FINETUNE: load_finetune_config, PREPARE: load_prepare_config,
           COMPRESS: load_compress_config}
QUIET = {"tensorboard": False, "progress": False, "report": False}


def recipe(name: str, tmp_path: Path) -> Path:
    """The recipe with the shared-data prefix pointed at $LMFORGE_DATA (identical when it is the default)."""
    text = (CONFIGS / name).read_text(encoding="utf-8").replace(SHARED, str(DATA))
    out = tmp_path / name
    out.write_text(text, encoding="utf-8")
    return out


def test_every_recipe_is_listed_with_its_loader():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_validates(name):
    cfg = LOADERS[RECIPES[name]](CONFIGS / name)
    header = (CONFIGS / name).read_text(encoding="utf-8").split("\n\n")[0]
    assert header.startswith("#") and "lmforge " in header, f"{name}: header must say how to run it"
    if RECIPES[name] == TRAIN:
        from lmforge.cli import main

        assert main(["config", "--config", str(CONFIGS / name)]) == 0
        data = Path(cfg.data.path)
        prepared_by = [n for n, k in RECIPES.items() if k == PREPARE and
                       Path(load_prepare_config(CONFIGS / n).output.dir) == data]
        documented = "lmforge data prepare" in header or "lmforge quickstart" in header
        assert prepared_by or documented, f"{name}: data.path {data} is made by no documented command"


def test_recipes_match_what_they_claim():
    q = load_config(CONFIGS / "quickstart.yaml")
    from lmforge.quickstart import quickstart_config

    same = quickstart_config(q.run_dir, q.data.path, q.training.max_minutes)
    assert q == same, "configs/quickstart.yaml drifted from lmforge.quickstart.quickstart_config"
    one, eight = load_config(CONFIGS / "llama-125m.yaml"), load_config(CONFIGS / "llama-125m-8gpu-zero3.yaml")
    rows = lambda c, dp: c.training.micro_batch_size * c.training.grad_accum_steps * dp  # noqa: E731
    assert rows(one, 1) == rows(eight, 8) and eight.distributed.strategy == "zero3"
    assert one.model == eight.model and one.model.d_model == 768 and one.model.n_layers == 12
    assert load_config(CONFIGS / "bert-mlm.yaml").training.objective == "mlm"
    sft = load_finetune_config(CONFIGS / "sft.yaml")
    assert (REPO / sft.data.train).is_file() and load_finetune_config(CONFIGS / "sst2-lora.yaml").method.name == "lora"


def test_slurm_example_points_at_a_real_recipe():
    for script in sorted((REPO / "examples" / "slurm").glob("*.sbatch")):
        configs = re.findall(r"configs/[\w.-]+\.yaml", script.read_text())
        assert configs, f"{script.name} names no recipe"
        for c in configs:
            assert (REPO / c).is_file(), f"{script.name}: {c} does not exist"
            load_config(REPO / c)


# ----- a few real steps of the small recipes -----

needs_data = pytest.mark.skipif(not (DATA / "tinyshakespeare" / "input.txt").is_file(),
                                reason=f"shared data not found at {DATA} (set LMFORGE_DATA)")


def _prepare(name: str, tmp_path: Path) -> Path:
    from lmforge.data.prepare import prepare

    out = tmp_path / name.replace(".prepare.yaml", "-data")
    prepare(load_prepare_config(recipe(name, tmp_path), {"output": {"dir": str(out), "num_workers": 0}}))
    return out


def _train(name: str, tmp_path: Path, data: Path, model: dict, seq_len: int) -> dict:
    from lmforge.training.trainer import train

    over = {"run_dir": str(tmp_path / name.removesuffix(".yaml")), "model": model,
            "data": {"path": str(data), "seq_len": seq_len},
            "training": {"max_steps": 3, "micro_batch_size": 4, "eval_every": 3, "eval_batches": 2, "device": "cpu",
                         "max_minutes": None, "compile": False},
            "scheduler": {"warmup_steps": 1}, "checkpoint": {"every_steps": 0}, "logging": {"log_every": 1, **QUIET}}
    summary = train(load_config(recipe(name, tmp_path), over))
    assert summary["steps"] == 3 and math.isfinite(summary["val_loss"]), summary
    return summary


def _finetune(name: str, tmp_path: Path, base: Path, **data) -> dict:
    from lmforge.finetune.trainer import finetune

    over = {"run_dir": str(tmp_path / name.removesuffix(".yaml")), "base": {"path": str(base)},
            "data": {"max_train_examples": 32, "max_eval_examples": 16, **data},
            "train": {"max_steps": 2, "batch_size": 8, "eval_batch_size": 8, "eval_every": 2, "device": "cpu",
                      "threads": 1}}
    summary = finetune(load_finetune_config(recipe(name, tmp_path), over))
    assert summary["best_step"] in (1, 2) and math.isfinite(summary["best_value"]), summary
    return summary


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


@pytest.fixture(scope="module")
def char_run(work):
    """char-shakespeare: prepare (bytes only) → 3 steps of a 1-layer model; also the SFT base."""
    if not (DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {DATA} (set LMFORGE_DATA)")
    from lmforge.data.pack import read_manifest

    data = _prepare("char-shakespeare.prepare.yaml", work)
    assert read_manifest(data)["vocab_size"] == 258  # 256 bytes + 2 specials: one token per character
    _train("char-shakespeare.yaml", work, data, {"n_layers": 1, "d_model": 32, "n_heads": 2, "max_seq_len": 256}, 32)
    return work / "char-shakespeare"


@pytest.fixture(scope="module")
def bert_run(work):
    """bert-mlm: prepare (BPE with a mask token) → 3 MLM steps; the base of the SST-2 and CoNLL recipes."""
    if not (DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"shared data not found at {DATA} (set LMFORGE_DATA)")
    data = _prepare("bert-mlm.prepare.yaml", work)
    _train("bert-mlm.yaml", work, data, {"n_layers": 1, "d_model": 32, "n_heads": 2, "ffn_hidden": 64,
                                         "max_seq_len": 64}, 32)
    return work / "bert-mlm"


@needs_data
def test_char_shakespeare_runs(char_run):
    assert (char_run / "model.safetensors").is_file()


@needs_data
def test_bert_mlm_runs(bert_run):
    assert (bert_run / "model.safetensors").is_file()


@needs_data
def test_sst2_lora_runs(bert_run, work):
    if not (DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{DATA / 'sst2'} not found (set LMFORGE_DATA)")
    s = _finetune("sst2-lora.yaml", work, bert_run, max_len=32)
    assert s["method"] == "lora" and s["metric"] == "accuracy"


@needs_data
def test_conll_ner_runs(bert_run, work):
    if not (DATA / "conll2003" / "train.txt").is_file():
        pytest.skip(f"{DATA / 'conll2003'} not found (set LMFORGE_DATA)")
    s = _finetune("conll-ner.yaml", work, bert_run, max_len=48)
    assert s["metric"] == "micro_f1"


@needs_data
def test_sft_runs(char_run, work, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names examples/data/... relative to the repository root
    s = _finetune("sft.yaml", work, char_run, max_len=200)  # bytes: prompt and answer must fit
    assert s["metric"] == "val_loss" and (work / "sft" / "sft_run" / "config.yaml").is_file()


# ----- every path the docs name is real -----

# a repository path (top-level folder + rest) or a shared-data path, not inside a longer path or word
PATH_RE = re.compile(r"(?<![\w./~])(\.\./shared/data/[\w./*-]+|(?:configs|examples|docs|benchmarks|tests|lmforge|"
                     r"\.ci)/[\w./*-]*[\w*])")


def named_paths() -> list[tuple[str, str]]:
    files = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
             *sorted(p for p in (REPO / "examples").rglob("*") if p.is_file() and p.suffix != ".jsonl")]
    out = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            out += [(f"{f.relative_to(REPO)}:{n}", m.group(1).rstrip(".")) for m in PATH_RE.finditer(line)]
    return out


def test_every_path_named_in_docs_and_examples_exists():
    found = named_paths()
    assert any(p == "examples/slurm/train.sbatch" for _, p in found)  # the scan sees what it should
    missing = []
    for where, p in found:
        if p.startswith(SHARED):
            if not DATA.is_dir():
                continue
            p_abs = str(DATA / p[len(SHARED) + 1:])
        else:
            p_abs = str(REPO / p)
        if not (glob.glob(p_abs) if "*" in p else os.path.exists(p_abs)):
            missing.append(f"{where}: {p}")
    assert not missing, "paths named but missing:\n" + "\n".join(missing)
