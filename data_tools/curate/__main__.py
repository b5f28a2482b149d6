"""python -m data_tools.curate CONFIG.yaml [--input=SPEC] [--output=DIR] [--overwrite=true]: run a curation
pipeline (data_tools.curate.pipeline) and print its funnel."""
from __future__ import annotations

import sys

from mm.config import split_argv

from data_tools.curate.cli import print_summary
from data_tools.curate.pipeline import STEPS, TOP_KEYS, load_pipeline, run_pipeline

USAGE = f"""Usage: python -m data_tools.curate CONFIG.yaml [--key=value ...]
Runs the steps CONFIG.yaml lists, in one streaming pass, into new shards and a report.json.
Top-level keys (in the file, or overridden here): {', '.join(k for k in TOP_KEYS if k != 'steps')}.
Steps: {', '.join(STEPS)}; `python -m data_tools.curate.<step> --help` lists a step's keys.
Example: data_tools/curate/examples/curate.yaml"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "--help" in argv or "-h" in argv or argv[0].startswith("--"):
        print(USAGE)
        return 0 if "--help" in argv or "-h" in argv else 2
    try:
        pipeline = load_pipeline(argv[0], split_argv(argv[1:]))
        report = run_pipeline(pipeline, source=argv[0])
    except (ValueError, OSError) as e:  # ConfigError, a bad output folder, missing shards: a message, not a trace
        print(f"curate: {e}", file=sys.stderr)
        return 2
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
