"""Data curation for image-text and speech shards: dedup, filters, CLIP-score filtering, balancing, resharding.

Every tool is a generator stage `apply(samples, cfg, report)` over raw WebDataset samples, runnable alone
(`python -m data_tools.curate.<tool> INPUT --output=DIR --key=value`, `--help` lists the keys) or chained
from a YAML file (`python -m data_tools.curate curate.yaml`). Each writes new shards and a report.json of
what was kept and dropped, per reason, with examples; the input is never changed.
"""
