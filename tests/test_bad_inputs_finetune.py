"""Bad fine-tuning files through the real command line (``lmforge finetune`` and ``lmforge evaluate``) on a
tiny lmforge base: empty evaluation sets, rows with the wrong field count, labels and tags outside the
label set, undecodable bytes, malformed JSON lines, conversations with nothing to learn. Each case checks
the exit code, the one error line (file:line), and that no run folder or report was written."""

import json

import pytest
import torch

from tests.helpers.bad_inputs import assert_user_error, run_cli, snapshot, texts, tiny_run

torch.set_num_threads(1)


def _tsv(n=40, seed=0):
    return "sentence\tlabel\n" + "".join(f"{t}\t{int('great' in t)}\n" for t in texts(n, seed, k=6))


CONLL = "".join("the O\nmovie B-MISC\nactor I-MISC\nplot O\n\n" for _ in range(12))
SFT = "".join(json.dumps({"prompt": "the movie", "response": "great film"}) + "\n" for _ in range(12))
TRAIN = {"classification": ("train.tsv", _tsv()), "token-classification": ("train.conll", CONLL),
         "sft": ("train.jsonl", SFT)}
HEADER = "sentence\tlabel\n"

# (case id, task, {file: content} replacing or adding files, extra arguments ({d}: the case folder), needles)
CASES = [
    ("val-header-only", "classification", {"dev.tsv": HEADER}, ["--data.validation={d}/dev.tsv"],
     ["dev.tsv: no examples (a header and no rows)"]),
    ("test-header-only", "classification", {"test.tsv": HEADER}, ["--data.test={d}/test.tsv"],
     ["test.tsv: no examples (a header and no rows)"]),
    ("train-header-only", "classification", {"train.tsv": HEADER}, [], ["train.tsv: no examples"]),
    ("val-csv-header-only", "classification", {"dev.csv": "sentence,label\n\n"}, ["--data.validation={d}/dev.csv"],
     ["dev.csv: no examples (a header and no rows)"]),
    ("val-jsonl-empty", "classification", {"dev.jsonl": "\n\n"}, ["--data.validation={d}/dev.jsonl"],
     ["dev.jsonl: no examples (the file is empty)"]),
    ("val-empty-file", "classification", {"dev.tsv": ""}, ["--data.validation={d}/dev.tsv"], ["dev.tsv: empty file"]),
    ("val-label-unseen-jsonl", "classification", {"dev.jsonl": '{"sentence": "the film", "label": 9}\n'},
     ["--data.validation={d}/dev.jsonl"], ["dev.jsonl:1: label '9' not in label_names ['0', '1']"]),
    ("val-tsv-extra-field", "classification", {"dev.tsv": HEADER + "the film\t1\nthe\tfilm\t0\n"},
     ["--data.validation={d}/dev.tsv"], ["dev.tsv:3: 3 fields, the header has 2 (sentence, label)"]),
    ("val-csv-missing-field", "classification", {"dev.csv": "sentence,label\nthe film,1\nno label here\n"},
     ["--data.validation={d}/dev.csv"], ["dev.csv:3: 1 fields, the header has 2"]),
    ("train-tsv-extra-field", "classification", {"train.tsv": _tsv() + "a\ttab inside\t1\n"}, [],
     ["train.tsv:42: 3 fields, the header has 2"]),
    ("val-not-utf8", "classification", {"dev.tsv": (HEADER + "ok film\t1\ncaf\xe9\t0\n").encode("latin-1")},
     ["--data.validation={d}/dev.tsv"], ["dev.tsv:3: not UTF-8 text"]),
    ("val-jsonl-not-object", "classification", {"dev.jsonl": "[1, 2]\n"}, ["--data.validation={d}/dev.jsonl"],
     ["dev.jsonl:1: expected a JSON object, got a list"]),
    ("val-jsonl-bad-json", "classification", {"dev.jsonl": '{"sentence": "a", "label": 1}\n{"sentence": \n'},
     ["--data.validation={d}/dev.jsonl"], ["dev.jsonl:2: not valid JSON"]),
    ("train-no-text-column", "classification", {"train.tsv": "a\tb\nx\t1\n"}, [],
     ["train.tsv: no text column among ['a', 'b']"]),
    ("label-field-missing", "classification", {}, ["--data.label_field=stars"],
     ["train.tsv: label column 'stars' not found (columns: ['sentence', 'label'])"]),
    ("val-file-missing", "classification", {}, ["--data.validation={d}/none.tsv"],
     ["data.validation: file not found", "none.tsv"]),
    ("conll-val-empty", "token-classification", {"dev.conll": "-DOCSTART- -X- O O\n\n"},
     ["--data.validation={d}/dev.conll"], ["dev.conll: no sentences"]),
    ("conll-val-unseen-tag", "token-classification", {"dev.conll": "the O\nfilm B-XYZ\n"},
     ["--data.validation={d}/dev.conll"], ["dev.conll:2: tag 'B-XYZ' does not occur in the training data"]),
    ("conll-bad-tag", "token-classification", {"train.conll": CONLL + "the O\nfilm PER\n"}, [],
     ["train.conll:62: tag 'PER' is not O, B-TYPE or I-TYPE"]),
    ("conll-val-no-tag", "token-classification", {"dev.conll": "the O\nfilm\n"}, ["--data.validation={d}/dev.conll"],
     ["dev.conll:2: expected 'word ... tag' columns"]),
    ("conll-not-utf8", "token-classification", {"dev.conll": b"the O\ncaf\xe9 O\n"},
     ["--data.validation={d}/dev.conll"],
     ["dev.conll:2: not UTF-8 text"]),
    ("sft-empty", "sft", {"train.jsonl": ""}, [], ["train.jsonl: no conversations (the file is empty)"]),
    ("sft-no-assistant", "sft", {"dev.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'},
     ["--data.validation={d}/dev.jsonl"], ["dev.jsonl:1: conversation has no assistant turn"]),
    ("sft-bad-messages", "sft", {"dev.jsonl": '{"messages": "hi"}\n'}, ["--data.validation={d}/dev.jsonl"],
     ["dev.jsonl:1: 'messages' must be a list"]),
    ("sft-unknown-keys", "sft", {"dev.jsonl": '{"q": "a"}\n'}, ["--data.validation={d}/dev.jsonl"],
     ["dev.jsonl:1: expected 'messages' or string 'prompt' and 'response' keys, got ['q']"]),
    ("sft-nothing-left-after-truncation", "sft", {}, ["--data.max_len=4"],  # 12 conversations, 1 split off to val
     ["train.jsonl: none of the 11 examples has a target token left after truncation to data.max_len=4"]),
]


def _argv(d, run, task, extra):
    return ["finetune", f"--task={task}", f"--base.path={run}", f"--data.train={d / TRAIN[task][0]}",
            f"--run_dir={d / 'ft'}", "--train.max_steps=1", "--train.device=cpu", "--data.max_len=32",
            *[a.format(d=d) for a in extra]]


def _write(d, files):
    for name, content in files.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("task,files,extra,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_finetune_refuses_the_file_and_leaves_no_run_folder(tmp_path_factory, tmp_path, capsys, task, files, extra,
                                                            needles):
    run = tiny_run(tmp_path_factory)
    _write(tmp_path, {TRAIN[task][0]: TRAIN[task][1], **files})
    code, err, _ = run_cli(capsys, *_argv(tmp_path, run, task, extra))
    assert_user_error(code, err, "finetune", *needles)
    assert not (tmp_path / "ft").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 1-step classification fine-tuning run to evaluate."""
    d = tmp_path_factory.mktemp("bad_inputs_ft")
    _write(d, {"train.tsv": _tsv()})
    from lmforge.cli import main

    assert main(_argv(d, tiny_run(tmp_path_factory), "classification", [])) == 0
    return d / "ft"


EVALUATE = [
    ("header-only", {"e.tsv": HEADER}, [], ["e.tsv: no examples (a header and no rows)"]),
    ("unseen-label", {"e.tsv": HEADER + "the film\t7\n"}, [], ["e.tsv:2: label '7' not in label_names"]),
    ("extra-field", {"e.tsv": HEADER + "the\tfilm\t1\n"}, [], ["e.tsv:2: 3 fields, the header has 2"]),
    ("max-examples-0", {"e.tsv": _tsv(5)}, ["--max-examples", "0"], ["--max-examples 0: must be >= 1"]),
    ("batch-size-0", {"e.tsv": _tsv(5)}, ["--batch-size", "0"], ["--batch-size 0: must be >= 1"]),
    ("data-missing", {}, [], ["--data: file not found", "e.tsv"]),
]


@pytest.mark.parametrize("files,extra,needles", [c[1:] for c in EVALUATE], ids=[c[0] for c in EVALUATE])
def test_evaluate_refuses_the_file_and_writes_no_report(finished, tmp_path, capsys, files, extra, needles):
    _write(tmp_path, files)
    before = snapshot(finished)
    code, err, _ = run_cli(capsys, "evaluate", "--run", finished, "--data", tmp_path / "e.tsv", "--name", "bad", *extra)
    assert_user_error(code, err, "evaluate", *needles)
    assert snapshot(finished) == before and not list(finished.glob("reports/bad.*"))
