"""Where a study lives, and the samplers and pruners it is built with.

Storage (``storage:`` in study.yaml):
  None                     ``DIR/study.journal``: Optuna's journal file (``JournalFileBackend``), safe for any
                           number of processes on one machine
  a path / journal:///p    a journal file elsewhere, e.g. on a filesystem every machine mounts (NFS): the
                           multi-machine setup that needs no database
  postgresql:// mysql://   an RDB (Optuna's ``RDBStorage``): many machines
  sqlite:///file           one worker only: SQLite serialises writers with a file lock, and under parallel
                           trials writers time out with "database is locked" (optuna #820; Optuna's FAQ
                           advises against it), so it is refused for --workers > 1
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lmforge.errors import ConfigError, SetupError
from lmforge.tune.config import StudyConfig

JOURNAL = "study.journal"


def storage_url(cfg: StudyConfig) -> str:
    s = cfg.storage
    if s is None:
        return "journal://" + str((Path(cfg.dir) / JOURNAL).resolve())
    if "://" not in s:
        return "journal://" + str(Path(s).resolve())
    return s


def check_storage(url: str, workers: int, default: bool = False) -> None:
    """Refuse what cannot work before anything is written (SQLite with parallel workers, an RDB that does
    not answer, a journal folder that does not exist)."""
    if url.startswith("sqlite"):
        if workers > 1:
            raise ConfigError(
                f"storage {url}: SQLite cannot hold a study with --workers {workers}: it lets one writer in at a "
                "time, and parallel trials reporting their evaluations fail with 'database is locked' (optuna "
                "#820, Optuna's FAQ)", hint="drop storage: (a journal file in the study folder), or use a "
                "journal file on a shared filesystem or postgresql:// / mysql:// for several machines")
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:" and not Path(db).resolve().parent.is_dir():
            raise ConfigError(f"storage {url}: folder {Path(db).resolve().parent} does not exist")
        return
    if url.startswith("journal://"):
        parent = Path(url[len("journal://"):]).parent
        if not default and not parent.is_dir():  # the study folder itself is made once the study is valid
            raise ConfigError(f"storage {url}: folder {parent} does not exist",
                              hint="create it (a shared mount for several machines) or drop storage:")
        return
    try:
        import sqlalchemy
    except ImportError:
        raise SetupError(f"storage {url}: an RDB URL needs sqlalchemy (pip install 'lmforge[tune]')") from None
    try:
        engine = sqlalchemy.create_engine(url, connect_args=_timeout_args(url))
        with engine.connect():
            pass
    except Exception as e:  # noqa: BLE001  (any driver's connection error is the user's to fix)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"storage {url}: cannot connect ({type(e).__name__}: {msg})",
                          hint="check the host, port, credentials and that the database exists") from None


def _timeout_args(url: str) -> dict:
    if url.startswith(("postgresql", "mysql")):
        return {"connect_timeout": 5}
    return {}


def open_storage(url: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url.startswith("journal://"):
        path = url[len("journal://"):]
        return optuna.storages.JournalStorage(JournalFileBackend(path, JournalFileOpenLock(path, grace_period=10)))
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def inner_sampler_factory(cfg: StudyConfig, space, n_objectives: int):
    """seed → a fresh sampler of the configured kind (see ``ordered.SlotSampler``)."""
    import optuna.samplers as S

    sc, name = cfg.sampler, cfg.sampler.name
    if name == "grid":
        grid = space.grid()  # one shuffle for every slot (the study's seed): slot k takes grid point k
        return lambda _slot_seed: S.GridSampler(grid, seed=cfg.seed)
    if name == "random":
        return lambda seed: S.RandomSampler(seed=seed)
    if name == "tpe":
        return lambda seed: S.TPESampler(seed=seed, n_startup_trials=sc.n_startup_trials,
                                         multivariate=sc.multivariate and n_objectives == 1)
    if name == "cmaes":
        if n_objectives > 1:
            raise ConfigError("sampler cmaes is single-objective; use nsga2 or tpe for objectives:")
        return lambda seed: S.CmaEsSampler(seed=seed, n_startup_trials=sc.n_startup_trials)
    if name == "gp":
        return lambda seed: S.GPSampler(seed=seed, n_startup_trials=sc.n_startup_trials)
    return lambda seed: S.NSGAIISampler(seed=seed, population_size=sc.population_size)


def make_pruner(cfg: StudyConfig, max_steps: Optional[int]):
    import optuna.pruners as P

    pc = cfg.pruner
    if pc.name == "none":
        return P.NopPruner()
    if len(cfg.all_objectives()) > 1:
        raise ConfigError(f"pruner {pc.name}: pruning needs a single objective (Optuna cannot prune "
                          "multi-objective trials); set pruner: {name: none}")
    if pc.name == "median":
        return P.MedianPruner(n_startup_trials=pc.n_startup_trials, n_warmup_steps=pc.n_warmup_steps)
    if pc.name in ("sha", "asha"):  # asynchronous successive halving: Optuna's SuccessiveHalvingPruner is ASHA
        return P.SuccessiveHalvingPruner(min_resource=pc.min_resource, reduction_factor=pc.reduction_factor)
    return P.HyperbandPruner(min_resource=pc.min_resource, max_resource=pc.max_resource or max_steps or "auto",
                             reduction_factor=pc.reduction_factor)


def directions(cfg: StudyConfig) -> list[str]:
    return [o.resolved_direction() for o in cfg.all_objectives()]


def build_study(cfg: StudyConfig, url: str, space, lag: int, n_slots: int, max_steps: Optional[int],
                create: bool = True, wait_note=None, on_trial=None):
    """The study with the deterministic slot sampler and pruner (``ordered.py``) around the configured ones."""
    import optuna

    from lmforge.tune.ordered import OrderedPruner, SlotSampler

    dirs = directions(cfg)
    make = inner_sampler_factory(cfg, space, len(dirs))
    sampler = SlotSampler(make, cfg.seed, lag, cfg.deterministic, n_slots, wait_note=wait_note,
                          on_trial=on_trial)
    pruner = OrderedPruner(make_pruner(cfg, max_steps), lag, cfg.deterministic)
    storage = open_storage(url)
    if create:
        return optuna.create_study(storage=storage, study_name=cfg.study_name(), directions=dirs, sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    return optuna.load_study(study_name=cfg.study_name(), storage=storage, sampler=sampler, pruner=pruner)
