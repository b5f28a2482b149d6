"""The command-line plumbing every curation tool shares: parse `INPUT --output=DIR --key=value...`, stream
the input through the steps into new shards, save report.json, print the funnel.

    python -m data_tools.curate.dedup raw/shard-{000000..000099}.tar --output=deduped/ --near_bits=6

A tool module defines `apply(samples, cfg, report)` (a generator stage), a flat `<Tool>Config` dataclass whose
field comments are its `--help` and `check_config(cfg)`; its `main(argv)` is `run_tool(name, apply, Config, argv,
check=check_config)`. The pipeline (data_tools.curate.pipeline) chains several steps through the same `run_chain`.

A step config field named `tmp_dir` left empty is set to a hidden folder inside the output folder (removed at
the end): steps that spill to disk then use the disk the output goes to, not a RAM-backed /tmp.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mm.config import ConfigError, apply_overrides, describe_fields, split_argv

from data_tools.curate.io import REPORT_NAME, ShardWriter, iter_samples, prepare_output, remove_stale
from data_tools.curate.report import Report, format_funnel, write_json_atomic

TMP_PREFIX = ".tmp-curate-"  # matched by io.OWN_TEMP, so a killed run's leftovers are ours to remove


@dataclass
class OutputConfig:
    output: str = ""  # folder for the new shards and report.json (required; never one that holds an input shard)
    overwrite: bool = False  # write into a folder that holds files no curation run wrote (its .tar files are replaced)
    shard_max_count: int = 10000  # samples per output shard at most
    shard_max_mb: float = 1000.0  # payload per output shard at most, in 10^6 bytes


Apply = Callable[[Iterable[dict], object, Report], Iterator[dict]]
# write_output(samples, cfg, report, writer): a final step that writes the shards itself (reshard)
WriteOutput = Callable[[Iterable[dict], object, Report, ShardWriter], None]


@dataclass
class Step:
    """One configured step of a chain."""
    name: str
    apply: Apply
    config: object
    write_output: WriteOutput | None = None


def with_tmp_dir(cfg, tmp_dir: Path):
    """`cfg` with an empty `tmp_dir` field set to `tmp_dir` (unchanged when it has none or it is set)."""
    if dataclasses.is_dataclass(cfg) and hasattr(cfg, "tmp_dir") and not cfg.tmp_dir:
        return dataclasses.replace(cfg, tmp_dir=str(tmp_dir))
    return cfg


def run_chain(input_spec: str, out: OutputConfig, steps: list[Step], tool: str, extra: dict | None = None,
              on_drop: Callable[[dict], None] | None = None) -> dict:
    """Stream `input_spec` through `steps` into shards in `out.output`, in one pass; write report.json; return it.
    Only the last step may have `write_output`. `on_drop` gets every drop of every step (Report.on_drop).
    Raises ValueError (changing nothing) for a bad output folder."""
    if not out.output:
        raise ConfigError("--output=DIR is required: the folder for the new shards and report.json")
    if any(s.write_output for s in steps[:-1]):
        writer = [s.name for s in steps if s.write_output][0]
        raise ConfigError(f"{writer} writes the shards itself: make it the last step")
    output = Path(out.output)
    stale = prepare_output(output, input_spec, out.overwrite)
    tmp_dir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=output))
    try:
        reports = [Report("read", on_drop)]
        samples = iter_samples(input_spec, reports[0])
        steps = [dataclasses.replace(s, config=with_tmp_dir(s.config, tmp_dir)) for s in steps]
        last = steps[-1] if steps and steps[-1].write_output else None
        for step in steps[:-1] if last else steps:
            reports.append(Report(step.name, on_drop))
            samples = step.apply(samples, step.config, reports[-1])
        with ShardWriter(output, max_count=out.shard_max_count, max_bytes=out.shard_max_mb * 1e6) as writer:
            if last:
                reports.append(Report(last.name, on_drop))
                last.write_output(samples, last.config, reports[-1], writer)
            else:
                for sample in samples:
                    writer.write(sample)
            # before the renames: should we die between them and the final report, the new names are still ours
            write_json_atomic(output / REPORT_NAME, {"files": sorted(set(stale) | {p.name for p in writer.paths})})
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    remove_stale(output, stale, writer.paths)
    for r in reports:
        r.check()
    report = {"tool": tool, "input": input_spec, "output": str(output), "n_in": reports[0].n_in,
              "n_out": writer.n_written, "files": [p.name for p in writer.paths], **(extra or {}),
              "steps": [r.to_dict() for r in reports]}
    write_json_atomic(output / REPORT_NAME, report)
    return report


def print_summary(report: dict) -> None:
    print(format_funnel([Report.from_dict(d) for d in report["steps"]]))
    print(f"wrote {report['n_out']} of {report['n_in']} samples in {len(report['files'])} shards to "
          f"{report['output']} (details: {Path(report['output']) / REPORT_NAME})")


def usage(name: str, config_cls) -> str:
    return (f"Usage: python -m data_tools.curate.{name} INPUT --output=DIR [--key=value ...]\n"
            "INPUT: shards (paths, folders, {000000..000099} patterns, http(s)://, pipe:, '::'-joined sources).\n"
            f"Output keys:\n{describe_fields(OutputConfig)}\n{name} keys:\n{describe_fields(config_cls)}")


def parse_tool_args(argv: list[str], config_cls) -> tuple[str, OutputConfig, object]:
    """`INPUT --output=DIR --key=value ...` -> (input spec, OutputConfig, the tool's config). ConfigError for
    a missing input, an unknown key (listing the accepted ones) or a wrong type."""
    input_spec = None
    if argv and not argv[0].startswith("--"):
        input_spec, argv = argv[0], argv[1:]
    flags = split_argv(argv)
    input_spec = flags.pop("input", None) or input_spec
    if not input_spec:
        raise ConfigError("no INPUT: give the shards to read first (or --input=SPEC)")
    out_names = {f.name for f in dataclasses.fields(OutputConfig)}
    out_args = {k: v for k, v in flags.items() if k.replace("-", "_") in out_names}
    tool_args = {k: v for k, v in flags.items() if k.replace("-", "_") not in out_names}
    return input_spec, apply_overrides(OutputConfig(), out_args), apply_overrides(config_cls(), tool_args)


def run_tool(name: str, apply: Apply, config_cls, argv: list[str] | None = None,
             write_output: WriteOutput | None = None, check: Callable[[object], None] | None = None) -> int:
    """A tool's command line; returns the exit status (0 done, 2 bad arguments or output folder). `check(cfg)`
    (the tool's check_config) runs before the output folder is touched, so settings that cannot work change
    nothing."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "--help" in argv or "-h" in argv:
        print(usage(name, config_cls))
        return 0 if argv else 2
    try:
        input_spec, out, cfg = parse_tool_args(argv, config_cls)
        if check is not None:
            check(cfg)
        report = run_chain(input_spec, out, [Step(name, apply, cfg, write_output)], tool=name,
                           extra={"config": {name: dataclasses.asdict(cfg)}})
    except (ValueError, OSError) as e:  # ConfigError, ShardSpecError and refused output folders are ValueErrors
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    print_summary(report)
    return 0
