"""Fine-tuning on a tiny lmforge Llama run built in the test (no shared data needed): SFT masking, trainer,
evaluate CLI, splits, layer-wise LR decay, config errors."""

import argparse
import json
import random

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.finetune.cli import add_finetune_commands
from lmforge.finetune.config import load_finetune_config
from lmforge.finetune.data import load_task_data
from lmforge.finetune.model import LlamaBackbone, TaskModel, load_base
from lmforge.finetune.trainer import apply_layer_lr_decay, finetune
from tests.helpers.finetune import ft_cfg

torch.set_num_threads(1)


def test_sft_masks_prompt_tokens(tiny_run):
    """Positions whose next token is prompt/system text get exactly zero loss gradient."""
    from lmforge.data.tasks import encode_chat, pad_collate

    backbone, tok, _ = load_base(tiny_run)
    model = TaskModel(backbone, "sft")
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 1 2"},
            {"role": "assistant", "content": "3"}]
    ex = encode_chat(tok, conv, 64)
    batch = pad_collate([ex, encode_chat(tok, conv[1:], 64)], tok.pad_id)
    logits = model(batch["input_ids"], batch["attention_mask"]).detach().requires_grad_(True)
    model.forward = lambda ids, mask: logits  # score the fixed logits through the real loss
    loss, _ = model.loss(batch)
    loss.backward()
    target = batch["labels"][:, 1:]
    g = logits.grad[:, :-1].abs().sum(-1)
    assert (target == -100).any() and (target != -100).any()
    assert torch.all(g[target == -100] == 0)
    assert torch.all(g[target != -100] > 0)
    assert torch.all(logits.grad[:, -1] == 0)


def test_classification_trainer_and_evaluate_cli(tiny_run, cls_files, tmp_path, capsys):
    cfg = ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{
        "data.validation": cls_files / "dev.tsv", "method.name": "adapter", "method.adapter_size": 16, "base.pooling": "mean",
        "train.epochs": 8, "optimizer.lr": 3e-3, "train.early_stop_patience": 3})
    s = finetune(cfg)
    run = tmp_path / "ft"
    assert s["validation"]["val_accuracy"] >= s["majority_baseline_accuracy"] + 0.15, s
    assert s["params"]["trainable"] < s["params"]["total"] / 2
    for f in ("finetune.yaml", "metrics.jsonl", "summary.json", "best/adapter.safetensors",
              "reports/validation.json", "reports/validation.md", "reports/validation_confusion.png"):
        assert (run / f).is_file(), f
    # lmforge evaluate reloads base + adapter and reproduces the validation numbers
    p = argparse.ArgumentParser()
    add_finetune_commands(p.add_subparsers())
    args = p.parse_args(["evaluate", "--run", str(run), "--data", str(cls_files / "dev.tsv"), "--name", "dev"])
    assert args.func(args, []) == 0
    rep = json.loads((run / "reports" / "dev.json").read_text())
    assert rep["accuracy"] == pytest.approx(s["validation"]["val_accuracy"])
    assert "macro avg" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_trainer_learns(tiny_run, tmp_path, method):
    rng = random.Random(2)
    lines = []
    for _ in range(120):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        lines.append(json.dumps({"prompt": f"add {a} {b}", "response": f"{a + b}"}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    cfg = ft_cfg(tiny_run, tmp_path, tmp_path / "chat.jsonl", task="sft", **{
        "method.name": method, "train.epochs": 4, "optimizer.lr": 1e-2 if method == "full" else 3e-2,
        "train.eval_every": 5, "method.target_modules": '[".*(wq|wk|wv|wo|w1|w2|w3)"]'})
    s = finetune(cfg)
    evals = [r["val_loss"] for r in map(json.loads, (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert s["metric"] == "val_loss" and s["best_value"] == min(evals)
    assert min(evals) < evals[0] - 0.2, evals
    assert "perplexity" in (tmp_path / "ft" / "reports" / "validation.md").read_text()
    # the exported run folder generates with the fine-tuned weights
    from lmforge.inference import generate_from_run, load_run

    out = generate_from_run(s["export"], ["<|user|>\nadd 1 2\n<|assistant|>\n"], max_new_tokens=2, temperature=0.0)
    assert len(out) == 1
    exported, _, _, _ = load_run(s["export"])
    backbone, _, _ = load_base(tmp_path / "ft" / "sft_run")
    base, _, _ = load_base(tiny_run)
    w = "layers.0.attention.wq.weight"
    assert torch.equal(exported.state_dict()[w], backbone.model.state_dict()[w])
    assert not torch.equal(exported.state_dict()[w], base.model.state_dict()[w])


def test_validation_split_is_seeded_and_disjoint(tiny_run, cls_files, tmp_path):
    _, tok, _ = load_base(tiny_run)
    cfg = ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{"data.val_fraction": 0.25})
    a, b = load_task_data(cfg, tok), load_task_data(cfg, tok)
    assert len(a.val) == 60 and len(a.train) == 180
    assert [e["input_ids"] for e in a.val] == [e["input_ids"] for e in b.val]
    c = load_task_data(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{"data.seed": 7}), tok)
    assert [e["input_ids"] for e in c.val] != [e["input_ids"] for e in a.val][: len(c.val)]
    w = load_task_data(ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{"data.class_weights": True,
                                                                             "data.oversample": True}), tok)
    counts = [sum(e["label"] == k for e in w.train) for k in (0, 1)]
    assert counts[0] == counts[1] and w.class_weights.shape == (2,)


def test_layer_lr_decay_scales_by_depth(tiny_run):
    from lmforge.config import OptimizerConfig
    from lmforge.training.optim import build_optimizer

    backbone, _, _ = load_base(tiny_run)
    model = TaskModel(backbone, "classification", 2)
    opt = build_optimizer(model, OptimizerConfig(lr=1.0))
    n_before = sum(len(g["params"]) for g in opt.param_groups)
    apply_layer_lr_decay(opt, model, 0.5)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_before
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            want = 0.5 ** 3 if "tok_embeddings" in n else 0.5 ** 2 if ".layers.0." in n else \
                0.5 if ".layers.1." in n else 1.0
            assert g["lr"] == pytest.approx(want), n


def test_config_and_base_errors(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'method.lora_r'"):
        load_finetune_config(None, ["--base.path=x", "--data.train=y", "--method.lora_rank=4"])
    with pytest.raises(ConfigError, match="base.path: .* does not exist"):
        load_base(tmp_path / "nope")
    with pytest.raises(ConfigError, match="train.metric"):
        load_finetune_config(None, ["--base.path=x", "--data.train=y", "--task=sft",
                                    "--train.metric=accuracy"]).selection_metric()
    cfg = ft_cfg(tiny_run, tmp_path, tmp_path / "missing.tsv")
    with pytest.raises(ConfigError, match="data.train: file not found"):
        finetune(cfg)
    backbone, _, _ = load_base(tiny_run)
    with pytest.raises(ConfigError, match="pooling=cls needs an encoder"):
        TaskModel(LlamaBackbone(backbone.model), "classification", 2, pooling="cls")


@pytest.mark.parametrize("method", ["adalora", "prefix", "lora"])
def test_trainer_runs_each_method_and_reloads_best(tiny_run, cls_files, tmp_path, method):
    from lmforge.finetune.evaluation import evaluate_run

    cfg = ft_cfg(tiny_run, tmp_path, cls_files / "train.tsv", **{
        "method.name": method, "method.prefix_len": 4, "method.adalora_init_r": 4, "method.adalora_target_r": 2,
        "method.adalora_delta_t": 2, "train.max_steps": 8, "train.eval_every": 4, "optimizer.lr": 1e-2,
        "data.test": cls_files / "dev.tsv", "train.layer_lr_decay": 0.8})
    s = finetune(cfg)
    assert s["steps"] == 8 and s["best_step"] in (4, 8)
    assert (tmp_path / "ft" / "reports" / "test.json").is_file()
    assert (tmp_path / "ft" / "merged" / "model.safetensors").is_file() == (method != "prefix")
    rep = evaluate_run(str(tmp_path / "ft"), str(cls_files / "dev.tsv"), "again", show=False)
    assert rep["accuracy"] == pytest.approx(s["test"]["val_accuracy"])


def test_finetune_cli_yaml_and_overrides(tiny_run, cls_files, tmp_path, capsys):
    import yaml

    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "cli"), "task": "classification", "base": {"path": str(tiny_run)},
        "data": {"train": str(cls_files / "train.tsv"), "max_len": 32}, "method": {"name": "lora"},
        "train": {"max_steps": 50}}))
    p = argparse.ArgumentParser()
    add_finetune_commands(p.add_subparsers())
    args, extra = p.parse_known_args(["finetune", "--config", str(tmp_path / "ft.yaml"), "--train.max_steps=3",
                                      "--train.eval_every=3"])
    assert args.func(args, extra) == 0
    assert "at step 3" in capsys.readouterr().out
    s = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert s["steps"] == 3 and s["method"] == "lora"
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'"):
        args, extra = p.parse_known_args(["finetune", "--config", str(tmp_path / "ft.yaml"), "--train.max_step=3"])
        args.func(args, extra)


def test_prefer_fused_matches_foreach_and_keeps_groups():
    from lmforge.finetune.trainer import prefer_fused

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())

    def groups(m):
        return [{"params": [m.weight], "weight_decay": 0.1, "name": "decay"},
                {"params": [m.bias], "weight_decay": 0.0, "name": "no_decay"}]

    oa = torch.optim.AdamW(groups(a), lr=1e-2, foreach=True)
    ob = prefer_fused(torch.optim.AdamW(groups(b), lr=1e-2, foreach=True))
    assert ob.param_groups[0]["fused"] and [g["name"] for g in ob.param_groups] == ["decay", "no_decay"]
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    sgd = torch.optim.SGD(a.parameters(), lr=0.1)
    assert prefer_fused(sgd) is sgd
