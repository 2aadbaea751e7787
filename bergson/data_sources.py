"""Resolve the CLI's ``--model`` and ``--dataset`` strings, offline, with clear errors.

* model: a local directory (``save_pretrained`` layout) or a hub id found in the local Hugging
  Face cache; ``None`` is the embedded default model shipped in the package.
* dataset: a ``save_to_disk`` directory, a ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a
  ``.txt`` file (one document per line, column ``text``), or a hub id found in the local cache;
  ``None`` is the embedded default corpus.  Text files must be UTF-8: other bytes are an error
  naming the line, not a decoding failure halfway through a run.

Nothing is ever downloaded unless ``allow_download=True``: a hub id that is not cached fails at
once, saying to pass a local path, instead of waiting on network retries.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DEFAULT = "bergson:default"


def _offline(allow_download: bool) -> None:
    if not allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files of a local model directory (names, then contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def resolve_model_path(spec: str | None) -> tuple[str, bool]:
    """``(path or hub id, is_local)``."""
    if spec is None or spec == DEFAULT:
        from .default import model_path

        return model_path(), True
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"--model {spec} is a file; pass a model directory (with config.json) or a hub id")
        if not (p / "config.json").exists():
            raise ValueError(f"--model {spec} has no config.json: not a Hugging Face model directory")
        return str(p), True
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not an "org/name" hub id
        raise ValueError(f"--model {spec}: no such directory")
    return spec, False


def load_model(spec: str | None, *, dtype: str = "auto", device: str = "auto", allow_download: bool = False):
    """``(model, tokenizer, model_info, tokenizer_info)``; the infos identify them in the manifest."""
    path, local = resolve_model_path(spec)
    _offline(allow_download or local)
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float64": torch.float64}[dtype]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if spec is None or spec == DEFAULT:
        return _load_default(path, torch_dtype, dev)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"local_files_only": not allow_download}
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        if local:
            raise ValueError(f"cannot read the model config in {path}: {e}") from None
        raise ValueError(
            f"--model {spec!r} is not a local directory and is not in the local Hugging Face cache "
            "(no network access is attempted): pass a local model directory"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kw)
    except ValueError as e:
        raise ValueError(
            f"--model {spec or DEFAULT}: {type(config).__name__} is not a causal language model ({e})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {spec or DEFAULT}: no usable tokenizer next to the model: {e}") from None
    model.to(dev)
    info = {
        "id": spec or DEFAULT,
        "path": str(Path(path).resolve()) if local else None,
        "revision": getattr(config, "_commit_hash", None),
        "weights_sha256": weights_fingerprint(Path(path)) if local else None,
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    tok_info = {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                "hash": _tokenizer_hash(tokenizer)}
    return model, tokenizer, info, tok_info


def _load_default(path: str, dtype, device):
    """The embedded default through :mod:`bergson.default.fast` (no transformers import: the
    first batch comes seconds sooner; same parameter names, weights and logits)."""
    import json

    from .default import fast

    model, tokenizer = fast.load(path, dtype)
    model.to(device)
    cfg = json.loads((Path(path) / "config.json").read_text())
    info = {
        "id": DEFAULT,
        "path": None,  # machine-independent identity for the shipped model
        "revision": None,
        "weights_sha256": weights_fingerprint(Path(path)),
        "class": cfg["architectures"][0],
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    # the class transformers 5 loads this tokenizer as: an index built either way is the same run
    tok_info = {"class": "TokenizersBackend", "vocab_size": len(tokenizer), "hash": _tokenizer_hash(tokenizer)}
    return model, tokenizer, info, tok_info


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_dataset(spec: str | None, *, split: str = "train", allow_download: bool = False):
    """``(datasets.Dataset, info)`` where ``info`` lets the dataset be identified and re-loaded."""
    import datasets

    if spec is None or spec == DEFAULT:
        from .default import dataset

        ds = dataset()
        return ds, {"id": DEFAULT, "split": None, "fingerprint": ds._fingerprint, "num_rows": len(ds)}
    p = Path(spec).expanduser()
    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ValueError(f"--dataset {spec} is a directory but not a saved dataset: {e}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split {split!r} is not in {spec}; available splits: {list(loaded)}")
            ds = loaded[split]
        else:
            ds = loaded
        info = {"id": str(p.resolve()), "split": split if isinstance(loaded, datasets.DatasetDict) else None,
                "fingerprint": ds._fingerprint, "num_rows": len(ds)}
        return ds, info
    if p.exists():
        kind = DATA_SUFFIXES.get(p.suffix.lower())
        if kind is None:
            raise ValueError(f"--dataset {spec}: unsupported file type {p.suffix!r}; use one of {sorted(DATA_SUFFIXES)}")
        if kind != "parquet":
            check_utf8(p, f"--dataset {spec}")
        reader = {"json": datasets.Dataset.from_json, "csv": datasets.Dataset.from_csv,
                  "parquet": datasets.Dataset.from_parquet, "text": datasets.Dataset.from_text}[kind]
        try:
            ds = reader(str(p), keep_in_memory=True)
        except Exception as e:  # the readers raise many types for malformed files
            raise ValueError(f"--dataset {spec}: cannot read it as {kind}: {e}") from None
        info = {"id": str(p.resolve()), "split": None, "fingerprint": _file_sha256(p), "num_rows": len(ds)}
        return ds, info
    if spec.startswith((".", "/", "~")) or p.suffix.lower() in DATA_SUFFIXES:
        raise ValueError(f"--dataset {spec}: no such file or directory")
    _offline(allow_download)
    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:
        raise ValueError(
            f"--dataset {spec!r} is not a local path and could not be loaded from the local cache "
            f"(no network access is attempted; pass a local file or saved dataset directory): {type(e).__name__}"
        ) from None
    return ds, {"id": spec, "split": split, "fingerprint": ds._fingerprint, "num_rows": len(ds)}


def check_utf8(path: Path, what: str, chunk: int = 1 << 22) -> None:
    """Raise a ``ValueError`` naming the line and byte when ``path`` is not valid UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = min(max(e.start, 0), max(len(block) - 1, 0))
                byte = f"byte 0x{block[at]:02x}" if block else "a truncated character at the end"
                where = line + block[:at].count(b"\n")
                raise ValueError(
                    f"{what} is not valid UTF-8: {byte} on line {where} "
                    f"(offset {offset + at}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not block:
                return
            line += block.count(b"\n")
            offset += len(block)


def _file_sha256(p: Path) -> str:
    from .storage import sha256_file

    return sha256_file(p)


def load_dataset_from_manifest(info: dict):
    """Re-load the dataset an index was built from (for ``GradientIndex.to_dataset``)."""
    spec = info.get("id")
    if spec is None:
        raise ValueError("the index was built from an in-memory dataset, which cannot be re-loaded: pass it")
    ds, _ = load_dataset(None if spec == DEFAULT else spec, split=info.get("split") or "train")
    if info.get("max_examples") is not None and info["max_examples"] < len(ds):
        ds = ds.select(range(info["max_examples"]))
    return ds
