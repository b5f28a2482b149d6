"""Spilling a stream to disk for steps that must see the whole input before deciding (top-k% CLIP score,
SemDeDup): raw samples go to a temp tar in arrival order, one float32 row per sample to a flat file read
back in blocks, and keys to a file with an offset index. RAM stays flat however long the stream:
what is held is one sample and one row at a time; keys are looked up through an offset file on disk.

    with Spill(tmp_dir, dim=512) as spill:
        for sample, row in scored:
            spill.add(sample, row)
        rows = spill.rows()                    # [N, 512] on disk: rows[a:b], rows[idx] read copies
        for i, sample in enumerate(spill.samples()):   # the raw samples again, in order, byte-identical
            ...

The tar is our own (not a WebDataset shard): member `<index>/<field>` per field of the raw dict, so keys
with dots, `__url__` and any other field come back exactly as they went in.
"""
from __future__ import annotations

import io
import mmap
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

_STR, _BYTES = "s", "b"  # member name prefixes: the field held a str (utf-8 encoded) or bytes


class Spill:
    """Samples and one float32 row of width `dim` each, on disk under a fresh folder inside `tmp_dir`
    (default: the system's temp folder), removed on close."""

    def __init__(self, tmp_dir: str | None = None, dim: int = 1, prefix: str = "curate-spill-"):
        if tmp_dir is not None:
            Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_dir))
        self.dim, self.n = dim, 0
        self._tar = tarfile.open(self.dir / "samples.tar", "w")
        self._rows = open(self.dir / "rows.f32", "wb")
        self._keys = open(self.dir / "keys.txt", "wb")
        self._key_offsets = open(self.dir / "keys.i64", "wb")
        self._key_pos = 0

    def add(self, sample: dict, row) -> None:
        """Append a raw sample (str or bytes values) and its row ([dim] floats, or a scalar when dim is 1)."""
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        if not sample:
            raise ValueError("cannot spill an empty sample (it would leave no trace in the tar)")
        if row.shape != (self.dim,):
            raise ValueError(f"spill rows are {self.dim} wide, got shape {row.shape}")
        for field, value in sample.items():
            if isinstance(value, str):
                kind, data = _STR, value.encode("utf-8")
            elif isinstance(value, (bytes, bytearray)):
                kind, data = _BYTES, bytes(value)
            else:
                raise TypeError(f"sample {sample.get('__key__')!r}: field {field!r} is a {type(value).__name__}; "
                                f"raw samples hold str or bytes")
            info = tarfile.TarInfo(f"{self.n:012d}/{kind}{field}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
        self._tar.members = []  # TarFile keeps every TarInfo it wrote otherwise (~1 KB a sample)
        self._rows.write(row.tobytes())
        key = str(sample.get("__key__", "")).encode("utf-8", "surrogateescape")
        self._keys.write(key)
        self._key_offsets.write(np.int64(self._key_pos).tobytes())
        self._key_pos += len(key)
        self.n += 1

    def _finish_writing(self) -> None:
        if not self._tar.closed:
            self._tar.close()
            for f in (self._rows, self._keys, self._key_offsets):
                f.close()

    def rows(self) -> "RowFile":
        """The [N, dim] float32 rows on disk; index it like an array to read copies of some of them."""
        self._finish_writing()
        return RowFile(self.dir / "rows.f32", self.n, self.dim)

    def key(self, i: int) -> str:
        """The `__key__` of sample i."""
        self._finish_writing()
        with open(self.dir / "keys.i64", "rb") as f:
            f.seek(8 * i)
            start, *rest = np.frombuffer(f.read(16), dtype=np.int64).tolist()
        end = rest[0] if rest else self._key_pos
        with open(self.dir / "keys.txt", "rb") as f:
            f.seek(start)
            return f.read(end - start).decode("utf-8", "surrogateescape")

    def samples(self) -> Iterator[dict]:
        """The raw samples again, in the order they were added."""
        self._finish_writing()
        current, fields = None, {}
        with tarfile.open(self.dir / "samples.tar", "r|") as tf:
            for info in tf:
                index, name = info.name.split("/", 1)
                if index != current and current is not None:
                    yield fields
                    fields = {}
                current = index
                data = tf.extractfile(info).read()
                fields[name[1:]] = data.decode("utf-8") if name[0] == _STR else data
                tf.members = []  # stream mode would keep every TarInfo
        if current is not None:
            yield fields

    def close(self) -> None:
        self._finish_writing()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowFile:
    """An [N, dim] float32 file, indexed like a numpy array (`rows[a:b]`, `rows[index_array]`, `rows[:, 0]`):
    each read maps the file, copies what was asked for and unmaps it again, so the pages read do not stay in
    the process's resident memory (a long-lived np.memmap keeps every page it touched in RSS until it is
    closed: the whole file, after a pass over it)."""

    def __init__(self, path: Path, n: int, dim: int):
        self.path, self.shape = path, (n, dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        if self.shape[0] == 0:
            return np.zeros(self.shape, np.float32)[index]
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            rows = np.frombuffer(mapped, dtype=np.float32).reshape(self.shape)
            out = np.array(rows[index])
            del rows  # the mapping closes only once no array looks into it
        return out
