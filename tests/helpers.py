"""Helpers the tests share: tiny shards and running a recipe as a user would."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses the tests start (recipes, servers) run on one thread: tiny models are fastest so, and with
# several, the OpenMP threads of concurrent processes (pytest + a server + training) fight over 2 cores.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A WebDataset shard from dicts {"__key__": ..., ext: bytes|str}."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def png_bytes(colour=(200, 30, 30), size=16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def run_recipe(args: list[str], cwd: Path = ROOT, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run recipes/clip/train.py in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "clip" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **SUBPROCESS_ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def load_recipe(name: str):
    """Import recipes/<name>/train.py as a module (recipes are scripts, not a package)."""
    import importlib.util

    mod_name = f"recipe_{name}_train"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "recipes" / name / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take_batches(dataset, position, n_batches: int, num_workers: int) -> list:
    """n batches (as lists) from a fresh DataLoader over a ShardStream at `position` (updated); the loader,
    with its workers and their prefetched batches, is thrown away afterwards, as a killed run's is."""
    from mm.shards import make_loader

    loader = iter(make_loader(dataset, num_workers, position))
    out = []
    for _ in range(n_batches):
        batch, state = next(loader)
        position.update(state)
        out.append(batch.tolist())
    return out
