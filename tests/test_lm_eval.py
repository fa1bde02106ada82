"""LM evaluation: sliding windows score every token once; perplexity parity with a direct forward; the
lm-evaluation-harness adapter's loglikelihoods equal a direct computation (1e-5) and a local
multiple-choice task runs end to end; ``eval.enabled`` scores a run at its end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.runs import pack_tiny, tiny_cfg

from lmforge.evaluation.lm import score_documents, token_logprobs, windows


@pytest.mark.parametrize("n, w, s", [(2, 4, 4), (10, 4, 2), (33, 8, 3), (16, 16, 16), (40, 7, 7)])
def test_windows_score_each_target_once_with_context(n, w, s):
    seen = []
    for b, e, first in windows(n, w, s):
        assert e - b <= w
        targets = [p for p in range(b + 1, e + 1) if p >= first]
        seen += targets
        if b > 0:
            assert all(p - b >= w - s for p in targets)  # at least W - S tokens of context
    assert seen == list(range(1, n))


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import build_model

    data = pack_tiny(tmp_path_factory.mktemp("lmdata"))
    cfg = tiny_cfg(tmp_path_factory.mktemp("r"), data)
    cfg.model.vocab_size = 300
    model = build_model(cfg.model, seed=0).eval()
    return model, load_tokenizer(data / "tokenizer.json"), cfg, data


def _direct(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0].double()
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_sliding_window_parity(model_tok):
    model, tok, cfg, _ = model_tok
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 3)[:30]
    full = token_logprobs(model, ids, 32, 32, "cpu")
    torch.testing.assert_close(full, _direct(model, ids), rtol=0, atol=1e-5)
    part = token_logprobs(model, ids, 12, 4, "cpu")
    torch.testing.assert_close(part[:11], full[:11], rtol=0, atol=1e-5)  # the first window has full context
    rep = score_documents(model, tok, ["abc def ghi " * 20, "xyz " * 30], 16, 8)
    assert rep["bits_per_byte"] > 0 and rep["tokens"] > 0 and rep["perplexity"] > 1


def test_harness_loglikelihood_parity_and_local_task(model_tok, tmp_path):
    pytest.importorskip("lm_eval")
    from lmforge.evaluation.harness import LMForgeLM, run_harness

    model, tok, cfg, _ = model_tok
    lm = LMForgeLM(model, tok, cfg.model.max_seq_len, batch_size=3)
    reqs = [("the cat sat on the", " mat"), ("the cat sat on the", " sky"), ("", "hello"), ("one two", " three")]
    got = lm.loglikelihood([SimpleNamespace(args=r) for r in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, x = lm.split(ctx, cont)
        direct = _direct(model, c + x)[-len(x):].sum().item()
        assert abs(ll - direct) < 1e-5 and isinstance(greedy, bool)
    rows = [{"q": f"count {i}", "choices": [" one", " two", " three"], "a": i % 3} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "mc.yaml").write_text(f"""task: lmforge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: acc
""")
    res = run_harness(model, tok, cfg.model.max_seq_len, [str(tmp_path / "mc.yaml")], batch_size=4)
    acc = res["tasks"]["lmforge_tiny_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and "acc_stderr" in res["tasks"]["lmforge_tiny_mc"]


def test_train_evaluates_at_the_end(tmp_path, monkeypatch):
    from lmforge.training.trainer import train

    monkeypatch.setenv("LMFORGE_PEAK_FLOPS", "1e11")
    data = pack_tiny(tmp_path / "data")
    (tmp_path / "doc.txt").write_text("some held out text to score " * 10)
    cfg = tiny_cfg(tmp_path / "run", data, training={"max_steps": 3},
                   eval={"enabled": True, "text": [str(tmp_path / "doc.txt")], "window": 16, "stride": 8})
    summary = train(cfg)
    assert summary["eval_bits_per_byte"] > 0 and summary["eval_perplexity"] > 1
    rep = json.loads((tmp_path / "run" / "reports" / "lm_eval.json").read_text())
    assert rep["text"]["window"] == 16 and "bits_per_byte_stderr" in rep["text"]
