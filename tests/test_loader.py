import numpy as np
import pytest
import torch

from lmforge.data.loader import RandomWindowLoader, SequentialEvalLoader, TokenShards
from lmforge.data.pack import pack_documents
from lmforge.data.tokenizer import train_tokenizer

T, B = 16, 4


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "中文", "x"]
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 40))) for _ in range(400)]
    tok = train_tokenizer(docs, vocab_size=300)
    pack_documents(docs, tok, out, val_fraction=0.1, shard_tokens=700, num_workers=0)
    return out


def stream(out, split):
    s = TokenShards(out, split)
    return s, s.read(0, len(s))


def test_token_shards_reads_across_boundaries(packed):
    s, all_tokens = stream(packed, "train")
    assert len(s._maps) > 2 and 256 < s.vocab_size <= 300
    first = len(s._maps[0])
    np.testing.assert_array_equal(s.read(first - 3, 10), all_tokens[first - 3:first + 7])
    assert int((all_tokens == s.eos_id).sum()) > 0
    with pytest.raises(IndexError):
        s.read(len(s) - 2, 5)
    with pytest.raises(KeyError, match="no split 'test'"):
        TokenShards(packed, "test")


def test_batch_shapes_and_shift(packed):
    s, all_tokens = stream(packed, "train")
    loader = RandomWindowLoader(s, T, B, seed=1)
    b = loader.next_batch()
    assert b["input_ids"].shape == b["labels"].shape == (B, T) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    for row in range(B):  # each row is a contiguous slice of the stream
        start = loader.window_start(row)
        np.testing.assert_array_equal(b["input_ids"][row].numpy(), all_tokens[start:start + T])


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_deterministic_and_seeded(packed):
    s = TokenShards(packed, "train")
    a = batches(RandomWindowLoader(s, T, B, seed=5), 6)
    b = batches(RandomWindowLoader(s, T, B, seed=5), 6)
    c = batches(RandomWindowLoader(s, T, B, seed=6), 6)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_equals_uninterrupted(packed):
    s = TokenShards(packed, "train")
    full = RandomWindowLoader(s, T, B, seed=2, doc_mask=True)
    n_epoch_steps = full.num_windows // B + 3  # cross an epoch boundary
    ref = batches(full, 2 * n_epoch_steps)
    first = RandomWindowLoader(s, T, B, seed=2, doc_mask=True)
    batches(first, n_epoch_steps)
    state = first.state_dict()
    resumed = RandomWindowLoader(s, T, B, seed=2, doc_mask=True)
    resumed.load_state_dict(state)
    assert resumed.step == n_epoch_steps
    for want, got in zip(ref[n_epoch_steps:], batches(resumed, n_epoch_steps)):
        for k in ("input_ids", "labels", "doc_ids"):
            assert torch.equal(want[k], got[k])
    with pytest.raises(ValueError, match="seed"):
        RandomWindowLoader(s, T, B, seed=3).load_state_dict(state)


def test_ranks_disjoint_and_cover_epoch(packed):
    s = TokenShards(packed, "train")
    W = 3
    loaders = [RandomWindowLoader(s, T, B, seed=0, rank=r, world_size=W) for r in range(W)]
    n = loaders[0].num_windows
    steps = n // (B * W)
    starts = {r: [] for r in range(W)}
    for r, ld in enumerate(loaders):
        for step in range(steps):
            js = [ld.samples + b * W + r for b in range(B)]
            starts[r] += [ld.window_start(j) for j in js]
            ld.next_batch()
    all_starts = sum(starts.values(), [])
    assert len(set(all_starts)) == len(all_starts) == steps * B * W  # no window served twice in the epoch
    offset = all_starts[0] % T
    assert all(st % T == offset for st in all_starts)  # non-overlapping grid
    # batches differ between ranks
    b0 = RandomWindowLoader(s, T, B, seed=0, rank=0, world_size=W).next_batch()
    b1 = RandomWindowLoader(s, T, B, seed=0, rank=1, world_size=W).next_batch()
    assert not torch.equal(b0["input_ids"], b1["input_ids"])


def test_epochs_reshuffle(packed):
    s = TokenShards(packed, "train")
    ld = RandomWindowLoader(s, T, 1, seed=0)
    n = ld.num_windows
    e0 = [ld.window_start(j) for j in range(n)]
    e1 = [ld.window_start(j) for j in range(n, 2 * n)]
    assert e0 != e1
    assert all(0 <= st and st + T + 1 <= len(s) for st in e0 + e1)


def test_doc_ids(packed):
    s = TokenShards(packed, "train")
    b = RandomWindowLoader(s, T, B, seed=0, doc_mask=True).next_batch()
    x, d = b["input_ids"], b["doc_ids"]
    assert torch.all(d[:, 0] == 0) and torch.all(d[:, 1:] >= d[:, :-1])
    # the id increments exactly after each EOS
    inc = d[:, 1:] - d[:, :-1]
    assert torch.equal(inc, (x[:, :-1] == s.eos_id).long())


def test_eval_loader(packed):
    s, all_tokens = stream(packed, "val")
    ev = SequentialEvalLoader(s, T, 2, max_batches=3)
    a, b = list(ev), list(ev)
    assert len(a) == len(ev) <= 3 and len(a) > 0
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    np.testing.assert_array_equal(a[0]["input_ids"][1].numpy(), all_tokens[T:2 * T])
    np.testing.assert_array_equal(a[0]["labels"][0].numpy(), all_tokens[1:T + 1])
    r0 = list(SequentialEvalLoader(s, T, 1, rank=0, world_size=2))
    r1 = list(SequentialEvalLoader(s, T, 1, rank=1, world_size=2))
    assert len(r0) == len(r1)
    np.testing.assert_array_equal(r1[0]["input_ids"][0].numpy(), all_tokens[T:2 * T])


def test_too_little_data(packed):
    s = TokenShards(packed, "val")
    with pytest.raises(ValueError, match="too few"):
        RandomWindowLoader(s, len(s), 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        SequentialEvalLoader(s, len(s), 1)


def test_corrupt_shard_size_detected(packed, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(packed, copy)
    f = copy / "train_00000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train_00000.bin"):
        TokenShards(copy, "train")
