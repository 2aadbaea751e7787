"""The on-disk gradient index: safetensors shards plus a ``manifest.json``.

Layout of an index directory::

    manifest.json                 format, identity (model, tokenizer, dataset), settings, layout, shards
    normalizers.safetensors       the second moments used (when any), so queries use the same ones
    shards/00000.safetensors      "gradients" [rows, D] (float32 | bfloat16 | float16), "row_ids" [rows] int64,
                                  "loss" [rows] float32
    shards/00001.safetensors      ...

Rows are stored in collection order (documents sorted by length); ``row_ids`` name the dataset
row of each, and each shard entry of the manifest lists the batches it holds.  Every file is
written to a temporary name, flushed and renamed, and the manifest is rewritten only after a
shard is complete, so a crash (or a full disk, or Ctrl-C) leaves a valid index of the shards
finished so far, which ``resume`` continues (after checking every listed shard's sha256).

With several ranks (:mod:`bergson.distributed`) each rank lists its finished shards in its own
journal, ``progress/rank-R.json``; rank 0 merges the journals into the manifest when every rank
is done, or when a resumed run starts.  ``.lock`` holds an exclusive ``flock`` of the writing
run (with its pid and host): a second run on the same directory is refused while the first is
alive, and a lock left by a killed run does not block ``--resume`` (the kernel drops the lock
with its holder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

FORMAT = "bergson-index"
VERSION = 1
MANIFEST = "manifest.json"
NORMALIZERS = "normalizers.safetensors"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
LOCK = ".lock"
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys of the manifest that must agree for two runs to be "the same run".
IDENTITY_KEYS = (
    "model", "tokenizer", "dataset", "settings", "modules", "feature_dim", "dtype", "shard_rows", "token_batch_size"
)


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


class DirLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``DIR/.lock`` naming its holder.

    The kernel releases a ``flock`` when its holder exits, however it exits (SIGKILL too), so
    a lock file left behind by a killed run never blocks the next one.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self._file = None

    def acquire(self) -> "DirLock":
        import fcntl

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except PermissionError as e:
            raise IndexFormatError(
                f"cannot write to the output directory {self.directory}: {e.strerror} "
                "(a read-only directory or file system?); choose a writable output path"
            ) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown pid"
            f.close()
            raise IndexFormatError(
                f"{self.directory} is being written by another bergson run ({holder}); wait for it "
                "to finish, or choose another output directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _shard_number(file: str) -> int:
    return int(Path(file).stem)


def done_batches(manifest: dict) -> set[int]:
    """The batches whose rows the manifest's shards hold."""
    done = set(range(int(manifest.get("legacy_batches", 0))))
    for s in manifest["shards"]:
        done.update(s.get("batches", ()))
    return done


def _renumber(manifest: dict) -> None:
    """Shards sorted by number; ``row_start``/``row_end``, ``num_rows`` and ``batches_done`` recomputed."""
    manifest["shards"].sort(key=lambda e: _shard_number(e["file"]))
    start = 0
    for e in manifest["shards"]:
        n = e["row_end"] - e["row_start"]
        e["row_start"], e["row_end"] = start, start + n
        start += n
    manifest["num_rows"] = start
    manifest["batches_done"] = len(done_batches(manifest))


def _journals(path: Path) -> list[Path]:
    d = path / PROGRESS_DIR
    return sorted(d.glob("rank-*.json")) if d.is_dir() else []


def _merge_journals(path: Path, manifest: dict) -> dict:
    """``manifest`` plus the shards the ranks' journals list (idempotent: listed files are kept once)."""
    listed = {e["file"] for e in manifest["shards"]}
    for j in _journals(path):
        try:
            entries = json.loads(j.read_text())["shards"]
        except (json.JSONDecodeError, KeyError, OSError):
            warnings.warn(f"{j} is unreadable: the rows of its shards will be recomputed", stacklevel=2)
            continue
        for e in entries:
            if e["file"] not in listed:
                manifest["shards"].append(e)
                listed.add(e["file"])
    _renumber(manifest)
    return manifest


def _remove_journals(path: Path) -> None:
    for j in _journals(path):
        j.unlink()


class ShardWriter:
    """Buffer feature rows and write them as complete, atomically renamed safetensors shards.

    ``identity`` holds everything that defines the run (see ``IDENTITY_KEYS``).  Rank 0 (the
    only process, or rank 0 of ``world_size``) locks the directory and prepares it: a manifest
    holding the same unfinished run is continued with ``resume=True`` (journals merged, every
    listed shard's sha256 checked, unlisted files dropped); a different run is refused unless
    ``overwrite=True``.  Other ranks open the directory rank 0 prepared.  One process appends
    each finished shard to the manifest; with ``world_size > 1`` each rank lists its shards in
    its journal and :meth:`finalize` (rank 0, once all ranks flushed) merges them.
    """

    def __init__(
        self, path: str | os.PathLike, identity: dict, *, resume: bool = False, overwrite: bool = False,
        rank: int = 0, world_size: int = 1,
    ):
        self.path = Path(path)
        self.identity = identity
        self.shard_rows = int(identity["shard_rows"])
        self.rank, self.world_size = rank, world_size
        self.lock: DirLock | None = None
        if self.path.exists() and not self.path.is_dir():
            raise IndexFormatError(f"output path {self.path} exists and is a file, not a directory")
        if rank == 0:
            self.lock = DirLock(self.path).acquire()
            try:
                self.manifest = self._prepare(resume, overwrite)
            except BaseException:
                self.release()
                raise
        else:
            self.manifest = _read_manifest(self.path)  # prepared by rank 0 before this rank starts
        self.done_batches = done_batches(self.manifest)
        self._first = max((_shard_number(e["file"]) for e in self.manifest["shards"]), default=-1) + 1
        self._own: list[dict] = []  # this rank's shard entries (its journal) when world_size > 1
        self._written = 0
        self._journal = self.path / PROGRESS_DIR / f"rank-{rank:05d}.json"
        self._reset_buffer()

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def batches_done(self) -> int:
        return len(self.done_batches)

    def _prepare(self, resume: bool, overwrite: bool) -> dict:
        manifest_path = self.path / MANIFEST
        if manifest_path.exists() and not overwrite:
            old = _read_manifest(self.path)
            diff = describe_difference(old, self.identity)
            if diff:
                raise IndexFormatError(
                    f"{self.path} holds a different run; pass --overwrite (overwrite=True) to replace it. "
                    "Differences:\n  " + "\n  ".join(diff)
                )
            if old.get("complete"):
                raise IndexFormatError(f"{self.path} already holds this complete index; pass --overwrite to rebuild it")
            if "legacy_batches" not in old and any("batches" not in e for e in old["shards"]):
                old["legacy_batches"] = old["batches_done"]  # written before shards listed their batches
            manifest = _merge_journals(self.path, old)
            if not resume:
                raise IndexFormatError(
                    f"{self.path} holds an interrupted run of the same settings "
                    f"({manifest['num_rows']} rows written); pass --resume to continue it or --overwrite to restart"
                )
            manifest = self._verify_listed(manifest)
            self._drop_unlisted_shards(manifest)
            atomic_write_json(manifest_path, manifest)
            _remove_journals(self.path)
        else:
            if any(p.name != LOCK for p in self.path.iterdir()):
                if not overwrite:
                    raise IndexFormatError(
                        f"{self.path} is not empty and holds no bergson index; "
                        "choose another path or pass --overwrite"
                    )
                self._clear()
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                **self.identity,
                "num_rows": 0,
                "batches_done": 0,
                "complete": False,
                "shards": [],
            }
            atomic_write_json(manifest_path, manifest)
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (self.path / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        return manifest

    def _verify_listed(self, manifest: dict) -> dict:
        """Resuming: a missing listed shard is recomputed (warning); a corrupt one raises, named."""
        kept = []
        for e in manifest["shards"]:
            f = self.path / e["file"]
            if not f.exists():
                warnings.warn(f"shard {e['file']} of {self.path} is missing: its rows will be recomputed", stacklevel=3)
                continue
            if f.stat().st_size != e["bytes"] or sha256_file(f) != e["sha256"]:
                raise IndexFormatError(
                    f"shard {e['file']} of {self.path} is truncated or corrupt (its size or sha256 does not "
                    "match the manifest); delete that file and rerun with --resume to recompute its rows"
                )
            kept.append(e)
        if len(kept) != len(manifest["shards"]):
            if "legacy_batches" in manifest:
                raise IndexFormatError(
                    f"a shard of {self.path} is missing and this index predates per-shard batch lists: "
                    "rebuild it with --overwrite"
                )
            manifest["shards"] = kept
            _renumber(manifest)
        return manifest

    def _clear(self):
        for child in self.path.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _drop_unlisted_shards(self, manifest: dict):
        listed = {s["file"] for s in manifest["shards"]}
        shard_dir = self.path / SHARD_DIR
        if shard_dir.exists():
            for f in shard_dir.iterdir():
                if f"{SHARD_DIR}/{f.name}" not in listed:
                    f.unlink()  # a shard from after the last manifest update, or a temporary file

    def _write_manifest(self):
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def _reset_buffer(self):
        self._rows: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._losses: list[torch.Tensor] = []
        self._batch_ids: list[int] = []
        self._skipped: list[int] = []
        self._buffered = 0

    # -- writing -----------------------------------------------------------------------------
    def add(
        self, row_ids: torch.Tensor, rows: torch.Tensor, losses: torch.Tensor, *, batch: int | None = None,
        skipped=(),
    ) -> None:
        """Add one batch of rows (``batch``: its number in the run's batch plan; ``skipped``: row
        ids whose loss was not finite, stored as zeros); a shard is written once ``shard_rows``
        rows are buffered."""
        dtype = STORE_DTYPES[self.identity["dtype"]]
        # copies: the caller may reuse its buffers
        self._rows.append(rows.detach().to("cpu", dtype, copy=True))
        self._ids.append(row_ids.detach().to("cpu", torch.int64, copy=True))
        self._losses.append(losses.detach().to("cpu", torch.float32, copy=True))
        self._buffered += rows.shape[0]
        if batch is not None:
            self._batch_ids.append(int(batch))
        self._skipped.extend(int(i) for i in skipped)
        if self._buffered >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        from safetensors.torch import save

        rows = torch.cat(self._rows).contiguous()
        ids = torch.cat(self._ids).contiguous()
        losses = torch.cat(self._losses).contiguous()
        number = self._first + self._written * self.world_size + self.rank  # unique across ranks
        name = f"{SHARD_DIR}/{number:05d}.safetensors"
        data = save({"gradients": rows, "row_ids": ids, "loss": losses}, metadata={"format": FORMAT})
        atomic_write_bytes(self.path / name, data)
        entry = {"file": name, "row_start": 0, "row_end": rows.shape[0], "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest(), "batches": self._batch_ids}
        if self._skipped:
            entry["skipped"] = sorted(self._skipped)
        if self.world_size == 1:
            start = self.manifest["num_rows"]
            entry["row_start"], entry["row_end"] = start, start + rows.shape[0]
            self.manifest["shards"].append(entry)
            self.manifest["num_rows"] = start + rows.shape[0]
            self.done_batches.update(self._batch_ids)
            self.manifest["batches_done"] = len(self.done_batches)
            self._write_manifest()
        else:
            self._own.append(entry)
            atomic_write_json(self._journal, {"rank": self.rank, "world_size": self.world_size, "shards": self._own})
        self._written += 1
        self._reset_buffer()

    def finalize(self, *, complete: bool = True, extra: dict | None = None) -> None:
        """Rank 0, after every rank flushed: merge the journals, mark the index complete, unlock."""
        try:
            if self.world_size > 1:
                self.manifest = _merge_journals(self.path, _read_manifest(self.path))
            skipped = sorted(i for e in self.manifest["shards"] for i in e.get("skipped", ()))
            if skipped:
                self.manifest["skipped_rows"] = skipped
            if extra:
                self.manifest.update(extra)
            self.manifest["complete"] = complete
            self._write_manifest()
            if complete:
                _remove_journals(self.path)
                try:
                    (self.path / PROGRESS_DIR).rmdir()
                except OSError:
                    pass
        finally:
            self.release()

    def close(self, *, complete: bool = True, extra: dict | None = None) -> None:
        """One process: write what is buffered, then :meth:`finalize`."""
        self.flush()
        self.finalize(complete=complete, extra=extra)

    def release(self) -> None:
        """Drop the directory lock (rank 0; also after a failure, so the same process can resume)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
    def skipped_rows(self) -> list[int]:
        """Row ids whose loss was not finite (NaN/inf): stored as zero rows."""
        return list(self.manifest.get("skipped_rows", []))

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
        if not p.exists():
            if self.settings.get("normalizer") in ("adafactor", "adam"):
                raise IndexFormatError(
                    f"{p} is missing, but the index was built with {self.settings['normalizer']} normalizers: "
                    "query features would not match its rows; restore the file or rebuild the index"
                )
            return None
        return load_normalizers(p)

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
        self, chunk_rows: int = 8192, *, module: str | None = None, dtype: torch.dtype | None = None,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(row_ids [c], features [c, D or module size])`` chunk by chunk (memory-mapped
        reads; never the whole index at once).  ``module`` restricts to one layer's columns;
        ``part=(rank, world)`` to every ``world``-th shard from ``rank`` (a rank's share)."""
        cols = self.module(module).columns if module is not None else slice(None)
        shards = self.manifest["shards"]
        if part is not None:
            shards = shards[part[0] :: part[1]]
        for shard in shards:
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
