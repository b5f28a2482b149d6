"""Saving and resuming a training run: two functions every recipe calls, so no recipe writes its own.

    resumed = resume_train_state(cfg.resume, ckpt_dir, model=model, optimizer=opt, scheduler=sched,
                                 data_setup=setup, ignore_data=cfg.resume_ignore_data)   # None: a fresh run
    ...
    path = save_train_state(ckpt_dir, step, model=model, optimizer=opt, scheduler=sched, position=position,
                            data_setup=setup, config=asdict(cfg), keep=cfg.keep_checkpoints)

A checkpoint holds the model, optimizer, scheduler (and fp16 scaler), the data position of every rank
and every worker, the RNG state of every rank, the step, the config and the data setup (`data_setup`:
world size, num_workers, seed, train data: whatever decides which samples come next). Every rank calls
both functions (they are collectives). Rank 0 alone picks the checkpoint to resume and tells the others,
so ranks never pick different ones. A model sharded by FSDP2 is saved and loaded through
torch.distributed.checkpoint, each rank writing and reading its own shards; otherwise rank 0 writes one
file. Files are read with weights_only=True (mm/checkpoint.py): nothing from outside is unpickled.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm import checkpoint as ckpt
from mm.distributed import barrier, broadcast_from_main, gather_to_main, is_sharded, world

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """--resume cannot continue this run as asked. The message says why and what to do."""


@dataclass
class Resumed:
    """What a recipe needs from the checkpoint it resumed."""
    step: int
    path: Path
    data: dict | None  # this rank's LoaderPosition state; None when the data starts afresh (ignore_data)
    data_seed: int  # the seed the data stream uses from here
    extra: dict = field(default_factory=dict)  # what the recipe saved beside (e.g. its model config)


# ---------------------------------------------------------------- save

def save_train_state(ckpt_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer, scheduler, position,
                     data_setup: dict, config: dict, keep: int, data_seed: int | None = None,
                     scaler: torch.amp.GradScaler | None = None, extra: dict | None = None) -> Path:
    """Write step_<step> (a file, or a folder for a sharded model) atomically and durably; keep the newest
    `keep`. Collective: every rank calls it. `model` is the module itself (not a DDP wrapper). Returns the path."""
    rank, world_size = world()
    data = gather_to_main(position.state_dict())
    rng = gather_to_main(ckpt.capture_rng())
    meta = {"step": step, "data": data, "rng": rng, "data_setup": {**data_setup, "world_size": world_size},
            "data_seed": data_setup.get("seed") if data_seed is None else data_seed, "config": config,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "extra": extra or {}}
    if is_sharded(model):
        path = _save_sharded(Path(ckpt_dir), step, model, optimizer, meta if rank == 0 else None, keep)
    else:
        path = _on_main(lambda: ckpt.save_checkpoint(
            ckpt_dir, step, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}, keep))
    return Path(path)


def _on_main(work):
    """Run `work` on rank 0 and hand its result, or its error, to every rank: a full disk on rank 0 must
    stop all ranks at once, not leave the others waiting at the next collective until it times out."""
    result = None
    if world()[0] == 0:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            result = e
    result = broadcast_from_main(result)
    if isinstance(result, Exception):
        raise result
    return result


def _save_sharded(ckpt_dir: Path, step: int, model, optimizer, meta: dict | None, keep: int) -> Path:
    """Each rank writes its shards into .step_N.tmp/, rank 0 adds train_state.pt, renames the folder, fsyncs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    if meta is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_orphans(ckpt_dir)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))  # fsyncs its files
    barrier()

    def finish():
        ckpt.atomic_write(tmp / ckpt.SHARDED_STATE, lambda f: torch.save(meta, f))
        if final.exists():  # this step written before and set aside as unusable, or a crash after the rename
            shutil.rmtree(final)
        tmp.rename(final)
        ckpt.fsync_dir(ckpt_dir)
        ckpt.prune_checkpoints(ckpt_dir, keep)
        return final
    return _on_main(finish)


# ---------------------------------------------------------------- resume

def resume_train_state(resume: str | None, ckpt_dir: str | Path, *, model: torch.nn.Module, optimizer, scheduler,
                       data_setup: dict, ignore_data: bool = False,
                       scaler: torch.amp.GradScaler | None = None) -> Resumed | None:
    """Load the checkpoint `resume` means ("latest", a run or checkpoints folder, or a checkpoint) into
    model, optimizer, scheduler (and scaler), restore this rank's RNG, and return where to continue.
    None for a fresh run. Collective: every rank calls it, after building the model and before wrapping
    it in DDP (FSDP2: after fully_shard).

    A changed data setup (world size, num_workers, seed, train data) would silently train on other
    samples, so it is a ResumeError naming each difference, unless `ignore_data`: then the model,
    optimizer and schedule continue and the data starts afresh, in an order seeded by seed + step.
    """
    rank, world_size = world()
    ckpt_dir = Path(ckpt_dir)
    choice, state = _choose(resume, ckpt_dir) if rank == 0 else (None, None)
    choice = broadcast_from_main(choice)  # the path only: rank 0 keeps the contents it read to choose
    if isinstance(choice, Exception):
        raise choice
    if choice is None:
        return None
    path = Path(choice)
    state = state if state is not None else ckpt.load_checkpoint(path)
    changed = setup_changes(state["data_setup"], {**data_setup, "world_size": world_size})
    if changed and not ignore_data:
        raise ResumeError(f"{path} was written with another data setup: {'; '.join(changed)}. Resuming would train "
                          f"on other samples than the interrupted run. Start a new run (another out_dir), or pass "
                          f"--resume_ignore_data=true to keep the weights, optimizer and schedule and start the data afresh.")
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_schedule = scheduler.state_dict()
    if path.is_dir():
        _load_sharded(path, model, optimizer)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    keep_current_hyperparameters(optimizer, scheduler, fresh_groups, fresh_schedule)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    step = state["step"]
    if ignore_data and changed:
        log.warning("resuming %s at step %d with new data (%s): the data stream starts afresh", path, step,
                    "; ".join(changed))
    keep_data = not (ignore_data and changed)
    if keep_data and rank < len(state["rng"]):
        ckpt.restore_rng(state["rng"][rank])
    data_seed = state["data_seed"] if keep_data else int(data_setup.get("seed", 0)) + step
    log.info("resumed from %s at step %d", path, step)
    return Resumed(step, path, state["data"][rank] if keep_data else None, data_seed, state.get("extra", {}))


def keep_current_hyperparameters(optimizer, scheduler, fresh_groups: list[dict], fresh_schedule: dict) -> None:
    """After loading: the run's config, not the checkpoint's, decides weight decay, betas, the peak lr and
    the schedule's shape (a resumed run with a longer --max_steps or another --lr gets them), with a warning
    naming each change. The optimizer moments, the step count and the schedule's position stay restored."""
    changed = []
    for i, (group, fresh) in enumerate(zip(optimizer.param_groups, fresh_groups)):
        for k, v in fresh.items():
            if k not in ("lr", "initial_lr") and group.get(k) != v:
                changed.append(f"param group {i} {k} {group.get(k)!r} -> {v!r}")
                group[k] = v
    saved = scheduler.state_dict()
    for k in ("base_lrs", "lr_lambdas"):
        if k in fresh_schedule and saved.get(k) != fresh_schedule[k]:
            changed.append(f"schedule {k} {saved.get(k)!r} -> {fresh_schedule[k]!r}")
    if any(c.startswith("schedule") for c in changed):
        scheduler.load_state_dict({**saved, "base_lrs": fresh_schedule["base_lrs"],
                                   "lr_lambdas": fresh_schedule["lr_lambdas"]})
    if changed:
        log.warning("resuming with this run's settings, not the checkpoint's: %s", "; ".join(changed))


def _choose(resume: str | None, ckpt_dir: Path) -> tuple[str | Exception | None, dict | None]:
    """Rank 0's decision: (the path to resume, its newest checkpoint that loads, and what it holds), (None,
    None), or (the error to raise on every rank, None). An explicit file is used or refused as it is; "latest" or a folder falls back to an older
    checkpoint when the newest does not load (a kill mid-copy, a full disk), with a warning naming it."""
    try:
        ckpt.remove_orphans(ckpt_dir)
        candidates = ckpt.resume_candidates(resume, ckpt_dir)
        if not resume and ckpt.list_checkpoints(ckpt_dir):
            return ResumeError(f"{ckpt_dir} already holds checkpoints. Continue that run with --resume=latest, "
                               f"or start afresh with another out_dir."), None
        if not candidates:
            if resume:
                log.info("--resume=%s: no checkpoint in %s yet, starting afresh", resume, ckpt_dir)
            return None, None
        path, state = ckpt.load_newest(candidates, set_aside=resume == "latest")
        return str(path), state
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        return ResumeError(str(e)), None


def setup_changes(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two data setups, e.g. "num_workers 2 -> 4"."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def _load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    reader, planner = ckpt.safe_dcp_reader_and_planner(path)
    dcp.load(state, storage_reader=reader, planner=planner)  # each rank reads the shards it holds
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---------------------------------------------------------------- weights only (inference, export)

def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, on the CPU ({} on other ranks of a sharded model). Collective."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full model state_dict, the checkpoint's other contents) from a step_*.pt file or a sharded
    step_* folder, in one process, without a process group: for evaluation, export and inference."""
    path = Path(path)
    state = ckpt.load_checkpoint(path)
    if not path.is_dir():
        if "model" not in state:
            raise ckpt.CheckpointError(f"{path}: no model weights in it (keys: {sorted(state)[:10]})")
        return state.pop("model"), state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = ckpt.read_sharded_metadata(path)  # the shapes and dtypes of every tensor, read safely
    weights = {k[len("model."):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in index.state_dict_metadata.items()
               if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    reader, planner = ckpt.safe_dcp_reader_and_planner(path)
    with warnings.catch_warnings():  # "no process group: loading in a single process" is what we want here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": weights}, storage_reader=reader, planner=planner)
    return weights, state
