"""Run open_clip_train with our JSON model configs registered, for benchmarks/clip_vs_open_clip.py.

    python benchmarks/open_clip_train_shim.py recipes/clip/configs/models --model mm-tiny-rn-64 --train-data ...

Everything after the config dir goes to `open_clip_train.main.main` unchanged. One compatibility fix:
webdataset >= 0.2.96 ends every shard with an `{}` EOF marker that open_clip_train 3.3.0's
`group_by_keys_nothrow` cannot read (KeyError: 'fname'; webdataset/webdataset#384,
mlfoundations/open_clip#935). We pass `eof_value=None`, the fix given there; it changes no samples.
"""
import functools
import sys

import open_clip
import open_clip_train.data
from open_clip_train.main import main

if __name__ == "__main__":
    open_clip.add_model_config(sys.argv[1])
    open_clip_train.data.tar_file_expander = functools.partial(open_clip_train.data.tar_file_expander, eof_value=None)
    sys.exit(main(sys.argv[2:]))
