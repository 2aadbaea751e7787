"""The on-disk gradient index: safetensors shards plus a ``manifest.json``.

Layout of an index directory::

    manifest.json                 format, identity (model, tokenizer, dataset), settings, layout, shards
    normalizers.safetensors       the second moments used (when any), so queries use the same ones
    shards/00000.safetensors      "gradients" [rows, D] (float32 | bfloat16 | float16), "row_ids" [rows] int64,
                                  "loss" [rows] float32
    shards/00001.safetensors      ...

Rows are stored in collection order (documents sorted by length); ``row_ids`` name the dataset
row of each.  Every file is written to a temporary name, flushed and renamed, and the manifest
is rewritten only after a shard is complete, so a crash (or a full disk, or Ctrl-C) leaves a
valid index of the shards finished so far, which ``resume`` continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

FORMAT = "bergson-index"
VERSION = 1
MANIFEST = "manifest.json"
NORMALIZERS = "normalizers.safetensors"
SHARD_DIR = "shards"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys of the manifest that must agree for two runs to be "the same run".
IDENTITY_KEYS = ("model", "tokenizer", "dataset", "settings", "modules", "feature_dim", "dtype", "shard_rows")


class IndexFormatError(ValueError):
    """A problem with an index directory (missing, corrupt, or a different run)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def describe_difference(old: dict, new: dict, keys=IDENTITY_KEYS) -> list[str]:
    """Human-readable list of what differs between two manifests' identities."""
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{k}.{sub}: {a.get(sub)!r} (on disk) != {b.get(sub)!r} (this run)")
        elif k == "modules":
            out.append("modules: the collected layers or their shapes differ")
        else:
            out.append(f"{k}: {a!r} (on disk) != {b!r} (this run)")
    return out


class ShardWriter:
    """Buffer feature rows and write them as complete, atomically renamed safetensors shards.

    ``identity`` holds everything that defines the run (see ``IDENTITY_KEYS``).  Opening a
    directory that holds a manifest checks it against ``identity``: the same unfinished run is
    continued with ``resume=True``; a different one is refused unless ``overwrite=True``.
    """

    def __init__(self, path: str | os.PathLike, identity: dict, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.identity = identity
        self.shard_rows = int(identity["shard_rows"])
        if self.path.exists() and not self.path.is_dir():
            raise IndexFormatError(f"output path {self.path} exists and is a file, not a directory")
        manifest_path = self.path / MANIFEST
        self.manifest: dict
        if manifest_path.exists() and not overwrite:
            old = _read_manifest(self.path)
            diff = describe_difference(old, identity)
            if diff:
                raise IndexFormatError(
                    f"{self.path} holds a different run; pass --overwrite (overwrite=True) to replace it. "
                    "Differences:\n  " + "\n  ".join(diff)
                )
            if old.get("complete"):
                raise IndexFormatError(f"{self.path} already holds this complete index; pass --overwrite to rebuild it")
            if not resume:
                raise IndexFormatError(
                    f"{self.path} holds an interrupted run of the same settings "
                    f"({old['num_rows']} rows written); pass --resume to continue it or --overwrite to restart"
                )
            self.manifest = old
            self._drop_unlisted_shards()
        else:
            if self.path.exists() and any(self.path.iterdir()):
                if not overwrite:
                    raise IndexFormatError(
                        f"{self.path} is not empty and holds no bergson index; "
                        "choose another path or pass --overwrite"
                    )
                self._clear()
            self.manifest = {
                "format": FORMAT,
                "version": VERSION,
                **identity,
                "num_rows": 0,
                "batches_done": 0,
                "complete": False,
                "shards": [],
            }
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._rows: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._buffered = 0
        self._batches_buffered = 0
        if not resume or not manifest_path.exists():
            self._write_manifest()

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def batches_done(self) -> int:
        return int(self.manifest["batches_done"])

    def _clear(self):
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _drop_unlisted_shards(self):
        listed = {s["file"] for s in self.manifest["shards"]}
        shard_dir = self.path / SHARD_DIR
        if shard_dir.exists():
            for f in shard_dir.iterdir():
                if f"{SHARD_DIR}/{f.name}" not in listed:
                    f.unlink()  # a shard from after the last manifest update, or a temporary file

    def _write_manifest(self):
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # -- writing -----------------------------------------------------------------------------
    def add(self, row_ids: torch.Tensor, rows: torch.Tensor, losses: torch.Tensor) -> None:
        """Add one batch of rows; a shard is written once ``shard_rows`` rows are buffered."""
        dtype = STORE_DTYPES[self.identity["dtype"]]
        self._rows.append(rows.detach().to("cpu", dtype))
        self._ids.append(row_ids.detach().to("cpu", torch.int64))
        self._losses.append(losses.detach().to("cpu", torch.float32))
        self._buffered += rows.shape[0]
        self._batches_buffered += 1
        if self._buffered >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        from safetensors.torch import save

        rows = torch.cat(self._rows).contiguous()
        ids = torch.cat(self._ids).contiguous()
        losses = torch.cat(self._losses).contiguous()
        k = len(self.manifest["shards"])
        name = f"{SHARD_DIR}/{k:05d}.safetensors"
        data = save({"gradients": rows, "row_ids": ids, "loss": losses}, metadata={"format": FORMAT})
        atomic_write_bytes(self.path / name, data)
        start = self.manifest["num_rows"]
        self.manifest["shards"].append(
            {
                "file": name,
                "row_start": start,
                "row_end": start + rows.shape[0],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self.manifest["num_rows"] = start + rows.shape[0]
        self.manifest["batches_done"] += self._batches_buffered
        self._write_manifest()
        self._rows, self._ids, self._losses, self._buffered, self._batches_buffered = [], [], [], 0, 0

    def close(self, *, complete: bool = True, extra: dict | None = None) -> None:
        self.flush()
        if extra:
            self.manifest.update(extra)
        self.manifest["complete"] = complete
        self._write_manifest()


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise IndexFormatError(f"{path} is not a bergson index: no {MANIFEST}")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{mpath} is corrupt: {e}") from None
    if m.get("format") != FORMAT:
        raise IndexFormatError(f"{mpath} is not a bergson index manifest (format={m.get('format')!r})")
    if m.get("version") != VERSION:
        raise IndexFormatError(f"{mpath} has format version {m.get('version')}, this bergson reads {VERSION}")
    return m


@dataclass(frozen=True)
class ModuleSlice:
    name: str
    out_features: int
    in_features: int
    offset: int
    size: int

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class GradientIndex:
    """Read-only view of an index directory (see :func:`load_index`)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.verify = verify
        self._verified: set[str] = set()
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            if not f.exists():
                raise IndexFormatError(f"shard {s['file']} of {self.path} is missing")
            size = f.stat().st_size
            if size != s["bytes"]:
                raise IndexFormatError(
                    f"shard {s['file']} of {self.path} is truncated or corrupt: {size} bytes, manifest says {s['bytes']}"
                )

    # -- metadata ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def feature_dim(self) -> int:
        return int(self.manifest["feature_dim"])

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def modules(self) -> list[ModuleSlice]:
        return [ModuleSlice(m["name"], m["out"], m["in"], m["offset"], m["size"]) for m in self.manifest["modules"]]

    def module(self, name: str) -> ModuleSlice:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"{name!r} is not a module of this index; modules: {[m.name for m in self.modules][:8]}")

    def normalizers(self):
        from .normalizers import load_normalizers

        p = self.path / NORMALIZERS
        return load_normalizers(p) if p.exists() else None

    # -- data --------------------------------------------------------------------------------
    def _open(self, shard: dict):
        from safetensors import SafetensorError, safe_open

        f = self.path / shard["file"]
        if self.verify and shard["file"] not in self._verified:
            if sha256_file(f) != shard["sha256"]:
                raise IndexFormatError(f"shard {shard['file']} of {self.path} is corrupt: sha256 does not match the manifest")
            self._verified.add(shard["file"])
        try:
            return safe_open(str(f), framework="pt", device="cpu")
        except SafetensorError as e:
            raise IndexFormatError(f"shard {shard['file']} of {self.path} is corrupt: {e}") from None

    def iter_chunks(
        self, chunk_rows: int = 8192, *, module: str | None = None, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(row_ids [c], features [c, D or module size])`` chunk by chunk (memory-mapped
        reads; never the whole index at once).  ``module`` restricts to one layer's columns."""
        cols = self.module(module).columns if module is not None else slice(None)
        for shard in self.manifest["shards"]:
            with self._open(shard) as f:
                g, ids = f.get_slice("gradients"), f.get_slice("row_ids")
                n = shard["row_end"] - shard["row_start"]
                if g.get_shape() != [n, self.feature_dim]:
                    raise IndexFormatError(f"shard {shard['file']} has shape {g.get_shape()}, expected {[n, self.feature_dim]}")
                for s in range(0, n, chunk_rows):
                    e = min(n, s + chunk_rows)
                    x = g[s:e, cols]
                    yield ids[s:e], (x if dtype is None else x.to(dtype))

    def load(self, *, module: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows sorted by row id: ``(row_ids [N], features [N, D])`` (loads into memory)."""
        ids, feats = zip(*self.iter_chunks(module=module, dtype=dtype)) if len(self) else ((), ())
        if not ids:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.feature_dim, dtype=dtype)
        ids, feats = torch.cat(ids), torch.cat(feats)
        order = torch.argsort(ids)
        return ids[order], feats[order]

    def to_dataset(self, dataset=None):
        """The source dataset (re-loaded from the manifest unless given) with a ``gradients``
        column in dataset row order (rows not in the index get zeros)."""
        from .data import join_columns

        if dataset is None:
            from .data_sources import load_dataset_from_manifest

            dataset = load_dataset_from_manifest(self.manifest["dataset"])
        n = len(dataset)
        ids, feats = self.load()
        if len(ids) and int(ids.max()) >= n:
            raise IndexFormatError(f"the index has row id {int(ids.max())} but the dataset has only {n} rows")
        full = torch.zeros(n, self.feature_dim, dtype=torch.float32)
        full[ids] = feats
        if "gradients" in dataset.column_names:
            dataset = dataset.remove_columns("gradients")
        return join_columns(dataset, full)

    def __repr__(self) -> str:
        return (
            f"GradientIndex({str(self.path)!r}, rows={len(self)}, feature_dim={self.feature_dim}, "
            f"dtype={self.manifest['dtype']}, modules={len(self.manifest['modules'])}, complete={self.complete})"
        )


def load_index(path: str | os.PathLike, *, verify: bool = True) -> GradientIndex:
    """Open an index directory read-only.  ``verify`` checks each shard's sha256 on first read
    (sizes are always checked on open): a truncated or corrupt shard raises, naming the file."""
    return GradientIndex(path, verify=verify)
