"""Checkpoint safety: atomic writes, damaged and malicious files refused, keep-K, fallback."""

import os
from pathlib import Path

import pytest
import torch

from transformer import checkpoint
from transformer.checkpoint import CheckpointError


def payload(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "config": {"model": {"d_model": 64}}}


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_roundtrip_records_version_and_config_hash(tmp_path):
    checkpoint.save(tmp_path / "a.pt", payload())
    ckpt = checkpoint.load(tmp_path / "a.pt")
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert ckpt["config_sha256"] == checkpoint.config_sha256({"model": {"d_model": 64}})
    assert torch.equal(ckpt["model"]["w"], torch.ones(64, 64))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def durability_events(monkeypatch) -> list[tuple]:
    """The fsyncs (of a folder or not) and renames (to which name) made from now on."""
    events, fsync, replace = [], os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    return events


def test_a_save_is_made_durable_before_and_after_its_rename(tmp_path, monkeypatch):
    # The data is fsynced under the temporary name before os.replace publishes it, and the
    # folder after it, so that a power cut leaves the old file or the whole new one.
    events = durability_events(monkeypatch)
    checkpoint.save(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}})
    assert events == [("fsync", False), ("replace", "last.pt"), ("fsync", True)]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_link_or_its_copy_is_made_durable(tmp_path, monkeypatch, hard_links):
    """best.pt and the step files are hard links of last.pt, or copies where the filesystem
    has none: as a save, a copy is fsynced before its rename and the folder after either,
    so that a power cut leaves no empty best.pt or step file. (No test ran the copy.)"""

    def no_hard_links(src, dst):
        raise OSError(1, "Operation not permitted")

    checkpoint.save(tmp_path / "last.pt", payload(5.0))
    if not hard_links:
        monkeypatch.setattr(os, "link", no_hard_links)
    events = durability_events(monkeypatch)
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    renamed = [("replace", "best.pt"), ("fsync", True)]
    assert events == (renamed if hard_links else [("fsync", False), *renamed])
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt") == hard_links
    assert float(checkpoint.load(tmp_path / "best.pt")["model"]["w"].min()) == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_a_failed_write_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    """A full disk or a file size limit raised OSError out of torch.save: a traceback."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload(1.0))

    def full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=f"cannot write {path}: No space left on device"):
        checkpoint.save(path, payload(2.0))

    def cut(obj, f):  # a file size limit, in torch's writer's words
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 409152")

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(CheckpointError, match="write failed, is the disk full. .*unexpected pos"):
        checkpoint.save(path, payload(2.0))
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(64, 64))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(marker), "format_version": checkpoint.FORMAT_VERSION}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpoint.load(path)
    assert not marker.exists()
    # The file really is hostile: an unsafe load runs the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable or truncated"):
        checkpoint.load(path)


def test_flipped_bit_is_caught_by_the_crc(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, payload())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC mismatch"):
        checkpoint.load(path)


def test_tampered_config_and_unknown_version_are_refused(tmp_path):
    path = tmp_path / "a.pt"
    ckpt = {**payload(), "format_version": checkpoint.FORMAT_VERSION, "config_sha256": "0" * 64}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        checkpoint.load(path)
    torch.save({"model": {}, "format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.load(path)


def test_a_resume_tries_last_pt_then_the_step_files_newest_first(tmp_path):
    for name in ("step_00000002.pt", "step_00000010.pt", "step_00000009.pt"):
        (tmp_path / name).touch()
    names = ["step_00000010.pt", "step_00000009.pt", "step_00000002.pt"]
    assert [p.name for p in checkpoint.resume_candidates(tmp_path)] == names
    (tmp_path / "last.pt").touch()
    assert [p.name for p in checkpoint.resume_candidates(tmp_path)] == ["last.pt", *names]


def test_linking_a_file_to_a_name_it_already_has_leaves_no_temporary_link(tmp_path):
    """A resume whose checkpoint is also best.pt links last.pt as best.pt again: rename(2)
    over another link of the same file does nothing, and the temporary link stayed, a
    whole checkpoint's bytes kept after its step files were pruned."""
    checkpoint.save(tmp_path / "last.pt", payload(3))
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    checkpoint.save(tmp_path / "last.pt", payload(4))  # a new file under the name
    checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert checkpoint.load(tmp_path / "best.pt")["model"]["w"][0, 0] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_the_temporary_files_of_killed_writes_are_removed(tmp_path):
    for name in (".last.pt.tmp123", ".best.pt.tmp77", "last.pt", "step_00000001.pt", "notes"):
        (tmp_path / name).write_bytes(b"x")
    removed = checkpoint.remove_temporaries(tmp_path)
    assert [p.name for p in removed] == [".best.pt.tmp77", ".last.pt.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes", "step_00000001.pt"]


def test_keep_k_and_fallback_to_the_newest_good_one(tmp_path, caplog):
    for step in range(1, 6):
        checkpoint.save(tmp_path / "last.pt", payload(step))
        checkpoint.link_or_copy(tmp_path / "last.pt", tmp_path / f"step_{step:08d}.pt")
        checkpoint.prune(tmp_path, keep=3)
    steps = checkpoint.step_checkpoints(tmp_path)
    assert [p.name for p in steps] == [f"step_{s:08d}.pt" for s in (5, 4, 3)]
    # Damage the newest file in place: last.pt and step 5 share it, so both are bad.
    with open(tmp_path / "last.pt", "r+b") as f:
        f.truncate(100)
    path, ckpt = checkpoint.load_latest([tmp_path / "last.pt", *steps])
    assert path.name == "step_00000004.pt" and float(ckpt["model"]["w"][0, 0]) == 4.0
    assert "last.pt: unreadable or truncated" in caplog.text
    for p in steps[1:]:
        p.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no usable checkpoint among 3"):
        checkpoint.load_latest(steps)
    assert checkpoint.load_latest([]) is None
