"""Fine-tuning task data: classification files, instruction/chat JSONL with response-only loss, MLM masking.

Token classification (CoNLL) lives in ``tasks_conll.py``. Legend: B = batch, T = sequence length.
Labels use ``IGNORE_INDEX`` (-100, from ``models/losses.py``) where no loss is taken.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from lmforge.errors import DataError
from lmforge.models.losses import IGNORE_INDEX
_TEXT_COLUMNS = ("sentence", "text", "text_a", "review", "content")
_LABEL_COLUMNS = ("label", "labels", "class", "category")
_FIELDS_HINT = {"\t": "TSV fields are not quoted: a text holding a tab must have it replaced",
                ",": "quote a field holding a comma: \"like, this\""}


@dataclass
class ClassificationData:
    texts: list[str]
    labels: list[int]
    label_names: list[str]  # index → original label string


def _pick(columns: Sequence[str], wanted: Optional[str], candidates: tuple[str, ...], path, kind: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: {kind} column '{wanted}' not found (columns: {list(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise DataError(f"{path}: no {kind} column among {list(columns)}; pass {kind}_field= (tried {list(candidates)})")


def read_text_file(path: Path) -> str:
    """The whole file as text; bytes that are not UTF-8 are a ``DataError`` at file:line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the first header
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; anything else names file:line."""
    for n, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got a {type(obj).__name__}")
        yield n, obj


def _jsonl_rows(path: Path, text_field, label_field) -> list[tuple[str, str, int]]:
    rows = []
    for n, obj in json_lines(path):
        tf = _pick(list(obj), text_field, _TEXT_COLUMNS, f"{path}:{n}", "text")
        lf = _pick(list(obj), label_field, _LABEL_COLUMNS, f"{path}:{n}", "label")
        rows.append((str(obj[tf]), str(obj[lf]), n))
    return rows


def _delimited_rows(path: Path, text_field, label_field) -> list[tuple[str, str, int]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), delimiter=delim,
                        quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
    rows = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        ti = header.index(_pick(header, text_field, _TEXT_COLUMNS, path, "text"))
        li = header.index(_pick(header, label_field, _LABEL_COLUMNS, path, "label"))
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)} "
                                f"({', '.join(header)})", hint=_FIELDS_HINT[delim])
            rows.append((row[ti].strip(), row[li].strip(), reader.line_num))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {path.suffix.lstrip('.').upper() or 'CSV'} "
                        f"({e})") from None
    if not rows:
        raise DataError(f"{path}: no examples (a header and no rows)")
    return rows


def read_classification(path: str | Path, text_field: Optional[str] = None, label_field: Optional[str] = None,
                        label_names: Optional[list[str]] = None) -> ClassificationData:
    """Read TSV/CSV (with a header) or JSONL rows of (text, label). Handles SST-2 ``sentence\\tlabel`` and
    ChnSentiCorp ``label\\ttext_a`` layouts by column name. Labels are mapped to 0..K-1 in sorted order
    unless ``label_names`` fixes the mapping (pass the train split's names when reading dev/test). A file
    with no examples, a row with the wrong field count or a label outside ``label_names``: ``DataError``
    at file:line."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _jsonl_rows(path, text_field, label_field)
        if not rows:
            raise DataError(f"{path}: no examples (the file is empty)")
    else:
        rows = _delimited_rows(path, text_field, label_field)
    found = {r[1] for r in rows}
    numeric = all(x.lstrip("-").isdigit() for x in found)
    names = list(label_names) if label_names is not None else sorted(found, key=int if numeric else str)
    index = {name: i for i, name in enumerate(names)}
    labels = []
    for text, lab, n in rows:
        if lab not in index:
            raise DataError(f"{path}:{n}: label {lab!r} not in label_names {names}")
        labels.append(index[lab])
    return ClassificationData([r[0] for r in rows], labels, names)


def encode_classification(tokenizer, data: ClassificationData, max_len: int) -> list[dict]:
    """Token ids (truncated to max_len, EOS appended as the pooling position) and the label per example."""
    out = []
    for ids, label in zip(tokenizer.encode_batch(data.texts), data.labels):
        ids = ids[: max_len - 1] + [tokenizer.eos_id]
        out.append({"input_ids": ids, "label": label})
    return out


def pad_collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad ``input_ids`` (and per-token ``labels`` with -100); stack scalar ``label``."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.bool)
    batch = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT}
    if "labels" in examples[0]:
        batch["labels"] = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids_BT[b, :n] = torch.tensor(e["input_ids"])
        attention_mask_BT[b, :n] = True
        if "labels" in e:
            batch["labels"][b, :n] = torch.tensor(e["labels"])
    if "label" in examples[0]:
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return batch


# --------------------------------------------------------------------------- instruction / chat

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
END_OF_TURN = "\n"


def read_chat_jsonl(path: str | Path) -> list[list[dict]]:
    """Each line: ``{"prompt": ..., "response": ...}`` (optional "system") or ``{"messages": [{role, content}]}``."""
    path = Path(path)
    convs = []
    for n, obj in json_lines(path):
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ROLE_HEADERS
                                                     and isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"{path}:{n}: 'messages' must be a list of {{role: system|user|assistant, content: str}}")
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            msgs = ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
                {"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
        else:
            raise DataError(f"{path}:{n}: expected 'messages' or string 'prompt' and 'response' keys, got {list(obj)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}:{n}: conversation has no assistant turn to learn from")
        convs.append(msgs)
    if not convs:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return convs


def encode_chat(tokenizer, messages: list[dict], max_len: int) -> dict:
    """input_ids for the whole conversation and labels equal to them on assistant replies (and their
    end-of-turn EOS) only, -100 elsewhere. Segments are tokenized separately so the mask is exact."""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = tokenizer.encode(ROLE_HEADERS[m["role"]])
        body = tokenizer.encode(m["content"])
        ids += head
        labels += [IGNORE_INDEX] * len(head)
        if m["role"] == "assistant":
            tail = body + [tokenizer.eos_id]
            ids += tail
            labels += tail
        else:
            tail = body + tokenizer.encode(END_OF_TURN)
            ids += tail
            labels += [IGNORE_INDEX] * len(tail)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant header, ready for generation."""
    ids: list[int] = []
    for m in messages:
        ids += tokenizer.encode(ROLE_HEADERS[m["role"]]) + tokenizer.encode(m["content"])
        ids += [tokenizer.eos_id] if m["role"] == "assistant" else tokenizer.encode(END_OF_TURN)
    return ids + tokenizer.encode(ROLE_HEADERS["assistant"])


# --------------------------------------------------------------------------- masked LM

class MLMCollator:
    """BERT-style masking: choose ``prob`` of non-special positions; of those 80% → mask token,
    10% → random token, 10% unchanged. Labels hold the original id at chosen positions, -100 elsewhere."""

    def __init__(self, mask_id: int, vocab_size: int, pad_id: int, special_ids: Sequence[int] = (),
                 prob: float = 0.15, seed: Optional[int] = None):
        self.mask_id, self.vocab_size, self.pad_id, self.prob = mask_id, vocab_size, pad_id, prob
        self.special = torch.tensor(sorted({*special_ids, pad_id, mask_id}), dtype=torch.long)
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def mask(self, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gen
        maskable_BT = ~torch.isin(input_ids_BT, self.special)
        chosen_BT = (torch.rand(input_ids_BT.shape, generator=g) < self.prob) & maskable_BT
        labels_BT = torch.where(chosen_BT, input_ids_BT, torch.full_like(input_ids_BT, IGNORE_INDEX))
        roll_BT = torch.rand(input_ids_BT.shape, generator=g)
        inputs_BT = input_ids_BT.clone()
        inputs_BT[chosen_BT & (roll_BT < 0.8)] = self.mask_id
        rand_pos_BT = chosen_BT & (roll_BT >= 0.8) & (roll_BT < 0.9)
        random_ids = torch.randint(0, self.vocab_size, input_ids_BT.shape, generator=g)
        inputs_BT[rand_pos_BT] = random_ids[rand_pos_BT]
        return inputs_BT, labels_BT

    def __call__(self, examples: list[dict]) -> dict:
        batch = pad_collate([{"input_ids": e["input_ids"]} for e in examples], self.pad_id)
        batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"])
        return batch
