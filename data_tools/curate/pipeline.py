"""The curation pipeline: the steps a YAML file lists, chained in one streaming pass into new shards.

    python -m data_tools.curate data_tools/curate/examples/curate.yaml [--input=...] [--output=...]

The YAML file:

    input: data/raw/shard-{000000..000099}.tar   # any shard spec the tools read
    output: data/curated                          # a new folder, or one an earlier run wrote
    overwrite: false                              # and shard_max_count, shard_max_mb: as for every tool
    steps:                                        # in order; each {name: <step>, <that step's keys>...}
      - name: dedup
        near_bits: 8
      - name: filters
        min_side: 200
      - name: reshard                             # writes the shards itself, so it can only come last
        n_shards: 16

A step with `enabled: false` is skipped, and its keys are not checked (its module is not even imported). The
whole file is checked before any data is read: unknown step names, unknown keys and wrong types fail with what
is accepted. Steps' modules are imported only when named, so a dedup-only pipeline loads no model code.
The report.json in the output folder has one section per step (and "read" first); the funnel table printed at
the end shows each step's samples in and out, and why the others were dropped.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from mm.config import ConfigError, apply_overrides

from data_tools.curate.cli import OutputConfig, Step, run_chain

STEPS = {  # step name -> module, imported when a pipeline names the step
    "dedup": "data_tools.curate.dedup",
    "filters": "data_tools.curate.filters",
    "clip_score": "data_tools.curate.clip_score",
    "semdedup": "data_tools.curate.semdedup",
    "balance": "data_tools.curate.balance",
    "reshard": "data_tools.curate.reshard",
}
TOP_KEYS = ("input", "steps", *(f.name for f in dataclasses.fields(OutputConfig)))
STEP_KEYS = ("name", "enabled")  # what every step entry may hold besides its config keys


@dataclass
class Pipeline:
    input: str
    output: OutputConfig
    steps: list[Step]
    skipped: list[str]  # names of the steps with enabled: false


def config_class(module):
    """The module's one `<Tool>Config` dataclass."""
    found = [v for v in vars(module).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
             and v.__module__ == module.__name__ and v.__name__.endswith("Config")]
    if len(found) != 1:
        raise ConfigError(f"{module.__name__} should define one <Tool>Config dataclass, found {len(found)}")
    return found[0]


def load_step(index: int, entry) -> Step | None:
    """One `steps:` entry -> a configured Step (None when disabled). ConfigError names the entry."""
    where = f"steps[{index}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{where}: each step is a mapping with a name (one of {', '.join(STEPS)}), got {entry!r}")
    name = entry["name"]
    if name not in STEPS:
        close = difflib.get_close_matches(name, list(STEPS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{where}: unknown step {name!r}.{hint} Steps: {', '.join(STEPS)}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where} ({name}): enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    try:
        module = importlib.import_module(STEPS[name])
    except ModuleNotFoundError as e:
        raise ConfigError(f"{where}: step {name!r} is not available ({e})") from None
    try:
        cfg = apply_overrides(config_class(module)(), {k: v for k, v in entry.items() if k not in STEP_KEYS})
        if hasattr(module, "check_config"):
            module.check_config(cfg)
    except (ValueError, OSError) as e:  # ConfigError, a step's own checks, a missing checkpoint
        raise ConfigError(f"{where} ({name}): {e}") from None
    return Step(name, module.apply, cfg, getattr(module, "write_output", None))


def load_pipeline(path: str | Path, overrides: dict | None = None) -> Pipeline:
    """Read and check a pipeline YAML file; `overrides` (e.g. {"output": ...}) replace its top-level keys."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pipeline is a mapping with {', '.join(TOP_KEYS)}")
    data = {**data, **(overrides or {})}
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a pipeline has {', '.join(TOP_KEYS)}")
    if not data.get("input") or not isinstance(data["input"], str):
        raise ConfigError(f"{path}: input: the shards to read (a path, folder, brace pattern or URL) is required")
    entries = data.get("steps")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: steps: a list of steps, e.g. [{{name: dedup}}, {{name: filters, min_side: 200}}]")
    output = apply_overrides(OutputConfig(), {k: v for k, v in data.items() if k not in ("input", "steps")})
    loaded = [(entry.get("name") if isinstance(entry, dict) else None, load_step(i, entry))
              for i, entry in enumerate(entries)]
    steps = [step for _, step in loaded if step is not None]
    if not steps:
        raise ConfigError(f"{path}: every step is disabled")
    for step in steps[:-1]:
        if step.write_output is not None:
            raise ConfigError(f"{path}: {step.name} writes the shards itself, so it must be the last step")
    return Pipeline(data["input"], output, name_reports(steps), [n for n, s in loaded if s is None])


def name_reports(steps: list[Step]) -> list[Step]:
    """A step listed twice gets a numbered report section ("filters", "filters#2")."""
    seen: dict[str, int] = {}
    out = []
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        out.append(step if seen[step.name] == 1 else dataclasses.replace(step, name=f"{step.name}#{seen[step.name]}"))
    return out


def run_pipeline(pipeline: Pipeline, source: str = "", on_drop: Callable[[dict], None] | None = None) -> dict:
    """Run the steps in one streaming pass; returns the report (also in <output>/report.json). `on_drop` gets
    every drop in full (Report.on_drop)."""
    config = {"pipeline": source, "skipped": pipeline.skipped,
              "steps": [{"name": s.name, **dataclasses.asdict(s.config)} for s in pipeline.steps]}
    return run_chain(pipeline.input, pipeline.output, pipeline.steps, tool="pipeline", extra={"config": config},
                     on_drop=on_drop)
