"""Reports agree with scikit-learn and seqeval; entity chunking edge cases for IOB1 and IOB2."""

import json
import random

import numpy as np
import pytest

from lmforge.finetune.reports import (classification_report, entity_report, extract_entities, print_report,
                                      to_html, to_markdown, write_report)


def _check_against_sklearn(y_true, y_pred, names):
    from sklearn.metrics import classification_report as skl

    ours = classification_report(y_true, y_pred, names)
    ref = skl(y_true, y_pred, labels=list(range(len(names))), target_names=names, output_dict=True, zero_division=0)
    for n in names:
        for k in ("precision", "recall", "support"):
            assert ours["per_class"][n][k] == pytest.approx(ref[n][k])
        assert ours["per_class"][n]["f1"] == pytest.approx(ref[n]["f1-score"])
    for avg in ("macro", "weighted"):
        for k in ("precision", "recall"):
            assert ours["averages"][avg][k] == pytest.approx(ref[f"{avg} avg"][k])
        assert ours["averages"][avg]["f1"] == pytest.approx(ref[f"{avg} avg"]["f1-score"])
    acc = ref.get("accuracy", ref.get("micro avg", {}).get("f1-score"))
    assert ours["accuracy"] == pytest.approx(acc)
    assert ours["averages"]["micro"]["f1"] == pytest.approx(acc)
    return ours


def test_classification_matches_sklearn_random():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        y_true = rng.integers(0, k, 200).tolist()
        y_pred = [t if rng.random() < 0.6 else int(rng.integers(0, k)) for t in y_true]
        _check_against_sklearn(y_true, y_pred, [f"c{i}" for i in range(k)])


def test_classification_class_never_predicted_and_absent():
    # class 2 never predicted (precision 0 by zero_division), class 3 absent from truth and predictions
    ours = _check_against_sklearn([0, 1, 2, 2, 0, 1], [0, 1, 0, 1, 0, 0], ["a", "b", "c", "d"])
    assert ours["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert ours["confusion"][2] == [1, 1, 0, 0]


def test_classification_bad_label_is_named():
    with pytest.raises(ValueError, match="label 3 outside 0..1"):
        classification_report([0, 1], [0, 3], ["a", "b"])


@pytest.mark.parametrize("tags,scheme,strict,expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], "iob2", False, [("PER", 0, 2), ("LOC", 3, 4)]),
    # IOB1: I- opens an entity; B- only splits two adjacent entities of the same type
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob1", False, [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)]),
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob1", True, [("PER", 0, 2), ("PER", 2, 3), ("LOC", 4, 5)]),
    # the same IOB1 tags read as strict IOB2: chunks not opened by B- do not exist
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], "iob2", True, [("PER", 2, 3)]),
    # type change inside a run splits it
    (["B-PER", "I-ORG", "I-ORG"], "iob2", False, [("PER", 0, 1), ("ORG", 1, 3)]),
    (["B-PER", "I-ORG", "I-ORG"], "iob2", True, [("PER", 0, 1)]),
    # B- right after an entity of the same type: two entities in both schemes
    (["B-LOC", "B-LOC", "I-LOC"], "iob2", False, [("LOC", 0, 1), ("LOC", 1, 3)]),
    # strict IOB1 rejects a B- that does not follow its own type
    (["O", "B-MISC", "I-MISC"], "iob1", True, [("MISC", 2, 3)]),
    (["B-X"], "iob2", True, [("X", 0, 1)]),
    ([], "iob2", False, []),
])
def test_entity_chunking(tags, scheme, strict, expected):
    assert extract_entities(tags, scheme, strict) == expected


def test_entity_bad_tag_named():
    with pytest.raises(ValueError, match="'E-PER'"):
        extract_entities(["E-PER"])


def test_entity_report_hand_case():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER boundary wrong: not a match
    r = entity_report(true, pred)
    assert r["per_class"]["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_class"]["LOC"]["f1"] == 1.0
    assert r["averages"]["micro"]["precision"] == pytest.approx(2 / 3)
    assert r["averages"]["micro"]["recall"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(5 / 6)


def _random_tags(rng, n, types=("PER", "LOC", "ORG")):
    return [rng.choice(["O", "O", f"B-{rng.choice(types)}", f"I-{rng.choice(types)}"]) for _ in range(n)]


@pytest.mark.parametrize("strict", [False, True])
def test_entity_report_matches_seqeval(strict):
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval not installed")
    from seqeval.scheme import IOB2

    rng = random.Random(1)
    true = [_random_tags(rng, rng.randint(1, 12)) for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-PER", "B-LOC", "I-ORG"]) for t in s]
            for s in true]
    kw = {"mode": "strict", "scheme": IOB2} if strict else {}
    ref = seqeval.classification_report(true, pred, output_dict=True, zero_division=0, **kw)
    ours = entity_report(true, pred, "iob2", strict)
    for ty, m in ours["per_class"].items():
        assert m["precision"] == pytest.approx(ref[ty]["precision"])
        assert m["recall"] == pytest.approx(ref[ty]["recall"])
        assert m["f1"] == pytest.approx(ref[ty]["f1-score"])
        assert m["support"] == ref[ty]["support"]
    for avg in ("micro", "macro", "weighted"):
        assert ours["averages"][avg]["f1"] == pytest.approx(ref[f"{avg} avg"]["f1-score"])


def test_writers(tmp_path):
    r = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ["neg", "pos<b>"])
    paths = write_report(r, tmp_path, "dev", title="SST-2 dev")
    assert json.loads(paths["json"].read_text())["accuracy"] == 0.75
    md = paths["markdown"].read_text()
    assert "| neg | 0.6667 | 1.0000 | 0.8000 | 2 |" in md and "macro avg" in md
    assert paths["confusion"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pos&lt;b&gt;" in to_html(r) and "<table>" in to_html(r)
    assert to_markdown(r).startswith("## Evaluation")
    from rich.console import Console

    con = Console(record=True, width=100)
    print_report(r, "dev", console=con)
    assert "0.8000" in con.export_text()
    er = entity_report([["B-PER"]], [["B-PER"]])
    assert "confusion" not in write_report(er, tmp_path, "ner")
