"""Fine-tuning quality: lmforge finetune vs Hugging Face Trainer (+ peft LoRA), side by side.

Same base (all-MiniLM-L6-v2), same encoded examples (identical token ids and labels), same epochs, batch size,
learning rate, linear schedule and weight decay; both scored by lmforge's report code. Prints dev accuracy
(SST-2, ChnSentiCorp) or entity micro-F1 (CoNLL-2003) and wall time.

Targets with the full data: SST-2 full ≥ 0.88 dev accuracy, LoRA within 1.5 points; CoNLL dev F1 ≥ 0.85. In bf16
on one CPU thread a full SST-2 epoch takes ~11 min for lmforge (~16 min for HF), a CoNLL epoch ~5 min; subsets
are flags (``--train-examples 0``: all):

    .venv/bin/python benchmarks/finetune_quality.py --task sst2 --train-examples 2000 --epochs 1
    .venv/bin/python benchmarks/finetune_quality.py --task conll --train-examples 1000 --epochs 2
    .venv/bin/python benchmarks/finetune_quality.py --task chnsenticorp --train-examples 0 --epochs 2 --max-len 128

ChnSentiCorp runs MiniLM with its vocabulary extended by the training file's unknown characters (see ADD_CHARS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.finetune.config import load_finetune_config  # noqa: E402
from lmforge.finetune.data import collate, load_task_data  # noqa: E402
from lmforge.finetune.evaluation import evaluate_examples  # noqa: E402
from lmforge.finetune.model import load_base, minilm_path  # noqa: E402
from lmforge.finetune.trainer import finetune  # noqa: E402

DATA = Path(os.environ.get("LMFORGE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TASKS = {  # task kind, train, dev, lr (full), lr (lora), headline metric
    "sst2": ("classification", "sst2/train.tsv", "sst2/dev.tsv", 5e-5, 1e-3, "val_accuracy"),
    "conll": ("token-classification", "conll2003/train.txt", "conll2003/valid.txt", 1e-4, 2e-3, "val_micro_f1"),
    "chnsenticorp": ("classification", "zh/chnsenticorp/train.tsv", "zh/chnsenticorp/dev.tsv", 5e-5, 1e-3,
                     "val_accuracy"),
}

# MiniLM's English WordPiece maps ~64% of ChnSentiCorp's characters to [UNK]: the Chinese-capable setup adds the
# training file's unknown characters (seen ≥ 2 times: ~3.3k) as new tokens (lmforge: base.add_unknown_chars; HF:
# the same tokenizer + resize_token_embeddings) and fine-tunes everything.
ADD_CHARS = {"chnsenticorp": 2}


def overrides(args, task: str, method: str, run_dir: Path) -> list[str]:
    kind, train, dev, lr_full, lr_lora, _ = TASKS[task]
    ov = [f"--base.path={minilm_path()}", f"--task={kind}", f"--data.train={DATA / train}",
          f"--data.validation={DATA / dev}", f"--data.max_len={args.max_len}", f"--method.name={method}",
          f"--method.lora_r={args.lora_r}", f"--train.epochs={args.epochs}", f"--train.batch_size={args.batch_size}",
          f"--optimizer.lr={lr_full if method == 'full' else lr_lora}", f"--train.precision={args.precision}",
          f"--run_dir={run_dir}", f"--train.seed={args.seed}", f"--data.seed={args.seed}"]
    if args.train_examples:
        ov.append(f"--data.max_train_examples={args.train_examples}")
    if args.eval_examples:
        ov.append(f"--data.max_eval_examples={args.eval_examples}")
    if task in ADD_CHARS:
        ov.append(f"--base.add_unknown_chars={ADD_CHARS[task]}")
    return ov


def run_lmforge(args, task: str, method: str) -> dict:
    run_dir = Path(args.out) / f"{task}_{method}_lmforge"
    cfg = load_finetune_config(None, overrides(args, task, method, run_dir))
    done = run_dir / "summary.json"
    if args.reuse and done.is_file() and load_finetune_config(run_dir / "finetune.yaml") == cfg:
        s = json.loads(done.read_text())  # the same config already ran to the end in this folder
        print(f"reusing {done} (same resolved config)")
        return {"metric": s["validation"][TASKS[task][5]], "seconds": s["train_seconds"], "loop": s["loop_seconds"],
                "trainable": s["params"]["trainable"]}
    t0 = time.time()
    s = finetune(cfg)
    return {"metric": s["validation"][TASKS[task][5]], "seconds": time.time() - t0, "loop": s["loop_seconds"],
            "trainable": s["params"]["trainable"]}


def run_hf(args, task: str, method: str) -> dict:
    """transformers.Trainer on the same encoded examples; peft get_peft_model for LoRA."""
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, Trainer,
                              TrainingArguments)

    cfg = load_finetune_config(None, overrides(args, task, method, Path(args.out) / "unused"))
    backbone, tok, _ = load_base(cfg.base.path)
    if task in ADD_CHARS:
        from lmforge.finetune.vocab import extend_vocab

        extend_vocab(cfg, backbone, tok)
    data = load_task_data(cfg, tok)
    kind = TASKS[task][0]
    cls = AutoModelForSequenceClassification if kind == "classification" else AutoModelForTokenClassification
    t0 = time.time()
    model = cls.from_pretrained(str(minilm_path()), num_labels=len(data.label_names))
    if task in ADD_CHARS:
        model.resize_token_embeddings(tok.vocab_size, mean_resizing=True)
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        tt = TaskType.SEQ_CLS if kind == "classification" else TaskType.TOKEN_CLS
        model = get_peft_model(model, LoraConfig(task_type=tt, r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 target_modules=["query", "key", "value", "attention.output.dense"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = tok.pad_id or 0

    def hf_collate(examples):
        b = collate(examples, pad)
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"].long(),
                "labels": b["label"] if kind == "classification" else b["labels"]}

    targs = TrainingArguments(output_dir=str(Path(args.out) / f"{task}_{method}_hf"), num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch_size, learning_rate=cfg.optimizer.lr,
                              weight_decay=cfg.optimizer.weight_decay, lr_scheduler_type="linear", warmup_steps=0,
                              max_grad_norm=cfg.train.grad_clip, save_strategy="no", eval_strategy="no",
                              report_to=[], logging_steps=50, seed=args.seed, bf16=args.precision == "bf16",
                              dataloader_num_workers=0, remove_unused_columns=False,
                              use_cpu=not torch.cuda.is_available())
    out = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=hf_collate).train()

    class Wrap(torch.nn.Module):  # lmforge's scorer calls model(input_ids, attention_mask) -> logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            return self.m(input_ids=ids, attention_mask=mask.long()).logits

    rep = evaluate_examples(Wrap(model), data.val, kind, data.label_names, pad, 64, args.precision)
    metric = rep["accuracy"] if kind == "classification" else rep["averages"]["micro"]["f1"]
    return {"metric": metric, "seconds": time.time() - t0, "loop": out.metrics["train_runtime"], "trainable": trainable}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS) + ["all"], default="sst2")
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--train-examples", type=int, default=2000, help="seeded subset of train (0: all)")
    p.add_argument("--eval-examples", type=int, default=0, help="first N dev examples (0: all)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="lmforge only")
    p.add_argument("--out", default="/tmp/lmforge_ft_bench")
    p.add_argument("--reuse", action="store_true", help="take lmforge's numbers from a finished run in --out with "
                   "the same resolved config instead of training again")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = sorted(TASKS) if args.task == "all" else [args.task]
    rows = []
    for task in tasks:
        if not (DATA / TASKS[task][1]).is_file():
            print(f"skip {task}: {DATA / TASKS[task][1]} not found (set LMFORGE_DATA)")
            continue
        for method in args.methods.split(","):
            ours = run_lmforge(args, task, method)
            ref = None if args.skip_hf else run_hf(args, task, method)
            rows.append((task, method, ours, ref))
    name = {"sst2": "acc", "chnsenticorp": "acc", "conll": "entity F1"}
    print(f"\nMiniLM-L6, train subset {args.train_examples or 'all'}, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"max_len {args.max_len}, {args.precision}, torch threads {torch.get_num_threads()}")
    print("times: 'loop' = training loop only (HF train_runtime; lmforge minus its evaluations), 'total' = "
          "model load + data + train + final eval; ratio = lmforge / HF training loop")
    print(f"{'task':<13}{'method':<7}{'metric':<10}{'lmforge':>9}{'HF':>9}{'Δ pts':>8}{'loop s':>8}{'HF loop':>9}"
          f"{'ratio':>7}{'total s':>9}{'HF tot':>8}{'trainable':>12}")
    for task, method, ours, ref in rows:
        hf_m = f"{ref['metric']:.4f}" if ref else "-"
        delta = f"{100 * (ours['metric'] - ref['metric']):+.2f}" if ref else "-"
        hf_l = f"{ref['loop']:.0f}" if ref else "-"
        hf_s = f"{ref['seconds']:.0f}" if ref else "-"
        ratio = f"{ours['loop'] / ref['loop']:.2f}x" if ref else "-"
        print(f"{task:<13}{method:<7}{name[task]:<10}{ours['metric']:>9.4f}{hf_m:>9}{delta:>8}{ours['loop']:>8.0f}"
              f"{hf_l:>9}{ratio:>7}{ours['seconds']:>9.0f}{hf_s:>8}{ours['trainable']:>12,}")


if __name__ == "__main__":
    main()
