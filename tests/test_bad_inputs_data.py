"""Bad data through the real command line: ``data prepare`` inputs and configs, and packed folders that no
longer match their manifest (opened by ``data inspect``, ``data verify`` and ``train``). Each case checks the
exit code, the one error line (file:line / key / shard), and what is left on disk."""

import json

import numpy as np
import pytest
import torch

import lmforge.data.prepare as prepare_mod
from tests.helpers.bad_inputs import QUIET, TINY_MODEL, assert_user_error, copy_of, packed_data, run_cli, snapshot, texts
from lmforge.data.integrity import CACHE_NAME
from lmforge.data.tokenizer import train_tokenizer
from lmforge.data.verify import verify

torch.set_num_threads(1)
PREPARE_FLAGS = ["--vocab-size", "300", "--workers", "0", "--dedup.near=false"]
GOOD = "\n\n".join(texts(60, seed=1))

# (case id, {input file: content}, arguments ({d}: the case folder), needles of the one error line)
PREPARE = [
    ("empty-file", {"a.txt": b""}, ["--input", "{d}/a.txt"], ["empty_file ×1", "a.txt: empty_file"]),
    ("binary-file", {"a.txt": b"\x7fELF\x00\x01\x02\x03"}, ["--input", "{d}/a.txt"], ["binary ×1", "a.txt: binary"]),
    ("jsonl-no-field", {"a.jsonl": '{"body": "x", "id": 1}\n{"body": "y", "id": 2}\n'}, ["--input", "{d}/a.jsonl"],
     ["missing_field ×2", "a.jsonl:1", "no string field 'text'; keys: body, id"]),
    ("jsonl-field-not-string", {"a.jsonl": '{"text": 5}\n'}, ["--input", "{d}/a.jsonl"], ["'text' is int; keys: text"]),
    ("csv-no-column", {"a.csv": "a,b\n1,2\n"}, ["--input", "{d}/a.csv"],
     ["missing_column", "a.csv:1", "no column 'text'; the header's columns: a, b"]),
    ("tsv-no-column", {"a.tsv": "sentence\tlabel\nhi there\t1\n"}, ["--input", "{d}/a.tsv"],
     ["the header's columns: sentence, label"]),
    ("csv-every-row-bad", {"a.csv": "text,label\nx,1,extra\ny\n"}, ["--input", "{d}/a.csv"],
     ["bad_row ×2", "a.csv:2: bad_row (3 fields, the header has 2)"]),
    ("one-document", {"a.txt": "a single document"}, ["--input", "{d}/a.txt"],
     ["the train split would be empty", "output.val_fraction=0.01"]),
    ("all-dropped-by-cleaning", {"a.txt": GOOD}, ["--input", "{d}/a.txt", "--doc-mode", "paragraph",
                                                  "--clean.min_chars=100000"], ["dropped too_short ×60"]),
    ("missing-input", {}, ["--input", "{d}/none.txt"], ["none.txt': no such file, folder or glob match"]),
    ("glob-matches-nothing", {}, ["--input", "{d}/*.jsonl"], ["*.jsonl': matched no files"]),
    ("strict-csv-extra-field", {"a.csv": "text,label\nfine,1\nhi,there,2\n"}, ["--input", "{d}/a.csv", "--strict"],
     ["a.csv:3: bad_row (3 fields, the header has 2)"]),
    ("strict-tsv-missing-field", {"a.tsv": "text\tlabel\nfine\t1\nno label here\n"},
     ["--input", "{d}/a.tsv", "--strict"], ["a.tsv:3: bad_row (1 fields, the header has 2)"]),
    ("strict-jsonl-malformed", {"a.jsonl": '{"text": "ok"}\n{"text": oops}\n'}, ["--input", "{d}/a.jsonl", "--strict"],
     ["a.jsonl:2: malformed_json"]),
    ("strict-jsonl-array-line", {"a.jsonl": '{"text": "ok"}\n[1, 2]\n'}, ["--input", "{d}/a.jsonl", "--strict"],
     ["a.jsonl:2: missing_field (the line is a JSON list, not an object)"]),
    ("strict-invalid-utf8", {"a.txt": b"fine line\ncaf\xe9\n"}, ["--input", "{d}/a.txt", "--doc-mode", "line",
                                                                 "--strict"], ["a.txt:2: invalid_utf8"]),
    ("tokenizer-missing", {"a.txt": GOOD}, ["--input", "{d}/a.txt", "--tokenizer", "{d}/tok.json"],
     ["tok.json: No such file or directory"]),
    ("tokenizer-not-json", {"a.txt": GOOD, "tok.json": "{not a tokenizer"}, ["--input", "{d}/a.txt", "--tokenizer",
                                                                             "{d}/tok.json"],
     ["tok.json: not a valid tokenizer.json"]),
    ("config-unknown-key", {"p.yaml": "sources:\n  - path: a.txt\noutput:\n  dir: o\n  val_frac: 0.1\n"},
     ["--config", "{d}/p.yaml"], ["p.yaml:5:3: unknown key 'output.val_frac'; did you mean 'output.val_fraction'?"]),
    ("config-val-fraction-1", {"a.txt": GOOD}, ["--input", "{d}/a.txt", "--output.val_fraction=1"],
     ["invalid value for 'output.val_fraction': 1"]),
    ("config-skip-share-2", {"a.txt": GOOD}, ["--input", "{d}/a.txt", "--max_skipped_fraction=2"],
     ["invalid value for 'max_skipped_fraction': 2"]),
    ("config-min-over-max-chars", {"a.txt": GOOD}, ["--input", "{d}/a.txt", "--clean.min_chars=10",
                                                    "--clean.max_chars=5"],
     ["clean.min_chars=10 exceeds clean.max_chars=5"]),
]


@pytest.mark.parametrize("files,argv,needles", [c[1:] for c in PREPARE], ids=[c[0] for c in PREPARE])
def test_prepare_refuses_and_leaves_no_output_folder(tmp_path, capsys, files, argv, needles):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = [a.format(d=tmp_path) for a in argv]
    if "--config" not in args:
        args += ["--out", str(tmp_path / "out"), *PREPARE_FLAGS]
    code, err, _ = run_cli(capsys, "data", "prepare", *args)
    assert_user_error(code, err, "data prepare", *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_failed_rerun_keeps_the_previous_output(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(GOOD)
    argv = ["data", "prepare", "--input", tmp_path / "a.txt", "--doc-mode", "paragraph", "--out", tmp_path / "out",
            *PREPARE_FLAGS]
    assert run_cli(capsys, *argv)[0] == 0
    before = snapshot(tmp_path / "out")
    (tmp_path / "a.txt").write_text("")  # the input changed: a rerun must redo, and finds nothing
    code, err, _ = run_cli(capsys, *argv)
    assert_user_error(code, err, "data prepare", "empty_file")
    assert snapshot(tmp_path / "out") == before and verify(tmp_path / "out") == []


def test_bad_rows_are_counted_and_a_large_skipped_share_is_flagged(tmp_path, capsys):
    rows = ["text,label", "kept row one,1", "kept row two,0"] + [f"bad {i},has,extra" for i in range(4)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    code, err, out = run_cli(capsys, "data", "prepare", "--input", tmp_path / "a.csv", "--out", tmp_path / "out",
                             *PREPARE_FLAGS, "--output.val_fraction=0")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "4 of 6 input records (67%) were skipped" in warning[0]
    assert "bad_row ×4 (first: " in warning[0] and "a.csv:4: bad_row (3 fields, the header has 2)" in warning[0]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["prepare"]["skipped_input"] == {"bad_row": 4} and m["counts"]["documents"]["train"] == 2
    assert "skipped input: bad_row" in out


def test_an_interrupted_prepare_leaves_nothing_that_is_accepted(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text(GOOD)
    out = tmp_path / "out"
    argv = ["data", "prepare", "--input", tmp_path / "a.txt", "--doc-mode", "paragraph", "--out", out,
            *PREPARE_FLAGS, "--output.shard_tokens=50", "--output.val_fraction=0"]
    real, calls = prepare_mod.read_staged, []

    def dying(path):  # the 1st read trains the tokenizer, the 2nd feeds the pack: interrupted mid-pack
        calls.append(path)
        for i, text in enumerate(real(path)):
            if i == 40 and len(calls) == 2:
                raise KeyboardInterrupt
            yield text

    monkeypatch.setattr(prepare_mod, "read_staged", dying)
    monkeypatch.setattr("lmforge.data.pack._BATCH_BYTES", 200)  # shards get written before the interrupt
    assert run_cli(capsys, *argv)[0] == 130
    assert list(out.glob("train_*.bin")) and not (out / "manifest.json").exists()
    assert verify(out)
    code, err, _ = run_cli(capsys, "data", "inspect", out)
    assert_user_error(code, err, "data inspect", "interrupted prepare left progress.json")
    code, err, _ = run_cli(capsys, "train", f"--data.path={out}", f"--run_dir={tmp_path / 'run'}", *TINY_MODEL, *QUIET)
    assert_user_error(code, err, "train", "no manifest.json")
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(prepare_mod, "read_staged", real)
    assert run_cli(capsys, *argv)[0] == 0 and verify(out) == []


# ------------------------------------------------------------------ packed folders that changed after packing

def _manifest(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _ids(folder, name, edit):
    a = np.fromfile(folder / name, dtype="<u2")
    edit(a)
    a.tofile(folder / name)


def _swap_tokens(folder):  # ids stay in range: only the hash can tell
    _ids(folder, "train_00001.bin", lambda a: a.__setitem__(slice(3, 5), a[3:5][::-1].copy() + 1))


def _foreign_tokenizer(folder):
    train_tokenizer(["entirely different text"] * 30, vocab_size=280).save(folder / "tokenizer.json")


def _interrupted(folder):
    (folder / "manifest.json").unlink()
    (folder / "progress.json").write_text("{}")


MUTATIONS = {
    "changed-shard": (_swap_tokens, ["train_00001.bin: sha256 is ", "but manifest.json says"]),
    "id-out-of-range": (lambda f: _ids(f, "train_00001.bin", lambda a: a.__setitem__(17, 4000)),
                        ["train_00001.bin: sha256 is ",
                         "token id 4000 at position 17 is >= the manifest's vocab_size"]),
    "vocab-size-edited": (lambda f: _manifest(f, lambda m: m.update(vocab_size=260)),
                          ["train_00000.bin: token id", "is >= the manifest's vocab_size 260"]),
    "truncated-shard": (lambda f: (f / "train_00002.bin").write_bytes((f / "train_00002.bin").read_bytes()[:-2]),
                        ["train_00002.bin: ", "bytes but manifest.json says"]),
    "missing-shard": (lambda f: (f / "train_00001.bin").unlink(),
                      ["train_00001.bin: shard listed in manifest.json is missing"]),
    "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(),
                     ["tokenizer.json: missing from the packed data folder"]),
    "foreign-tokenizer": (_foreign_tokenizer, ["tokenizer.json: not the tokenizer these shards were made with"]),
    "manifest-no-splits": (lambda f: _manifest(f, lambda m: m.pop("splits")), ["manifest.json: missing key 'splits'"]),
    "manifest-bad-dtype": (lambda f: _manifest(f, lambda m: m.update(dtype="int8")),
                           ["dtype must be uint16 or uint32, got 'int8'"]),
    "manifest-eos-out-of-range": (lambda f: _manifest(f, lambda m: m.update(eos_id=99999)),
                                  ["eos_id 99999 is outside the vocabulary"]),
    "manifest-vocab-not-int": (lambda f: _manifest(f, lambda m: m.update(vocab_size="300")),
                               ["'vocab_size' must be an integer, got '300'"]),
    "manifest-newer-format": (lambda f: _manifest(f, lambda m: m.update(format_version=99)),
                              ["format_version 99 is newer than this lmforge"]),
    "manifest-no-sha256": (lambda f: _manifest(f, lambda m: m["splits"]["train"][0].pop("sha256")),
                           ["train_00000.bin: manifest.json lists no sha256"]),
    "interrupted-prepare": (_interrupted, ["no manifest.json in", "interrupted prepare left progress.json"]),
}


def _mutated(tmp_path_factory, tmp_path, case):
    folder = copy_of(packed_data(tmp_path_factory), tmp_path / "packed")
    MUTATIONS[case][0](folder)
    return folder


def _data_files(folder):
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(CACHE_NAME)}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_inspect_refuses_packed_data_that_does_not_match_its_manifest(tmp_path_factory, tmp_path, capsys, case):
    folder = _mutated(tmp_path_factory, tmp_path, case)
    before = _data_files(folder)
    code, err, _ = run_cli(capsys, "data", "inspect", folder)
    line = assert_user_error(code, err, "data inspect", *MUTATIONS[case][1])
    assert str(folder) in line
    assert _data_files(folder) == before  # only the hash cache may be (re)written, and it is whole JSON
    if (folder / CACHE_NAME).exists():
        json.loads((folder / CACHE_NAME).read_text())


TRAIN_CASES = ["changed-shard", "id-out-of-range", "vocab-size-edited", "no-tokenizer", "truncated-shard"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_it_before_any_run_folder_exists(tmp_path_factory, tmp_path, capsys, case):
    folder = _mutated(tmp_path_factory, tmp_path, case)
    code, err, _ = run_cli(capsys, "train", f"--data.path={folder}", f"--run_dir={tmp_path / 'run'}", *TINY_MODEL,
                           *QUIET, "--training.max_steps=1")
    assert_user_error(code, err, "train", *MUTATIONS[case][1])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,needle,named", [
    ("changed-shard", "train_00001.bin: sha256 mismatch (file changed or corrupt): ",
     "train_00001.bin: sha256 mismatch (file changed or corrupt)"),
    ("id-out-of-range", "train_00001.bin: token id 4000 at position 17 >= vocab_size",
     "train_00001.bin: token id 4000 at position 17 >= vocab_size"),
    ("vocab-size-edited", "train_00000.bin: token id", "train_00000.bin: token id"),
    ("missing-shard", "train_00001.bin: missing", "train_00001.bin: missing"),
    ("interrupted-prepare", "no manifest.json in", "no manifest.json in"),
])
def test_verify_lists_the_problem_and_exits_2(tmp_path_factory, tmp_path, capsys, case, needle, named):
    """A failed verification is the user's data problem: the per-shard FAIL lines, then one error line naming
    the shard(s) and what failed, and exit 2 (1 is for bugs in lmforge)."""
    folder = _mutated(tmp_path_factory, tmp_path, case)
    code, err, _ = run_cli(capsys, "data", "verify", folder)
    assert_user_error(code, err, "data verify", f"{folder}: verification failed", named)
    assert any(line.startswith("FAIL ") and needle in line for line in err.splitlines()), err
    assert "hint: " in err and "lmforge data prepare" in err
