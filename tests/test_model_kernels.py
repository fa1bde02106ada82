"""Hand-written autograd (RoPE, RMSNorm, saved-probabilities attention) and the fused linear cross-entropy against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.models.kernels import probs_attention, probs_attention_ok, rms_norm, rope
from lmforge.models.llama import rope_tables
from lmforge.models.losses import linear_cross_entropy

torch.set_num_threads(1)


def rotate_half_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rope_matches_rotate_half_and_gradcheck():
    cos, sin_signed = rope_tables(8, 10, 10000.0)
    sin = torch.cat([-sin_signed[:, :4], sin_signed[:, 4:]], -1)  # undo the sign folding: plain sin
    x = torch.randn(2, 10, 3, 8, dtype=torch.float64, requires_grad=True)
    c, s, ss = cos[:, None].double(), sin[:, None].double(), sin_signed[:, None].double()
    torch.testing.assert_close(rope(x, c, ss), rotate_half_reference(x, c, s))
    assert torch.autograd.gradcheck(lambda t: rope(t, c, ss), (x,))
    # position 0 is the identity, and the rotation preserves norms
    torch.testing.assert_close(rope(x, c, ss)[:, 0], x[:, 0])
    torch.testing.assert_close(rope(x, c, ss).norm(dim=-1), x.norm(dim=-1))


def test_rms_norm_matches_functional_and_gradcheck():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5))
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    assert rms_norm(x.float(), w.float(), 1e-5, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_linear_cross_entropy_equals_reference(chunk):
    torch.manual_seed(0)
    h = torch.randn(100, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 37, (100,))
    y[::5] = -100
    loss = linear_cross_entropy(h, w, y, chunk_size=chunk)
    (loss * 3).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.t(), y)
    (ref * 3).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_linear_cross_entropy_bf16_autocast_close():
    torch.manual_seed(1)
    h, w = torch.randn(64, 32), torch.randn(50, 32) * 0.3
    y = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, y)
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="expected h"):
        linear_cross_entropy(h[None], w, y)


def test_model_loss_equals_logits_cross_entropy():
    cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32)
    for tie in (True, False):
        m = build_model(cfg.model_copy(update={"tie_embeddings": tie}), seed=3)
        x, y = torch.randint(0, 53, (2, 12)), torch.randint(0, 53, (2, 12))
        y[0, :3] = -100
        loss = m.loss(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        ref = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        ref.backward()
        torch.testing.assert_close(loss, ref)
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_sum_reduction():
    h, w, y = torch.randn(40, 8), torch.randn(11, 8), torch.randint(0, 11, (40,))
    y[:4] = -100
    torch.testing.assert_close(linear_cross_entropy(h, w, y, reduction="sum"),
                               F.cross_entropy(h @ w.t(), y, reduction="sum"))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")


@pytest.mark.parametrize("case", ["causal", "mask", "full"])
def test_probs_attention_matches_sdpa_and_gradcheck(case):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None
    if case == "mask":  # a doc/pad style mask: random keys hidden, every query still sees itself
        mask = (torch.rand(2, 1, 6, 6) > 0.5) | torch.eye(6, dtype=torch.bool)
    causal = case == "causal"
    out = probs_attention(q, k, v, mask, causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal))
    assert torch.autograd.gradcheck(lambda a, b, c: probs_attention(a, b, c, mask, causal), (q, k, v))


def test_probs_attention_bf16_close_to_fp32_and_only_where_it_pays():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 4, 32, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = probs_attention(qb, kb, vb, None, True)
    grads = torch.autograd.grad(out, (qb, kb, vb), g.bfloat16())
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.1)
    assert probs_attention_ok(qb, kb, 0.0)
    assert not probs_attention_ok(q, k, 0.0)  # float32: SDPA
    assert not probs_attention_ok(qb, kb, 0.1)  # dropout: SDPA
    with torch.no_grad():
        assert not probs_attention_ok(qb, kb, 0.0)  # inference over a prompt: SDPA
        assert probs_attention_ok(qb[:, :, :1], kb, 0.0)  # a one-query decode step in bf16: probs
        assert not probs_attention_ok(q[:, :, :1], k, 0.0)  # ... in float32: SDPA


def test_bf16_decode_step_through_probs_attention_is_close_to_float32(monkeypatch):
    """Cached generation in bf16 (one query per step) takes probs_attention; its logits stay near fp32's."""
    import lmforge.models.common as common

    calls = []
    monkeypatch.setattr(common, "probs_attention", lambda *a: calls.append(a[0].shape) or probs_attention(*a))
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=32)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = build_model(cfg, seed=0).to(dt).eval()
        with torch.inference_mode():
            cache = m.new_cache(2, 16)
            m(x[:, :11], cache=cache)
            out[dt] = m(x[:, 11:], cache=cache).float()[:, -1]
    assert [s[2] for s in calls] == [1, 1]  # the bf16 decode step, in both layers; never the prompt or fp32
    torch.testing.assert_close(out[torch.bfloat16], out[torch.float32], rtol=0.05, atol=0.05)


def test_model_bf16_training_step_matches_sdpa_path(monkeypatch):
    """The decoder's loss and gradients under bf16 autocast barely move when attention goes through SDPA."""
    import lmforge.models.common as common

    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=32)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))

    def run():
        m = build_model(cfg, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m.loss(x, y)
        loss.backward()
        return loss.detach(), m.layers[0].attention.wq.weight.grad

    loss, grad = run()
    monkeypatch.setattr(common, "probs_attention_ok", lambda *a: False)
    ref_loss, ref_grad = run()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, ref_grad, rtol=0.1, atol=0.1 * ref_grad.abs().max().item())
