"""Checkpoint files: atomic and durable writes, keep-last-K, orphans of killed writes, falling back past a
truncated newest checkpoint, refusing pickled code, RNG round trips, safetensors."""
import logging
import os
import random

import numpy as np
import pytest
import torch

from mm import checkpoint as ckpt


class Payload:
    """Unpickling this runs a command that leaves a marker file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_save_keeps_last_k_and_latest_resolves(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    [newest, older] = ckpt.resume_candidates("latest", tmp_path)
    assert (newest.name, older.name) == ("step_00000040.pt", "step_00000030.pt")
    assert ckpt.load_checkpoint(newest)["step"] == 40
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_writes_fsync_the_file_and_then_the_folder(tmp_path, monkeypatch):
    """Durability: the data, then the rename (the folder), then the deletion of old checkpoints."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    ckpt.save_checkpoint(tmp_path, 1, {"w": 1}, keep=1)
    ckpt.save_checkpoint(tmp_path, 2, {"w": 2}, keep=1)
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)  # the file's bytes, then the rename
    assert synced[-1] == str(tmp_path) and not (tmp_path / "step_00000001.pt").exists()  # then the deletion


def test_failed_write_leaves_previous_file_intact(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": 1}, keep=0)

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(tmp_path / "step_00000001.pt", boom)
    assert ckpt.load_checkpoint(tmp_path / "step_00000001.pt") == {"w": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]


def test_orphans_of_a_killed_write_are_removed_by_the_next_save(tmp_path):
    (tmp_path / ".step_00000002.pt.abc123.tmp").write_bytes(b"half")  # a kill during torch.save
    (tmp_path / ".step_00000003.tmp").mkdir()  # a kill during a sharded write
    (tmp_path / ".step_00000003.tmp" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not ours: stays")
    ckpt.save_checkpoint(tmp_path, 4, {"w": 4}, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_00000004.pt"]


def test_resume_candidates_errors_are_clear(tmp_path):
    assert ckpt.resume_candidates(None, tmp_path) == []
    assert ckpt.resume_candidates("latest", tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.resume_candidates(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no step_"):
        ckpt.resume_candidates(str(tmp_path), tmp_path)


def test_truncated_newest_checkpoint_falls_back_to_the_newest_that_loads(tmp_path, caplog):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(100)}, keep=0)
    newest = tmp_path / "step_00000003.pt"
    newest.write_bytes(newest.read_bytes()[:300])  # cut short, as a kill mid-copy would
    with caplog.at_level(logging.WARNING):
        path, state = ckpt.load_newest(ckpt.resume_candidates("latest", tmp_path))
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000003.pt" in caplog.text and "truncated or corrupt" in caplog.text
    (tmp_path / "step_00000002.pt").write_bytes(b"")
    (tmp_path / "step_00000001.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint loads:(.|\n)*step_00000003(.|\n)*step_00000001"):
        ckpt.load_newest(ckpt.resume_candidates("latest", tmp_path))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "step": 1, "rng": Payload(marker)}, tmp_path / "step_00000001.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"refused: .*could run code \(unsupported GLOBAL posix.system\)"):
        ckpt.load_checkpoint(tmp_path / "step_00000001.pt")
    assert not marker.exists()


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.save({"rng": ckpt.capture_rng()}, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_safetensors_export_round_trip(tmp_path):
    lin = torch.nn.Linear(3, 2)
    ckpt.export_safetensors(lin.state_dict(), tmp_path / "w.safetensors", {"dims": {"in": 3, "out": 2}})
    sd, meta = ckpt.read_safetensors(tmp_path / "w.safetensors")
    assert meta == {"dims": {"in": 3, "out": 2}}
    torch.testing.assert_close(sd["weight"], lin.weight.detach())


def _sharded_checkpoint(tmp_path):
    """A real torch.distributed.checkpoint folder (one process) with our train_state.pt beside."""
    import warnings

    import torch.distributed.checkpoint as dcp

    path = tmp_path / "step_00000001"
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no process group: saving in one process"
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    torch.save({"step": 1, "extra": {}}, path / ckpt.SHARDED_STATE)
    return path, model


def test_a_sharded_checkpoint_is_read_without_trusting_its_pickles(tmp_path):
    """DCP reads .metadata with plain pickle and its byte entries with weights_only=False; we do neither."""
    import io
    import pickle
    from types import SimpleNamespace

    from mm.train_state import load_model_weights

    path, model = _sharded_checkpoint(tmp_path)
    weights, rest = load_model_weights(path)  # the honest folder loads, whole, in one process
    torch.testing.assert_close(weights["weight"], model.weight.detach())
    assert rest["step"] == 1

    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"refused: its .metadata .*could run code"):
        load_model_weights(path)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_newest([path])
    buf = io.BytesIO()
    torch.save({"param_groups": Payload(marker)}, buf)
    buf.seek(0)
    _, planner = ckpt.safe_dcp_reader_and_planner(path)
    planner.flatten_state_dict, planner.state_dict = False, {}
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(SimpleNamespace(dest_index=SimpleNamespace(fqn="optimizer")), buf)
    assert not marker.exists()
