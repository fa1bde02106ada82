"""TEMPORARY: the CheckpointManager interface over the pre-refactor checkpoint modules, so the new loop can be
tested before ``lmforge.checkpoint`` lands. Deleted when the trainer switches to the package."""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.training import checkpoint as ckpt


class BridgeManager:
    def __init__(self, run_dir, *, model, optimizer, shared: dict, per_rank: dict, pdims, keep_last=2, keep_best=0,
                 best_metric="val_loss", best_mode="min", engine=None):
        self.engine = engine
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.shared, self.per_rank, self.pdims = shared, per_rank, pdims
        self.keep = dict(keep_last=keep_last, keep_best=keep_best, best_metric=best_metric, best_mode=best_mode)
        self.last_saved = None

    def _sd(self, objs: dict) -> dict:
        return {k: (v.state_dict() if v is not None else None) for k, v in objs.items()}

    def save(self, step: int, metrics: dict | None = None) -> Path:
        shared, own = self._sd(self.shared), self._sd(self.per_rank)
        if self.engine is not None:
            return self._save_ds(step, shared, own)
        if self.pdims.is_distributed:
            from lmforge.training.checkpoint_sharded import save_sharded

            self.last_saved = save_sharded(self.run_dir, step, self.model, self.optimizer, shared, own, self.pdims,
                                           metrics=metrics, **self.keep)
        else:
            state = {"optimizer": self.optimizer.state_dict(), **shared, **own}
            self.last_saved = ckpt.save_checkpoint(self.run_dir, step, self.model, state, metrics=metrics, **self.keep)
        return self.last_saved

    def _save_ds(self, step, shared, own) -> Path:
        import os
        import shutil

        import torch
        import torch.distributed as dist

        final = ckpt.step_dir(self.run_dir, step)
        tmp = final.parent / f"{final.name}.tmp"
        if self.pdims.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(tmp)
        torch.save(own, tmp / f"rank_{self.pdims.rank:05d}.pt")
        if self.pdims.rank == 0:
            torch.save(shared, tmp / "trainer.pt")
        dist.barrier()
        if self.pdims.rank == 0:
            (tmp / ckpt.MARKER).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        dist.barrier()
        self.last_saved = final
        return final

    def _load_ds(self, spec):
        import torch

        path = ckpt.find_latest(self.run_dir) if spec == "auto" else Path(spec)
        if path is None:
            return None
        self.engine.load_checkpoint(path)
        state = {**torch.load(path / "trainer.pt", weights_only=False),
                 **torch.load(path / f"rank_{self.pdims.rank:05d}.pt", weights_only=False)}
        self._restore(state)
        return path

    def load(self, spec):
        if not spec:
            return None
        if self.engine is not None:
            return self._load_ds(spec)
        path = None if spec == "auto" else Path(spec)
        if path is not None and not path.is_dir():
            raise ConfigError(f"checkpoint.resume={spec}: no such checkpoint folder")
        from lmforge.training import checkpoint_sharded as shard

        master = self.shared.get("master")
        if not self.pdims.is_distributed and (path is None or not _is_dcp(path)):
            newest = ckpt.find_latest(self.run_dir) if path is None else None
            if newest is None or not _is_dcp(newest):
                if path is None:
                    path, state = ckpt.load_latest(self.run_dir, self.model)
                    if path is None:
                        return None
                else:
                    state = ckpt.load_checkpoint(path, self.model)
                self.optimizer.load_state_dict(state["optimizer"])
                self._restore(state)
                return path
        if path is None:
            path, state = shard.load_latest_any(self.run_dir, self.model, self.optimizer, master)
            if path is None:
                return None
        else:
            state = shard.load_any(path, self.model, self.optimizer, master)
        self._restore(state)
        return path

    def _restore(self, state: dict) -> None:
        for k, obj in {**self.shared, **self.per_rank}.items():
            if obj is not None and state.get(k) is not None:
                if k == "rng":
                    ckpt.set_rng_state(state[k])
                else:
                    obj.load_state_dict(state[k])


class RNG:
    def state_dict(self):
        return ckpt.rng_state()

    def load_state_dict(self, sd):
        ckpt.set_rng_state(sd)


def _is_dcp(path: Path) -> bool:
    try:
        return ckpt.read_manifest(path).get("format") == "dcp"
    except ckpt.CheckpointError:
        return False
