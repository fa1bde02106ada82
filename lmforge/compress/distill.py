"""``lmforge compress distill``: a shallower student, initialised from a subset of the teacher's layers, trained
through the one loop on the distillation loss (``DistillObjective``).

Decoders train on the teacher run's own data (``train`` split of its ``data.path``); classifiers on the
fine-tuning run's training examples, the teacher being that run's best weights. With ``distill.baseline`` the
same student is also trained without the teacher (alpha = 0: cross-entropy only) for the same steps, and both
land in the report.
"""

from __future__ import annotations

import copy

from torch import nn

from lmforge.compress.kd import DistillObjective, lm_of
from lmforge.errors import ConfigError


def student_layers(n_teacher: int, dc) -> list[int]:
    """The teacher layers the student starts from: ``distill.layers``, else ``distill.n_layers`` (default half)
    evenly spaced with the first and the last included."""
    if dc.layers:
        layers = list(dc.layers)
        if dc.n_layers is not None and dc.n_layers != len(layers):
            raise ConfigError(f"distill.n_layers={dc.n_layers} but distill.layers lists {len(layers)} layers")
        if any(i < 0 or i >= n_teacher for i in layers) or layers != sorted(set(layers)):
            raise ConfigError(f"distill.layers={layers} must be increasing teacher layer indices in 0..{n_teacher - 1}")
        return layers
    n = dc.n_layers if dc.n_layers is not None else max(1, n_teacher // 2)
    if n > n_teacher:
        raise ConfigError(f"distill.n_layers={n} is deeper than the teacher ({n_teacher} layers)",
                          hint="a student has at most as many layers as its teacher")
    if n == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n - 1)) for i in range(n)})


def student_from(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``teacher`` (an LM, or a TaskModel over one) keeping only ``layers`` of its blocks."""
    student = copy.deepcopy(teacher)
    lm = lm_of(student)
    lm.layers = nn.ModuleList(lm.layers[i] for i in layers)
    for j, block in enumerate(lm.layers):
        if hasattr(block, "layer_idx"):
            block.layer_idx = j  # the KV-cache slot of the block
    lm.cfg = lm.cfg.model_copy(update={"n_layers": len(layers)})
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def distill(ctx):
    from lmforge.compress.run import Result
    from lmforge.compress.trainjobs import done, train_classifier, train_lm, work_dir

    src, dc = ctx.src, ctx.cfg.distill
    teacher = src.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    n_teacher = len(lm_of(teacher).layers)
    layers = student_layers(n_teacher, dc)
    student = student_from(teacher, layers)
    cache = ctx.stage.tmp / ".work" / "teacher_cache" if dc.cache_teacher else None

    made: list[DistillObjective] = []

    def objective(alpha: float, hard=None):
        made.append(DistillObjective(teacher, src.kind, alpha, dc.temperature, layers, dc.hidden_weight if alpha else 0.0,
                                     dc.attention_weight if alpha else 0.0, cache_dir=cache if alpha > 0 else None,
                                     hard=hard))
        return made[-1]

    extra, notes, step = {}, [], {"method": "distill", "teacher_layers": n_teacher, "student_layers": layers,
                                  "temperature": dc.temperature, "alpha": dc.alpha, "hidden_weight": dc.hidden_weight,
                                  "attention_weight": dc.attention_weight, "steps": ctx.cfg.train.steps}
    if src.kind == "lm":
        run = lambda alpha, name: train_lm(ctx, lm_of(student), work_dir(ctx, name),  # noqa: E731
                                           lambda default: objective(alpha))
    else:
        run = lambda alpha, name: train_classifier(ctx, student, work_dir(ctx, name),  # noqa: E731
                                                   lambda task_objective: objective(alpha, task_objective))
    if dc.baseline:
        base_model, base_summary = run(0.0, "baseline")
        extra["student, no KD"] = (base_model, None, None)
        step["baseline"] = _brief(base_summary)
    model, summary = run(dc.alpha, "student")
    step["train"] = _brief(summary)
    stats = made[-1].cache_note()
    done(ctx)
    notes.append(f"student: teacher layers {layers} of {n_teacher}; {ctx.cfg.train.steps} steps on the teacher's "
                 f"{'own data' if src.kind == 'lm' else 'fine-tuning training set'}; loss = {dc.alpha:g}·T²·KL + "
                 f"{1 - dc.alpha:g}·CE at T={dc.temperature:g}"
                 + (f" + {dc.hidden_weight:g}·hidden MSE" if dc.hidden_weight else "")
                 + (f" + {dc.attention_weight:g}·attention MSE" if dc.attention_weight else ""))
    if stats:
        notes.append(stats)
    if dc.baseline:
        notes.append("'student, no KD': the same student and steps with alpha=0 (cross-entropy only)")
    return Result(model, step, notes, extra=extra)


def _brief(s: dict) -> dict:
    keep = ("stop_reason", "steps", "val_loss", "val_ppl", "elapsed_s", "best_value", "loop_seconds")
    return {k: s[k] for k in keep if isinstance(s.get(k), (int, float, str))}
