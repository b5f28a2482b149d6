"""Checkpoint files: atomic, durable writes, keep-last-K, finding the newest one that loads, safe loading,
RNG capture as tensors, and safetensors export. What goes into a training checkpoint is mm/train_state.py's.

Layout under a run directory:
    <out_dir>/checkpoints/step_00001000.pt   one file (model, optimizer, ... for a model held whole on each rank)
    <out_dir>/checkpoints/step_00001000/     a folder (torch.distributed.checkpoint shards + train_state.pt,
                                             for a sharded, FSDP model)
    <out_dir>/checkpoints/.step_*.tmp        a write in progress; left behind only by a kill, removed on the
                                             next save or resume
Nothing is unpickled beyond tensors and plain containers (`torch.load(weights_only=True)`), so a checkpoint
from anyone can be opened without running code.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d+)(\.pt)?$")
_ORPHAN = re.compile(r"^\.step_\d+.*\.tmp$")
SHARDED_STATE = "train_state.pt"  # inside a sharded checkpoint folder: everything but the DCP shards


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or holding more than tensors and plain data."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a deletion in `path` durable: without this, a power cut can undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`: a reader never sees a half-written file, and a crash
    mid-write leaves the previous file intact. The file and then its folder are fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (step_*.pt files and step_* folders), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP.match(p.name))
             and (p.is_file() if m.group(2) else (p / SHARDED_STATE).is_file())]
    return sorted(found)


def remove_orphans(ckpt_dir: str | Path) -> list[Path]:
    """Delete the `.step_*.tmp` files and folders a killed write left behind; returns what was removed.
    Call it only where no other process writes a checkpoint into `ckpt_dir` (rank 0, before its own write)."""
    d = Path(ckpt_dir)
    orphans = [p for p in d.iterdir() if _ORPHAN.match(p.name)] if d.is_dir() else []
    for p in orphans:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        log.info("removed %s, left behind by an interrupted checkpoint write", p)
    return orphans


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0 keeps all)."""
    if keep > 0:
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        fsync_dir(ckpt_dir)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step_<step>.pt atomically and durably, then delete all but the newest `keep`."""
    remove_orphans(ckpt_dir)
    path = atomic_write(Path(ckpt_dir) / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    prune_checkpoints(ckpt_dir, keep)  # only once the new one is on disk for good
    return path


def resume_candidates(resume: str | None, ckpt_dir: str | Path) -> list[Path]:
    """The checkpoints `--resume` may mean, newest first: "latest" -> those in `ckpt_dir` (none: []);
    a run or checkpoints folder -> those in it; a file or checkpoint folder -> just it."""
    if not resume:
        return []
    if resume == "latest":
        return [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    p = Path(resume)
    if p.is_file() or (p.is_dir() and (p / SHARDED_STATE).is_file()):
        return [p]
    if p.is_dir():
        found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if not found:
            raise FileNotFoundError(f"--resume={resume}: no step_* checkpoints in that folder")
        return [q for _, q in reversed(found)]
    raise FileNotFoundError(f"--resume={resume}: no such checkpoint file or folder")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain containers only, so a
    file from anyone can be opened without running code. Anything else is a CheckpointError naming the
    file. A sharded checkpoint folder gives its train_state.pt (the model shards load through DCP)."""
    path = Path(path)
    file = path / SHARDED_STATE if path.is_dir() else path
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
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


def load_newest(candidates: list[Path], set_aside: bool = False) -> tuple[Path, dict[str, Any]]:
    """The newest of `candidates` (newest first) that loads, and its contents. Each one skipped is named in
    a warning with why, and with `set_aside` renamed to <name>.unusable, so that it no longer counts as a
    checkpoint (nor for keep-last-K) and its step can be written again. CheckpointError listing every
    reason if none loads."""
    reasons = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if path.is_dir():
                read_sharded_metadata(path)  # its shards' index must load too
        except CheckpointError as e:
            reasons.append(str(e))
            if set_aside:
                path.rename(path.with_name(path.name + ".unusable"))
            log.warning("skipping checkpoint %s%s", e, f" (renamed to {path.name}.unusable)" if set_aside else "")
            continue
        if reasons:
            log.warning("resuming from %s, the newest checkpoint that loads (%d newer skipped)", path, len(reasons))
        return path, state
    raise CheckpointError("no checkpoint loads:\n  " + "\n  ".join(reasons))


# ---------------------------------------------------------------- sharded checkpoints, read without pickle's trust

# torch.distributed.checkpoint reads its .metadata index with plain pickle.load and its non-tensor entries with
# torch.load(weights_only=False): a folder from someone else could run code. These two replace exactly those
# reads with a pickle that admits only DCP's own metadata classes, and with weights_only=True.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP's metadata classes and torch dtypes (Python's documented way to restrict globals)."""

    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                         torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def read_sharded_metadata(path: str | Path):
    """The DCP index (.metadata) of a sharded checkpoint folder; CheckpointError if it holds anything else."""
    try:
        with open(Path(path) / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: its .metadata holds Python objects other than checkpoint "
                              f"metadata, and loading it could run code ({e})") from None
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable sharded checkpoint ({type(e).__name__}: {e})") from None


def safe_dcp_reader_and_planner(path: str | Path):
    """(storage_reader, planner) for torch.distributed.checkpoint.load that never unpickle beyond tensors,
    plain containers and DCP's metadata."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.default_planner import set_element

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_sharded_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Reader(str(path)), Planner()


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
