"""HF transformers interop: import parity (fp32, ≤1e-4), export loadable by transformers, exact round trip,
greedy generation equal to transformers' ``generate``."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.models.generate import generate
from lmforge.models.hf import load_hf, save_hf

torch.set_num_threads(1)
TOL = 1e-4


def tiny_hf(arch: str, tie: bool = True):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=500.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      tie_word_embeddings=tie)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)
        model = transformers.BertForPreTraining(cfg)
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms: randomise so the mapping is tested
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name.lower() or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def sd_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)])
def test_decoder_import_parity_export_roundtrip(tmp_path, arch, tie):
    hf = tiny_hf(arch, tie)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.arch == arch and ours.cfg.tie_embeddings == tie
    x = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        got = ours(x)
    assert (ref - got).abs().max().item() <= TOL
    save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(input_ids=x).logits - ref).abs().max().item() <= TOL
    again = load_hf(tmp_path / "out")
    assert sd_equal(ours, again)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_matches_transformers(tmp_path, arch):
    hf = tiny_hf(arch)
    with torch.no_grad():  # larger weights: confident, prompt-dependent continuations
        for p in hf.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    prompts = [[5, 17, 42, 8, 99, 3], [7, 1, 64]]  # batched: HF left-pads with an attention mask
    x = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    ref = hf.generate(x, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, 6:].tolist()
    assert generate(ours, prompts, 24, temperature=0) == ref
    assert len(set(ref[0])) > 1


def test_bert_import_parity_heads_and_roundtrip(tmp_path):
    hf = tiny_hf("bert")
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.nsp_head is not None
    x = torch.randint(0, 101, (2, 20))
    types = torch.cat([torch.zeros(2, 8), torch.ones(2, 12)], 1).long()
    pad = torch.ones(2, 20, dtype=torch.bool)
    pad[1, 15:] = False
    with torch.no_grad():
        ref = hf(input_ids=x, token_type_ids=types, attention_mask=pad.long())
        mlm = ours(x, token_type_ids_BT=types, pad_mask_BT=pad)
        nsp = ours.nsp_logits(x, token_type_ids_BT=types, pad_mask_BT=pad)
    keep = pad[:, :, None].expand_as(mlm)
    assert (ref.prediction_logits[keep] - mlm[keep]).abs().max().item() <= TOL
    assert (ref.seq_relationship_logits - nsp).abs().max().item() <= TOL
    save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        out = back(input_ids=x, token_type_ids=types, attention_mask=pad.long())
    assert (out.prediction_logits - ref.prediction_logits).abs().max().item() <= TOL
    assert sd_equal(ours, load_hf(tmp_path / "out"))


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": ')
    with pytest.raises(ValueError, match="config.json:1"):
        load_hf(tmp_path)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_and_bin_checkpoints(tmp_path, layout):
    hf = tiny_hf("llama", tie=False)
    if layout == "sharded":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    else:
        hf.save_pretrained(tmp_path)
        sd = hf.state_dict()
        (tmp_path / "model.safetensors").unlink()
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = load_hf(tmp_path).eval()
    x = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - ours(x)).abs().max().item() <= TOL
