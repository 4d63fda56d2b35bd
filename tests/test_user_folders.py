"""The user's folders are theirs, and --resume means the same run.

* output_dir on a folder holding the user's own files, the filesystem root, the home folder or an
  empty path is refused, and nothing in it changes;
* a user error found while setting up (a missing model, an unknown LoRA target) leaves no folder
  behind, so the corrected command runs;
* --resume compares what defines the run (file contents, not paths; output_dir exempt), refuses
  a train.max_steps below the newest checkpoint, and never resumes without the saved config.yaml;
* a full disk while writing a checkpoint is named as such, and the previous checkpoint survives.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_train_e2e import BASE
from vfeedback.cli import main


def cfg_file(tmp_path, out, name="c.yaml", **over):
    c = json.loads(json.dumps(BASE))
    c["output_dir"] = str(out)
    c["train"]["max_steps"] = 2
    # the runs these tests finish only need to be real, not long: 3 sampling steps, one eval prompt
    c["sampling"]["steps"], c["refl"]["stop_range"], c["prompts"]["eval"] = 3, [1, 2], ["a red apple"]
    for k, v in over.items():
        d = c
        *head, last = k.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(c))
    return str(p)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def run_cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err


def users_folder(root: Path) -> Path:
    f = root / "my-project"
    (f / "lora").mkdir(parents=True)
    (f / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"my own lora")
    (f / "holiday.png").write_bytes(b"\x89PNG my photo")
    (f / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    return f


@pytest.mark.parametrize("cmd", [["train"], ["train", "--dry-run"], ["validate"]])
def test_folder_with_the_users_files_is_refused_and_untouched(tmp_path, capsys, cmd):
    f = users_folder(tmp_path)
    before = snapshot(f)
    rc, err = run_cli(capsys, [cmd[0], cfg_file(tmp_path, f), *cmd[1:]])
    assert rc == 2
    assert "is not empty" in err and "holds no vfeedback run" in err and "holiday.png" in err
    assert snapshot(f) == before
    # --resume is no way around it
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, f), "--resume"])
    assert rc == 2 and "holds no vfeedback run" in err
    assert snapshot(f) == before


def test_root_home_and_empty_paths_are_refused(tmp_path, capsys, monkeypatch):
    from vfeedback.models.tiny import cache_root

    monkeypatch.setenv("VFEEDBACK_CACHE", str(cache_root()))  # the tiny models stay where they are
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for out, words in [("/", "filesystem root"), (str(home), "home folder"), ("", "output_dir"), (".", "current folder"),
                       ("   ", "empty")]:
        for argv in (["validate"], ["train", "--dry-run"], ["train"]):
            rc, err = run_cli(capsys, [argv[0], cfg_file(tmp_path, out), *argv[1:]])
            assert rc == 2, (out, argv, err)
            assert words in err, (out, err)
    assert sorted(p.name for p in home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "home"]


def test_an_empty_folder_or_a_fresh_path_is_accepted_by_validate(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        rc, err = run_cli(capsys, ["validate", cfg_file(tmp_path, out)])
        assert rc == 0, err
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("over,words", [
    ({"model.path": "./no-such-model"}, ["model.path", "no-such-model"]),
    ({"model.lora.target_modules": ["to_q", "to_qq"]}, ["model.lora.target_modules", "to_qq"]),
    ({"train.mixed_precision": "fp16"}, ["fp16"]),
])
def test_a_user_error_in_setup_leaves_nothing_behind(tmp_path, capsys, over, words):
    out = tmp_path / "runs" / "r1"
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, out, **over)])
    assert rc == 2
    for w in words:
        assert w in err
    assert not (tmp_path / "runs").exists(), "a refused command left a folder behind"


def test_setup_error_after_the_folder_is_made_removes_only_what_it_made(tmp_path, capsys, monkeypatch):
    """An error raised after the run folder exists (here: the tracker start) removes the folders
    this command created, and leaves an existing empty folder in place; the corrected command
    then runs instead of meeting 'already holds a run'."""
    from vfeedback import engine
    from vfeedback.errors import UserError

    out = tmp_path / "empty-run"
    out.mkdir()
    calls = []

    def boom(self, *a, **k):
        calls.append(1)
        raise UserError("log.trackers: simulated refusal")

    monkeypatch.setattr(engine.Trainer, "_tracker_available", staticmethod(lambda name: True))
    monkeypatch.setattr("accelerate.Accelerator.init_trackers", boom)
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, out, **{"log.trackers": ["tensorboard"]})])
    assert rc == 2 and calls and "simulated refusal" in err
    assert out.is_dir() and list(out.iterdir()) == []  # the samples/ and checkpoints/ it made are gone
    monkeypatch.undo()
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, out, **{"train.max_steps": 1})])
    assert rc == 0, err
    assert (out / "lora").is_dir()


# ------------------------------------------------------------------ resume: the same run


@pytest.fixture()
def saved_run(tmp_path):
    """A run folder as `train` leaves it after a checkpoint at step 4 (config.yaml,
    fingerprint.json, checkpoints/step-000004/COMPLETE), made without training: the resume
    checks read only these."""
    from vfeedback.config import load_config
    from vfeedback.rundir import COMPLETE_MARKER, RunDir

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.txt").write_text("a red apple\na blue lake\n")
    out = tmp_path / "run"
    cfg_path = cfg_file(tmp_path, out, **{"prompts.train": str(tmp_path / "prompts" / "p.txt"), "train.max_steps": 6})
    cfg = load_config(cfg_path)
    rd = RunDir(out)
    rd.prepare(False)
    rd.write_config(cfg)
    (rd.checkpoints / "step-000004").mkdir()
    (rd.checkpoints / "step-000004" / COMPLETE_MARKER).write_text("")
    return tmp_path, out


def validate_resume(capsys, path, *extra):
    return run_cli(capsys, ["validate", path, "--resume", *extra])


def test_resume_accepts_the_same_run_reached_another_way(saved_run, capsys, monkeypatch):
    tmp_path, out = saved_run
    # the same prompt file by a relative path from another folder
    monkeypatch.chdir(tmp_path / "prompts")
    rc, err = validate_resume(capsys, cfg_file(tmp_path, out, "c2.yaml", **{"prompts.train": "p.txt", "train.max_steps": 6}))
    assert rc == 0, err
    # the prompt file copied elsewhere with a comment and a byte-order mark: the same prompts
    (tmp_path / "copy.txt").write_text("\ufeff# my prompts\na red apple\n\na blue lake\n", encoding="utf-8")
    rc, err = validate_resume(capsys, cfg_file(tmp_path, out, "c3.yaml", **{"prompts.train": str(tmp_path / "copy.txt"), "train.max_steps": 8}))
    assert rc == 0, err
    # the run folder moved: output_dir is not part of what defines the run
    moved = tmp_path / "moved-run"
    shutil.move(str(out), str(moved))
    rc, err = validate_resume(capsys, cfg_file(tmp_path, moved, "c4.yaml", **{"prompts.train": str(tmp_path / "prompts" / "p.txt"), "train.max_steps": 6}))
    assert rc == 0, err


def test_resume_refuses_edited_prompt_contents(saved_run, capsys):
    tmp_path, out = saved_run
    (tmp_path / "prompts" / "p.txt").write_text("a red apple\na green field\n")
    rc, err = validate_resume(capsys, cfg_file(tmp_path, out, "c2.yaml", **{"prompts.train": str(tmp_path / "prompts" / "p.txt"), "train.max_steps": 6}))
    assert rc == 2
    assert "prompts.train.prompts" in err and "cannot change mid-run" in err


def test_resume_refuses_max_steps_below_the_checkpoint(saved_run, capsys):
    tmp_path, out = saved_run
    p = cfg_file(tmp_path, out, "c2.yaml", **{"prompts.train": str(tmp_path / "prompts" / "p.txt"), "train.max_steps": 6})
    rc, err = validate_resume(capsys, p, "train.max_steps=3")
    assert rc == 2 and "train.max_steps=3" in err and "step 4" in err
    rc, err = run_cli(capsys, ["train", p, "--resume", "--dry-run", "train.max_steps=3"])
    assert rc == 2 and "step 4" in err
    rc, err = validate_resume(capsys, p, "train.max_steps=4")
    assert rc == 0, err


@pytest.mark.parametrize("damage,words", [
    (lambda cfg: cfg.unlink(), ["config.yaml is missing"]),
    (lambda cfg: cfg.write_text("algorithm: [refl\n"), ["config.yaml is unreadable"]),
    (lambda cfg: cfg.write_text("- just\n- a list\n"), ["not a config mapping"]),
])
def test_resume_never_without_the_saved_config(saved_run, capsys, damage, words):
    tmp_path, out = saved_run
    damage(out / "config.yaml")
    before = snapshot(out)
    p = cfg_file(tmp_path, out, "c2.yaml", **{"prompts.train": str(tmp_path / "prompts" / "p.txt"), "train.max_steps": 6})
    for argv in (["validate", p, "--resume"], ["train", p, "--resume"]):
        rc, err = run_cli(capsys, argv)
        assert rc == 2
        for w in words:
            assert w in err
    assert snapshot(out) == before


def test_disk_full_while_checkpointing_is_named_and_the_previous_checkpoint_survives(tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint's trainable weights
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "run"
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, out, **{"log.checkpoint_every": 1, "train.max_steps": 2})])
    assert rc == 1
    assert "disk full" in err and str(out / "checkpoints") in err and "step-000001" in err and "--resume" in err
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == ["step-000001"]  # the whole one stays; the half-written one is gone
    monkeypatch.undo()
    rc, err = run_cli(capsys, ["train", cfg_file(tmp_path, out, **{"log.checkpoint_every": 1, "train.max_steps": 2}), "--resume"])
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_fingerprint_of_a_data_folder_is_its_contents_not_its_path(tmp_path):
    """refl.pretrain.data as a folder: the same files elsewhere fingerprint alike; an edited,
    added or renamed file does not."""
    from vfeedback.config import load_config
    from vfeedback.rundir import fingerprint

    def fp(folder):
        cfg = load_config(cfg_file(tmp_path, tmp_path / "run", f"c-{folder.name}.yaml", **{"refl.pretrain.data": str(folder)}))
        return fingerprint(cfg)["refl.pretrain.data.contents"]

    a = tmp_path / "data-a"
    (a / "sub").mkdir(parents=True)
    (a / "x.png").write_bytes(b"\x89PNG one")
    (a / "sub" / "x.txt").write_text("a red apple")
    b = tmp_path / "data-b"
    shutil.copytree(a, b)
    assert fp(a) == fp(b) and fp(a).startswith("sha256:")
    (b / "sub" / "x.txt").write_text("a red apple!")
    edited = fp(b)
    assert edited != fp(a)
    (b / "sub" / "x.txt").write_text("a red apple")
    assert fp(b) == fp(a)
    (b / "sub" / "x.txt").rename(b / "sub" / "y.txt")
    assert fp(b) != fp(a)
    (b / "sub" / "y.txt").rename(b / "sub" / "x.txt")
    (b / "extra.txt").write_text("")
    assert fp(b) != fp(a)
