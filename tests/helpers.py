"""Helpers the tests share: tiny shards and running a recipe as a user would."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def exit_status(e: SystemExit) -> tuple[int, str | None]:
    """What the interpreter makes of an uncaught SystemExit: (exit status, the message it prints on stderr or None)."""
    if isinstance(e.code, int) or e.code is None:
        return e.code or 0, None
    return 1, str(e.code)


def run_recipe_in_process(name: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """recipes/<name>/train.py run as its `__main__` does, `main(args)`, but in this process: what
    `python recipes/<name>/train.py ARGS` would give (its stdout, its stderr with the log lines, and its exit
    status: SystemExit's, or 1 with the traceback on stderr for any other exception), without the imports a fresh
    process pays (most of a tiny run's time). For what a run does or refuses; a test of the process itself (a
    SIGKILL, a launcher) starts a real one. Call it with torch on one thread (the one_torch_thread fixture), as
    SUBPROCESS_ENV runs a recipe, so a run here computes the same numbers as one in a subprocess."""
    import contextlib
    import logging
    import traceback

    recipe = load_recipe(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main's setup_logging replaces them: put back after
    out, err, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    try:
        os.chdir(ROOT)  # where run_recipe runs it (contextlib.chdir is 3.11+)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                recipe.main(list(args))
            except SystemExit as e:  # as the interpreter ends on it
                code, message = exit_status(e)
                if message is not None:
                    print(message, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        root.handlers[:] = handlers
        root.setLevel(level)
    proc = subprocess.CompletedProcess([f"recipes/{name}/train.py", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"recipe failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


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


# ---------------------------------------------------------------- ASR

# The ASR tests' corpus: data_tools' espeak speech, tiny (12 training and 3 held-out utterances in each of
# three scripts, one shard per split; ~3 s to write).
TINY_ASR_CORPUS = {"per_language": 12, "heldout_per_language": 3, "words_per_language": 40,
                   "languages": ("en", "ru", "el")}


def tiny_asr_corpus(tmp_path_factory) -> Path:
    """<base temp>/asr_corpus/{train,heldout}/shard-000000.tar + info.json, written by the first test session
    fixture that asks and reused by the others (ensure_synthetic_asr keeps a complete copy with the same
    settings), so each test module can declare its own fixture and the corpus is still made once."""
    from data_tools.synthetic_asr import ensure_synthetic_asr

    out = tmp_path_factory.getbasetemp() / "asr_corpus"
    ensure_synthetic_asr(out, **TINY_ASR_CORPUS)
    return out


def asr_recipe_command(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "asr" / "train.py"), *args]


def run_asr_recipe(args: list[str], cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run recipes/asr/train.py in a fresh process, as a user would (run_recipe's twin)."""
    proc = subprocess.run(asr_recipe_command(args), cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **SUBPROCESS_ENV})
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def kill_after_first_checkpoint(command: list[str], ckpt_dir: Path) -> list[int]:
    """Start `command`, SIGKILL it as soon as `ckpt_dir` holds a checkpoint; the steps saved by then."""
    import signal
    import time

    from mm.checkpoint import list_checkpoints

    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **SUBPROCESS_ENV})
    while not list_checkpoints(ckpt_dir) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [s for s, _ in list_checkpoints(ckpt_dir)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module, as SUBPROCESS_ENV does for subprocesses: tiny models run fastest
    so, and two threads fighting other processes for 2 cores made decoding steps 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; never a Playwright download


def chromium_or_skip():
    """Debian's chromium; skip without it, except in CI (env CI set), where its absence is a failure."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    else:
        missing = None if CHROMIUM.exists() else f"{CHROMIUM} not found (bash setup.sh test installs it)"
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {missing}")
    if missing:
        pytest.skip(missing)


def launch_chromium(pw, *extra_args: str):
    """Debian's chromium, headless, from a `sync_playwright()` handle, with the flags every browser test uses
    (no sandbox inside containers, no GPU, no background requests: the tests run offline). Call
    chromium_or_skip() first."""
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", *extra_args])
