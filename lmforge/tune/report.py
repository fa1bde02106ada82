"""The study report: ``DIR/report.html`` (the fine-tuning reports' style), ``DIR/report.json``, PNGs under
``DIR/plots/`` (optimization history, parameter importances, parallel coordinates, slice; the Pareto front
for several objectives) and ``DIR/best.yaml``, the best trial's config, which ``lmforge train`` /
``lmforge finetune`` runs as is. ``progress_line`` is the live line printed as trials end.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
import warnings
from collections import Counter
from pathlib import Path

from lmforge.tune.ordered import DUPLICATE_OF, final_attempt, slot_attempts
from lmforge.tune.plan import Plan


def _settled(study, plan: Plan) -> list:
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    out = []
    for j, attempts in sorted(slot_attempts(trials).items()):
        done = final_attempt(attempts)
        if done is not None and j < plan.n_slots:
            out.append(done)
    return out


def _best(study, plan: Plan) -> list:
    from optuna.trial import TrialState

    done = [t for t in _settled(study, plan) if t.state == TrialState.COMPLETE]
    if not done:
        return []
    if len(plan.metrics) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    sign = -1 if plan.cfg.all_objectives()[0].resolved_direction() == "maximize" else 1
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def counts(study, plan: Plan) -> dict:
    trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
    c = Counter(t.state.name for t in trials)
    settled = Counter(t.state.name for t in _settled(study, plan))
    return {"slots": plan.n_slots, "settled": sum(settled.values()), "complete": settled.get("COMPLETE", 0),
            "pruned": settled.get("PRUNED", 0), "failed": settled.get("FAIL", 0),
            "attempts": {k: v for k, v in sorted(c.items())},
            "retried": sum(1 for t in trials if "lmforge_retry_of" in t.user_attrs),
            "reused": sum(1 for t in trials if DUPLICATE_OF in t.user_attrs)}


def progress_line(study, plan: Plan, t0: float) -> str:
    c, best = counts(study, plan), _best(study, plan)
    elapsed = time.time() - t0
    eta = ""
    if 0 < c["settled"] < c["slots"]:
        eta = f", ETA {_fmt_s(elapsed / c['settled'] * (c['slots'] - c['settled']))}"
    if best and len(plan.metrics) == 1:
        b = f"best {plan.metrics[0]} {best[0].value:.5g} (trial {best[0].number})"
    elif best:
        b = f"{len(best)} Pareto-optimal trials"
    else:
        b = "no complete trial yet"
    return (f"[tune] {c['settled']}/{c['slots']} trials done ({c['complete']} complete, {c['pruned']} pruned, "
            f"{c['failed']} failed); {b}; {_fmt_s(elapsed)} elapsed{eta}")


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def steps_spent(t) -> int:
    """Training steps a trial used (its last reported step, else the run's summary; 0 when reused)."""
    if DUPLICATE_OF in t.user_attrs:
        return 0
    if t.intermediate_values:
        return int(max(t.intermediate_values))
    run = t.user_attrs.get("run_dir")
    if run and (Path(run) / "summary.json").is_file():
        return int(json.loads((Path(run) / "summary.json").read_text()).get("steps", 0))
    return 0


def _plots(study, plan: Plan, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as V

    out.mkdir(exist_ok=True)
    multi = len(plan.metrics) > 1
    target = None if not multi else (lambda t: t.values[0])
    makers = {"history": lambda: V.plot_optimization_history(study, target=target, target_name=plan.metrics[0]),
              "importances": lambda: V.plot_param_importances(study, target=target),
              "parallel_coordinates": lambda: V.plot_parallel_coordinate(study, target=target),
              "slice": lambda: V.plot_slice(study, target=target)}
    if multi:
        makers["pareto_front"] = lambda: V.plot_pareto_front(study, target_names=plan.metrics)
    paths = {}
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make()
                fig = plt.gcf()
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(out / f"{name}.png", dpi=90)
            paths[name] = out / f"{name}.png"
        except Exception:  # noqa: BLE001  (too few trials for this plot, e.g. importances need 2 complete)
            pass
        finally:
            plt.close("all")
    return paths


def _importances(study, plan: Plan) -> dict:
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = (lambda t: t.values[0]) if len(plan.metrics) > 1 else None
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study, target=target).items()}
    except Exception:  # noqa: BLE001  (fewer than two complete trials, or a single-valued space)
        return {}


def write_best_yaml(plan: Plan, trial) -> Path:
    """The best trial's config with its own run folder (``DIR/best_run``) and no resume: runs as is."""
    import yaml

    params = dict(trial.params)
    if plan.mode == "throughput":
        from lmforge.tune.throughput import candidate

        params = candidate(plan, params)
    cfg = plan.job().load(params, {"run_dir": str(plan.dir / "best_run"), "checkpoint.resume": None})
    path = plan.dir / "best.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def trial_rows(study, plan: Plan) -> list[dict]:
    rows = []
    for t in _settled(study, plan):
        rows.append({"number": t.number, "state": t.state.name, "values": t.values, "params": t.params,
                     "steps": steps_spent(t), "run_dir": t.user_attrs.get("run_dir"),
                     "cv_std": t.user_attrs.get("cv_std"), "retry_of": t.user_attrs.get("lmforge_retry_of"),
                     "fail_reason": t.user_attrs.get("fail_reason"), "reused_from": t.user_attrs.get(DUPLICATE_OF)})
    return rows


def write_report(study, plan: Plan) -> dict:
    out = plan.dir
    rows, best, c = trial_rows(study, plan), _best(study, plan), counts(study, plan)
    rep = {"study": plan.cfg.study_name(), "metrics": plan.metrics,
           "directions": [o.resolved_direction() for o in plan.cfg.all_objectives()], "counts": c,
           "steps_spent": sum(r["steps"] for r in rows), "importances": _importances(study, plan),
           "best": [{"number": t.number, "values": t.values, "params": t.params,
                     "run_dir": t.user_attrs.get("run_dir")} for t in best[:5]], "trials": rows}
    if best:
        rep["best_yaml"] = str(write_best_yaml(plan, best[0]))
        if plan.mode == "throughput":
            import shutil

            shutil.copyfile(rep["best_yaml"], out / "best_throughput.yaml")
            rep["best_throughput_yaml"] = str(out / "best_throughput.yaml")
    plots = _plots(study, plan, out / "plots") if rows else {}
    rep["plots"] = {k: str(v) for k, v in plots.items()}
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / "report.html").write_text(to_html(rep, plots))
    return rep


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}" if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return html.escape(str(v))


def to_html(rep: dict, plots: dict[str, Path]) -> str:
    e, c = html.escape, rep["counts"]
    head = (f"<p>{c['settled']} of {c['slots']} trials done: {c['complete']} complete, {c['pruned']} pruned, "
            f"{c['failed']} failed ({c['retried']} retries), {c['reused']} reused from an equal earlier trial; "
            f"{rep['steps_spent']} training steps spent. "
            f"Objective: {e(', '.join(f'{m} ({d})' for m, d in zip(rep['metrics'], rep['directions'])))}.</p>")
    best = "".join(f"<tr><td>{b['number']}</td><td>{_fmt(b['values'])}</td><td>{_fmt(b['params'])}</td>"
                   f"<td>{e(str(b['run_dir']))}</td></tr>" for b in rep["best"])
    imp = "".join(f"<tr><td>{e(k)}</td><td>{v:.3f}</td></tr>" for k, v in rep["importances"].items())
    rows = "".join(f"<tr><td>{r['number']}</td><td>{r['state']}</td><td>{_fmt(r['values'] or '')}</td>"
                   f"<td>{r['steps']}</td><td>{_fmt(r['params'])}</td></tr>" for r in rep["trials"])
    imgs = "".join(f"<h4>{e(k.replace('_', ' '))}</h4><img alt=\"{e(k)}\" src=\"data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}\"/>" for k, p in plots.items())
    body = (f"<section class=\"lmforge-report\"><h3>study {e(rep['study'])}</h3>{head}"
            f"<h4>best trials</h4><table><thead><tr><th>trial</th><th>value</th><th>params</th><th>run folder"
            f"</th></tr></thead><tbody>{best}</tbody></table><h4>parameter importances</h4><table><tbody>{imp}"
            f"</tbody></table>{imgs}<h4>all trials</h4><table><thead><tr><th>trial</th><th>state</th><th>value"
            f"</th><th>steps</th><th>params</th></tr></thead><tbody>{rows}</tbody></table></section>\n")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>study {e(rep['study'])}</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:left} img{max-width:100%}</style></head><body>" + body + "</body></html>\n")
