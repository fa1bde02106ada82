"""``lmforge checkpoint list|move-aside`` and the messages of the one fallback policy: every checkpoint folder
listed with its verification status; on request, exactly the unusable ones (and leftovers of dead writers)
moved into ``checkpoints/unusable/`` with a note each, never deleted, never overwritten, never read again;
"falling back" said only when an older checkpoint remains."""

import os
import shutil

import pytest
import torch

from lmforge.checkpoint import CheckpointError, complete_folders, full_weights, newest_valid, resolve_source
from lmforge.checkpoint.folder import ASIDE
from lmforge.cli import main
from tests.helpers.bad_inputs import QUIET, TINY_MODEL, assert_user_error, copy_of, packed_data, run_cli, snapshot

torch.set_num_threads(1)
DEAD_PID = 2 ** 31 - 1  # above any pid_max: never a running process
STEPS = ("step_0000001", "step_0000002", "step_0000003")


def _corrupt(path):
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 1
    path.write_bytes(bytes(raw))


def _weights(ckpt):
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".distcp"))[0]


def _train(tmp_path_factory, run, *args):
    """The exit code of ``lmforge train`` on the tiny packed data."""
    return main(["train", f"--data.path={packed_data(tmp_path_factory)}", f"--run_dir={run}", *TINY_MODEL, *QUIET,
                 "--training.micro_batch_size=2", "--training.eval_every=0", "--scheduler.warmup_steps=0", *args])


@pytest.fixture(scope="module")
def three_ckpts(tmp_path_factory):
    """A run with checkpoints at steps 1, 2 and 3 (copy before changing)."""
    run = tmp_path_factory.mktemp("ckpt_cli") / "run"
    assert _train(tmp_path_factory, run, "--training.max_steps=3", "--checkpoint.every_steps=1",
                  "--checkpoint.keep_last=3") == 0
    return run


def _broken(three_ckpts, tmp_path):
    """step 1 good, step 2 corrupted, step 3 without COMPLETE, a leftover of a dead and of a live writer."""
    run = copy_of(three_ckpts, tmp_path / "run")
    ck = run / "checkpoints"
    _corrupt(_weights(ck / "step_0000002"))
    (ck / "step_0000003" / "COMPLETE").unlink()
    for pid in (DEAD_PID, os.getpid()):
        shutil.copytree(ck / "step_0000001", ck / f"step_0000004.tmp-{pid}")
    return run


def test_list_names_each_folder_and_why_and_changes_nothing(three_ckpts, tmp_path, capsys):
    run = _broken(three_ckpts, tmp_path)
    before = snapshot(run)
    code, err, out = run_cli(capsys, "checkpoint", "list", run)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert out.splitlines()[0].endswith("3 checkpoint(s), 1 verify; 2 leftover(s) of unfinished saves")
    assert rows["step_0000001"].split()[1:] == ["OK"]
    assert "FAIL  __0_0.distcp: sha256 differs from manifest.json (corrupted)" in rows["step_0000002"]
    assert "FAIL  no COMPLETE marker" in rows["step_0000003"]
    assert "LEFTOVER" in rows[f"step_0000004.tmp-{DEAD_PID}"] and "no longer running" in out
    assert "still running on this machine" in rows[f"step_0000004.tmp-{os.getpid()}"]
    assert "readers use step_0000001" in out
    assert f"3 folder(s) cannot be used: `lmforge checkpoint move-aside {run}`" in out
    assert snapshot(run) == before


def test_move_aside_moves_exactly_the_unusable_ones_with_a_note_each(three_ckpts, tmp_path, capsys):
    run = _broken(three_ckpts, tmp_path)
    ck, moved = run / "checkpoints", ["step_0000002", "step_0000003", f"step_0000004.tmp-{DEAD_PID}"]
    before = {p.name: snapshot(p) for p in ck.iterdir()}
    code, err, out = run_cli(capsys, "checkpoint", "move-aside", run)
    assert code == 0, err
    aside = ck / ASIDE
    assert sorted(p.name for p in ck.iterdir()) == sorted(["step_0000001", f"step_0000004.tmp-{os.getpid()}", ASIDE])
    assert sorted(p.name for p in aside.iterdir()) == sorted(moved + [f"{m}.NOTE.txt" for m in moved])
    for name in moved:
        assert snapshot(aside / name) == before[name]  # moved whole: every file, size and mtime as it was
        note = (aside / f"{name}.NOTE.txt").read_text()
        assert "moved aside by `lmforge checkpoint move-aside` at 20" in note
        assert f"original path: {(ck / name).resolve()}\n" in note and "reason: " in note
        assert f"moved {name} → {aside / name} (note: {name}.NOTE.txt)" in out
    assert "sha256 differs from manifest.json" in (aside / "step_0000002.NOTE.txt").read_text()
    assert "no COMPLETE marker" in (aside / "step_0000003.NOTE.txt").read_text()
    assert f"left in place: step_0000004.tmp-{os.getpid()}" in out and "readers use step_0000001" in out
    assert snapshot(ck / "step_0000001") == before["step_0000001"]
    assert resolve_source(run) == ck / "step_0000001" and full_weights(run)  # the good one still loads


def test_move_aside_with_nothing_unusable_says_so(three_ckpts, tmp_path, capsys):
    run = copy_of(three_ckpts, tmp_path / "run")
    before = snapshot(run)
    code, err, out = run_cli(capsys, "checkpoint", "move-aside", run)
    assert code == 0, err
    assert f"nothing to move aside in {run / 'checkpoints'}: every checkpoint in it verifies" in out
    assert snapshot(run) == before and not (run / "checkpoints" / ASIDE).exists()


def test_a_second_move_aside_never_overwrites_an_earlier_one(three_ckpts, tmp_path, capsys):
    run = copy_of(three_ckpts, tmp_path / "run")
    ck = run / "checkpoints"
    _corrupt(_weights(ck / "step_0000003"))
    assert run_cli(capsys, "checkpoint", "move-aside", run)[0] == 0
    first = snapshot(ck / ASIDE)
    shutil.copytree(three_ckpts / "checkpoints" / "step_0000003", ck / "step_0000003")
    (ck / "step_0000003" / "COMPLETE").unlink()  # a second failure under the same name
    (ck / ASIDE / "step_0000003.2.NOTE.txt").write_text("someone's own note")  # a taken name is skipped too
    code, err, out = run_cli(capsys, "checkpoint", "move-aside", run)
    assert code == 0, err
    after = snapshot(ck / ASIDE)
    assert {k: v for k, v in after.items() if k in first} == first
    assert (ck / ASIDE / "step_0000003.2.NOTE.txt").read_text() == "someone's own note"
    assert (ck / ASIDE / "step_0000003.3" / "manifest.json").is_file()
    assert "no COMPLETE marker" in (ck / ASIDE / "step_0000003.3.NOTE.txt").read_text()
    assert f"moved step_0000003 → {ck / ASIDE / 'step_0000003.3'}" in out
    assert resolve_source(run) == ck / "step_0000002"


def test_readers_never_use_the_aside_folder_and_a_fresh_start_follows_only_the_move(three_ckpts, tmp_path_factory,
                                                                                    tmp_path, capsys):
    run = copy_of(three_ckpts, tmp_path / "run")
    ck = run / "checkpoints"
    for step in STEPS:
        _corrupt(_weights(ck / step))
    assert _train(tmp_path_factory, run, "--training.max_steps=4", "--resume", "auto") == 2  # stops first
    assert f"`lmforge checkpoint move-aside {run}`" in capsys.readouterr().err
    assert run_cli(capsys, "checkpoint", "move-aside", run)[0] == 0
    shutil.copytree(three_ckpts / "checkpoints" / "step_0000003", ck / ASIDE / "step_0000009")  # it would verify
    aside = snapshot(ck / ASIDE)
    assert complete_folders(run) == [] and newest_valid(run) is None
    assert "moved aside by `lmforge checkpoint move-aside`" in capsys.readouterr().err  # newest_valid's note
    for command, args in (("generate", ["--run", run, "--prompt", "the"]), ("hf export", [run, tmp_path / "out"]),
                          ("checkpoint consolidate", [run, "--out", tmp_path / "c.safetensors"])):
        code, err, _ = run_cli(capsys, *command.split(), *args)
        assert_user_error(code, err, command, "no checkpoint in")
    code, err, out = run_cli(capsys, "checkpoint", "list", run)
    assert code == 0 and "0 checkpoint(s), 0 verify" in out and f"{ASIDE}/: 4 folder(s) moved aside earlier" in out
    assert _train(tmp_path_factory, run, "--training.max_steps=1", "--checkpoint.every_steps=1", "--resume",
                  "auto") == 0  # the user moved them aside: the run starts over beside them
    assert "are never read" in capsys.readouterr().err
    assert [p.name for p in complete_folders(run)] == ["step_0000001"] and newest_valid(run) == ck / "step_0000001"
    assert snapshot(ck / ASIDE) == aside


def test_falling_back_is_said_only_when_an_older_checkpoint_remains(three_ckpts, tmp_path, capsys):
    run = copy_of(three_ckpts, tmp_path / "run")
    ck = run / "checkpoints"
    for step in STEPS:
        _corrupt(_weights(ck / step))
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints") as e:
        newest_valid(run)
    err = capsys.readouterr().err
    assert err.count("; falling back to an older one") == 2
    assert "skipping checkpoint step_0000003" in err and "skipping checkpoint step_0000002" in err
    assert "step_0000001" not in err  # the oldest: only the error names it, with no promise of a fallback
    assert "step_0000001/__0_0.distcp: sha256 differs" in str(e.value)
    assert f"lmforge checkpoint move-aside {run}" in e.value.hint
    for step in STEPS[1:]:
        shutil.rmtree(ck / step)
    code, err, _ = run_cli(capsys, "generate", "--run", run, "--prompt", "the")  # the only checkpoint is corrupt
    assert_user_error(code, err, "generate", "none of the 1 checkpoints", "step_0000001")
    assert "falling back" not in err and "warning" not in err and "checkpoint move-aside" in err


@pytest.mark.parametrize("command", ["list", "move-aside"])
@pytest.mark.parametrize("target,needle", [
    ("missing", "missing: does not exist"),
    ("empty", "empty: no checkpoints folder (is it a run folder"),
    ("a-checkpoint", "step_0000001: a checkpoint folder, not a run folder"),
])
def test_not_a_run_folder_is_one_error(three_ckpts, tmp_path, capsys, command, target, needle):
    path = {"missing": tmp_path / "missing", "empty": tmp_path / "empty",
            "a-checkpoint": three_ckpts / "checkpoints" / "step_0000001"}[target]
    (tmp_path / "empty").mkdir()
    before = snapshot(three_ckpts)
    code, err, _ = run_cli(capsys, "checkpoint", command, path)
    assert_user_error(code, err, f"checkpoint {command}", needle)
    assert snapshot(three_ckpts) == before


def test_a_resume_that_saves_over_a_corrupt_step_sets_it_aside(three_ckpts, tmp_path, tmp_path_factory):
    """Resume falls back past a corrupt step 3 to step 2; reaching step 3 again saves a new step_0000003 and
    the corrupt one goes to unusable/ with a note (the evidence is kept, not replaced)."""
    run = copy_of(three_ckpts, tmp_path / "run")
    bad = _weights(run / "checkpoints" / "step_0000003")
    _corrupt(bad)
    corrupt_bytes = bad.read_bytes()
    assert _train(tmp_path_factory, run, "--training.max_steps=3", "--checkpoint.every_steps=1",
                  "--checkpoint.keep_last=3", "--resume=auto") == 0
    assert newest_valid(run).name == "step_0000003"  # the new one verifies
    aside = run / "checkpoints" / ASIDE
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000003", "step_0000003.NOTE.txt"]
    kept = aside / "step_0000003" / bad.relative_to(run / "checkpoints" / "step_0000003")
    assert kept.read_bytes() == corrupt_bytes
    note = (aside / "step_0000003.NOTE.txt").read_text()
    assert "a save of the same step" in note and "sha256" in note


@pytest.mark.parametrize("pid", [DEAD_PID, os.getpid()])  # a live (or reused) PID proves nothing
def test_a_swapped_out_only_copy_is_put_back_never_deleted(three_ckpts, tmp_path, capsys, pid):
    """A crash between the two renames of a re-save leaves step_N.old-PID and no step_N. `list` says so and
    changes nothing; resume (newest_valid), prune and move-aside put it back; where a new step_N exists the
    old copy is an ordinary leftover."""
    from lmforge.checkpoint.folder import prune

    run = copy_of(three_ckpts, tmp_path / "run")
    ck = run / "checkpoints"
    os.rename(ck / "step_0000003", ck / f"step_0000003.old-{pid}")
    before = snapshot(run)
    assert main(["checkpoint", "list", str(run)]) == 0
    assert "the only copy of step_0000003" in capsys.readouterr().out and snapshot(run) == before
    assert newest_valid(run).name == "step_0000003"  # a resume finds it again
    os.rename(ck / "step_0000003", ck / f"step_0000003.old-{pid}")
    shutil.copytree(ck / "step_0000002", ck / f"step_0000002.old-{DEAD_PID}")  # step_0000002 itself still there
    prune(run, keep_last=3)
    assert sorted(p.name for p in ck.iterdir()) == list(STEPS)
    os.rename(ck / "step_0000003", ck / f"step_0000003.old-{pid}")
    assert main(["checkpoint", "move-aside", str(run)]) == 0
    assert sorted(p.name for p in ck.iterdir()) == list(STEPS) and newest_valid(run).name == "step_0000003"
