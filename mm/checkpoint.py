"""Checkpoints: atomic writes, keep-last-K, `latest` lookup, RNG capture and safetensors export.

Layout under a run directory:
    <out_dir>/checkpoints/step_00001000.pt   model, optimizer, scheduler, step, RNG states, data position
    <out_dir>/model.safetensors              final weights, loadable without pickle
"""
from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` then rename onto `path`: a reader never sees a half-written file,
    and a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in `ckpt_dir`, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / m.group(0)) for p in d.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step_<step>.pt atomically, then delete all but the newest `keep` (0 keeps all)."""
    path = atomic_write(Path(ckpt_dir) / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    if keep > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> Path | None:
    """`None`/"" -> None; "latest" -> newest checkpoint in `ckpt_dir` (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    p = Path(resume)
    if p.is_dir():
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"--resume={resume}: no step_*.pt checkpoints in that folder")
        return found[-1][1]
    if not p.is_file():
        raise FileNotFoundError(f"--resume={resume}: no such checkpoint file")
    return p


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or holding more than tensors and plain data."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain containers only, so a
    file from anyone can be opened without running code. Anything else is a CheckpointError naming the file."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; we never do. Keep only what it found.
        found = re.search(r"(unsupported \w+ [\w.]+|Unsupported global: \S+ [\w.]+)", str(e), flags=re.I)
        raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain containers, "
                              f"and loading it could run code ({found.group(1) if found else 'not a weights file'})") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt? "
                              f"({type(e).__name__}: {str(e)[:300]})") from None


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain containers (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Weights as safetensors (shared storage cloned apart), with `metadata` JSON-encoded in the header."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a file written by `export_safetensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        return {k: f.get_tensor(k) for k in f.keys()}, meta
