"""Damaged checkpoints: a checksum per state file, verified on load, the previous checkpoint
as a fallback, damaged or half-written files named, a full disk said in words."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path

import pytest
from conftest import only_run

SMALL = ["train.epochs=1", "scenario.n_experiences=3", "eval.save_predictions=false"]
FINAL = ("acc/avg_seen", "acc/avg_all", "forgetting/avg", "bwt")


def sha256(path) -> str:   # the reference: hashlib over the whole file at once
    return hashlib.sha256(path.read_bytes()).hexdigest()


def two_checkpoints(tmp_path):
    """A run folder after two saves: state.pt holds `second`, state.prev.pt `first` (80 KB each,
    so an 8 KB block fits inside)."""
    import torch

    from lethe.platform.checkpoint import Checkpointer

    first, second = {"w": torch.arange(20_000.0), "next": 1}, {"w": -torch.arange(20_000.0), "next": 2}
    ck = Checkpointer(tmp_path, "run1")
    ck.save(first, {"run_id": "run1", "finished": False})
    ck.save(second, {"run_id": "run1", "finished": False})
    return ck.dir, first, second


def zero_block(path, offset: int = 4096, size: int = 8192) -> None:
    """8 KB of zeros inside the file, its size kept (what a bad disk sector does)."""
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes(size)
    path.write_bytes(bytes(data))


def fresh_load(folder):
    from lethe.platform.checkpoint import Checkpointer

    return Checkpointer(folder.parent, folder.name).load()


def test_each_save_records_the_checksums_of_the_newest_and_the_previous_state(tmp_path):
    import torch

    folder, first, second = two_checkpoints(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["checksums"] == {"state.pt": sha256(folder / "state.pt"),
                                 "state.prev.pt": sha256(folder / "state.prev.pt")}
    prev = torch.load(folder / "state.prev.pt", weights_only=True)
    assert torch.equal(prev["w"], first["w"])
    assert not list(folder.glob("*.tmp"))


def test_a_zeroed_block_in_state_pt_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    import torch

    folder, first, _ = two_checkpoints(tmp_path)
    size = (folder / "state.pt").stat().st_size
    zero_block(folder / "state.pt")
    assert (folder / "state.pt").stat().st_size == size
    with caplog.at_level(logging.WARNING, logger="lethe"):
        state = fresh_load(folder)
    assert torch.equal(state["w"], first["w"]) and state["next"] == 1
    warning = caplog.text
    assert f"{folder / 'state.pt'} is damaged: its SHA-256 does not match" in warning
    assert f"resuming from the previous checkpoint {folder / 'state.prev.pt'} (experience 1)" in warning


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(p.read_bytes()[:5000]), "is damaged: its SHA-256 does not match"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (zero_block, "is damaged: its SHA-256 does not match"),
])
def test_a_damaged_only_checkpoint_is_refused_naming_the_file(tmp_path, damage, expected):
    import torch

    from lethe.errors import ConfigError
    from lethe.platform.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path, "run1")
    ck.save({"w": torch.ones(20_000), "next": 1}, {"run_id": "run1"})
    damage(ck.state_path)
    with pytest.raises(ConfigError) as info:
        fresh_load(ck.dir)
    msg = str(info.value)
    assert f"cannot resume from {ck.dir}: state.pt {expected}" in msg
    assert "state.prev.pt is missing" in msg and "start it again without --resume" in msg


def test_both_state_files_damaged_is_refused(tmp_path):
    from lethe.errors import ConfigError

    folder, _, _ = two_checkpoints(tmp_path)
    zero_block(folder / "state.pt")
    (folder / "state.prev.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"state.pt is damaged: .*, and state.prev.pt is empty \(0 bytes\)"):
        fresh_load(folder)


def test_a_truncated_checkpoint_without_recorded_checksums_is_named(tmp_path):
    """Checkpoints written before checksums load unverified; torch's own error ("failed finding
    central directory") is wrapped with the file's path."""
    import torch

    from lethe.errors import ConfigError

    folder = tmp_path / "old_run"
    folder.mkdir()
    torch.save({"w": torch.ones(20_000), "next": 1}, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps({"run_id": "old_run", "finished": False}))
    (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:5000])
    with pytest.raises(ConfigError, match=f"checkpoint {folder / 'state.pt'} cannot be read, it is damaged"):
        fresh_load(folder)


def test_a_half_written_meta_json_of_another_run_does_not_block_resume(tmp_path, caplog):
    import os

    from lethe.errors import ConfigError
    from lethe.platform.checkpoint import find_resumable

    good, broken = tmp_path / "good", tmp_path / "broken"
    for folder in (good, broken):
        folder.mkdir()
    (good / "meta.json").write_text(json.dumps({"finished": False, "config_hash": "h1"}))
    (broken / "meta.json").write_text('{"finished": false, "config_ha')   # cut mid-write
    os.utime(good / "meta.json", (1, 1))   # the broken one is the newest
    with caplog.at_level(logging.WARNING, logger="lethe"):
        assert find_resumable(tmp_path, None, "h1") == good
    assert f"cannot read {broken / 'meta.json'}: it is damaged or half-written" in caplog.text
    with pytest.raises(ConfigError, match=f"cannot read {broken / 'meta.json'}"):
        find_resumable(tmp_path, "broken", "h1")   # asked for by id: refused, named


def test_a_full_disk_is_said_in_words_and_leaves_no_temp_file(tmp_path):
    from lethe.errors import RunError
    from lethe.platform.checkpoint import _atomic_write

    target = tmp_path / "state.pt"
    target.write_bytes(b"previous checkpoint")

    def write_until_full(tmp):   # what a full disk does: part of the file, then ENOSPC
        tmp.write_bytes(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError) as info:
        _atomic_write(target, write_until_full)
    assert str(info.value).startswith(f"the disk is full: could not write state.pt in {tmp_path} "
                                      f"(the previous one is intact)")
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")


def fill_disk_at(path) -> None:
    """Make the next write of ``path`` hit a full disk, for real: a symlink to /dev/full, which
    the kernel answers with ENOSPC (what a full disk does mid-write)."""
    path.symlink_to("/dev/full")


@needs_dev_full
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """torch.save onto a full disk used to say "unexpected pos 44224 vs 44112" and leave
    state.pt.tmp behind."""
    import torch

    from lethe.errors import RunError
    from lethe.platform.checkpoint import Checkpointer

    folder, _, second = two_checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    ck = Checkpointer(folder.parent, folder.name)
    ck.load()   # as a resumed run does: it knows its state files are good
    fill_disk_at(folder / "state.pt.tmp")
    with pytest.raises(RunError) as info:
        ck.save({"w": torch.zeros(20_000), "next": 3}, {"run_id": "run1", "finished": False})
    assert str(info.value).startswith(f"the disk is full: could not write state.pt in {folder} "
                                      f"(the previous one is intact)")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before   # nothing touched, no .tmp
    assert torch.equal(fresh_load(folder)["w"], second["w"])


@needs_dev_full
def test_a_full_disk_at_start_fails_the_run_and_leaves_no_temp_file(tmp_path, store, capsys,
                                                                    monkeypatch):
    """The run's config.yaml is its first file: a full disk there used to exit 1 leaving the run
    RUNNING and a 0-byte config.yaml.tmp."""
    from lethe.platform import checkpoint
    from lethe.platform.cli import main

    write_config = checkpoint.Checkpointer.write_config

    def on_a_full_disk(self, text):   # the run folder exists now; its disk is full
        fill_disk_at(self.dir / "config.yaml.tmp")
        write_config(self, text)

    monkeypatch.setattr(checkpoint.Checkpointer, "write_config", on_a_full_disk)
    assert main(["run", "split_digits", *store["overrides"], *SMALL]) == 1
    err = capsys.readouterr().err
    _, run = only_run(store["uri"])
    folder = tmp_path / "runs" / run.info.run_id
    assert f"lethe: run failed: the disk is full: could not write config.yaml in {folder}" in err
    assert run.info.status == "FAILED"
    assert not (folder / "config.yaml.tmp").exists() and not (folder / "config.yaml").exists()


def test_other_write_errors_also_leave_no_temp_file(tmp_path):
    from lethe.platform.checkpoint import _atomic_write

    def broken(tmp):
        tmp.write_text("partial")
        raise ValueError("serialiser bug")

    with pytest.raises(ValueError, match="serialiser bug"):
        _atomic_write(tmp_path / "config.yaml", broken)
    assert list(tmp_path.iterdir()) == []


# --- through the CLI: a damaged newest checkpoint, resumed from the one before -------------------
def _finals(uri):
    client, run = only_run(uri)
    return run, {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                        key=lambda m: (m.step, m.timestamp))][-1]
                 for k in FINAL}


@pytest.mark.integration
def test_resume_after_a_damaged_checkpoint_uses_the_previous_one_and_matches(tmp_path, capsys,
                                                                            monkeypatch, caplog):
    """Run B is interrupted right after its second checkpoint (Ctrl-C), its state.pt gets 8 KB of
    zeros; --resume warns, continues from state.prev.pt (experience 1 of 3) and ends with the
    same final metrics as the uninterrupted run A (the damaged file used to load silently and
    change them)."""
    from lethe.platform import checkpoint
    from lethe.platform.cli import main

    a = ["run", "split_digits", *SMALL, "tracking.experiment=test", f"tracking.uri=sqlite:///{tmp_path}/a.db",
         f"checkpoint.dir={tmp_path / 'a'}"]
    b = ["run", "split_digits", *SMALL, "tracking.experiment=test", f"tracking.uri=sqlite:///{tmp_path}/b.db",
         f"checkpoint.dir={tmp_path / 'b'}"]
    assert main(a) == 0

    save, saves = checkpoint.Checkpointer.save, []

    def save_then_ctrl_c(self, state, meta):
        save(self, state, meta)
        saves.append(meta["next_experience"])
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_ctrl_c)
    assert main(b) == 130
    monkeypatch.undo()
    (folder,) = (tmp_path / "b").iterdir()
    zero_block(folder / "state.pt")
    capsys.readouterr()

    with caplog.at_level(logging.WARNING, logger="lethe"):
        assert main(b + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming run" in out and "at experience 1/3" in out
    assert f"{folder / 'state.pt'} is damaged" in caplog.text
    run_a, final_a = _finals(f"sqlite:///{tmp_path}/a.db")
    run_b, final_b = _finals(f"sqlite:///{tmp_path}/b.db")
    assert run_b.info.run_id == folder.name and run_b.info.status == "FINISHED"
    assert final_b == final_a   # bitwise: the same steps and values
