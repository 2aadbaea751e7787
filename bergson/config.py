"""Frozen dataclasses for the CLI, one flag per field, validated in ``__post_init__``.

``parser_for(cls)`` turns a dataclass into an ``argparse`` parser: the field's type gives the
flag's type (``bool`` fields become ``--flag``), ``metadata["help"]`` its help, ``choices``
its choices, and the default shows in ``--help``.  (Plain argparse keeps ``bergson --help``
well under the start-up budget; the dataclass CLI libraries cost more to import than the rest.)
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


def opt(default, help: str, choices=None, positional: bool = False):
    return field(default=default, metadata={"help": help, "choices": choices, "positional": positional})


@dataclass(frozen=True)
class BuildConfig:
    output: str = opt(None, "index directory to write", positional=True)
    model: typing.Optional[str] = opt(
        None, "local model directory or cached hub id (default: the embedded default model)"
    )
    dataset: typing.Optional[str] = opt(
        None, "saved dataset dir, .jsonl/.json/.csv/.parquet file, or cached hub id (default: embedded corpus)"
    )
    split: str = opt("train", "split of a DatasetDict or hub dataset")
    prompt_column: str = opt("text", "column holding the text (or the prompt, with --completion_column)")
    completion_column: typing.Optional[str] = opt(None, "column holding completions; only they are in the loss")
    projection_dim: int = opt(16, "p: each layer's feature is p*p values; 0 stores full gradients")
    projection_type: str = opt("rademacher", "random projection entries", ["rademacher", "gaussian"])
    normalizer: str = opt("adafactor", "second-moment preconditioning", ["adafactor", "adam", "none"])
    optimizer_state: typing.Optional[str] = opt(
        None, "take second moments from a saved optimizer state_dict (.pt) or a bergson normalizers .safetensors"
    )
    fit_examples: int = opt(1000, "examples used to fit the normalizer from data (when no --optimizer_state)")
    loss_reduction: str = opt(
        "sum", "per-document loss: sum or mean of token losses, or sum_log: sum of log token losses "
        "(weighs each token by 1/loss; best for fact tracing)", ["sum", "mean", "sum_log"]
    )
    precision: str = opt("float32", "dtype of the stored features", ["float32", "bfloat16", "float16"])
    model_dtype: str = opt("auto", "dtype to run the model in", ["auto", "float32", "bfloat16", "float16", "float64"])
    token_batch_size: int = opt(4096, "padded tokens per batch (documents are sorted by length)")
    max_length: typing.Optional[int] = opt(None, "truncate documents to this many tokens")
    max_examples: typing.Optional[int] = opt(None, "use only the first N rows of the dataset")
    target_modules: typing.Optional[str] = opt(None, "comma-separated name globs of layers to collect (default all)")
    include_bias: bool = opt(False, "also collect bias gradients")
    backend: str = opt("auto", "kernels: triton on CUDA when available", ["auto", "torch", "triton"])
    device: str = opt("auto", "torch device (auto: cuda if available, else cpu)")
    seed: int = opt(0, "projection seed")
    shard_rows: int = opt(4096, "rows per safetensors shard")
    resume: bool = opt(False, "continue an interrupted run in OUTPUT")
    overwrite: bool = opt(False, "replace whatever OUTPUT holds")
    allow_download: bool = opt(False, "let Hugging Face download hub ids (default: local paths and cache only)")
    progress: bool = opt(True, "show a progress bar")
    fsdp: bool = opt(False, "shard the model over the torchrun ranks with FSDP2 (for models that do not fit one device)")

    def __post_init__(self):
        if self.output is None:
            raise ValueError("an output directory is required")
        for name in ("projection_dim", "fit_examples", "token_batch_size", "shard_rows"):
            v = getattr(self, name)
            lo = 0 if name == "projection_dim" else 1
            if v < lo:
                raise ValueError(f"--{name} must be >= {lo}, got {v}")
        for name in ("max_length", "max_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name} must be >= 1, got {v}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")


@dataclass(frozen=True)
class ScoreOptions:
    score: str = opt("trackstar", "score kind", ["trackstar", "cosine", "inner", "one_sided"])
    top_k: int = opt(10, "training examples to return per query")
    lambda_k: typing.Optional[int] = opt(
        None, "component where TrackStar's eigenvalue curves cross (default: 1000/65536 of the feature size)"
    )
    damping: float = opt(1e-3, "damping of R before its inverse (square) root, relative to its mean eigenvalue")
    backend: str = opt("auto", "kernels for the query features", ["auto", "torch", "triton"])

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")
        if self.damping < 0:
            raise ValueError(f"--damping must be >= 0, got {self.damping}")


@dataclass(frozen=True)
class QueryConfig(ScoreOptions):
    index: str = opt(None, "index directory built by `bergson build`", positional=True)
    prompt: str = opt(None, "the query prompt")
    completion: typing.Optional[str] = opt(None, "the completion to explain (only its tokens are in the loss)")
    width: int = opt(100, "characters of each training text to show")

    def __post_init__(self):
        super().__post_init__()
        if self.prompt is None:
            raise ValueError("--prompt is required")


@dataclass(frozen=True)
class ScoreConfig(ScoreOptions):
    index: str = opt(None, "index directory built by `bergson build`", positional=True)
    queries: str = opt(None, "queries: a .jsonl/.json/.csv/.parquet file or a saved dataset directory")
    output: str = opt(None, "where to write the scores (.safetensors)")
    prompt_column: str = opt("prompt", "column of the queries holding prompts")
    completion_column: typing.Optional[str] = opt("completion", "column holding completions ('' for none)")
    all_pairs: bool = opt(False, "write the full [queries, rows] score matrix instead of the top-k")
    query_stats: bool = opt(True, "mix the queries' own autocorrelation into R (TrackStar's lambda rule)")

    def __post_init__(self):
        super().__post_init__()
        if self.queries is None or self.output is None:
            raise ValueError("--queries and --output are required")


@dataclass(frozen=True)
class TrackstarConfig(BuildConfig):
    queries: str = opt(None, "queries file (.jsonl/.json/.csv/.parquet) or saved dataset directory")
    query_prompt_column: str = opt("prompt", "column of the queries holding prompts")
    query_completion_column: typing.Optional[str] = opt("completion", "column holding completions ('' for none)")
    score: str = opt("trackstar", "score kind", ["trackstar", "cosine", "inner", "one_sided"])
    top_k: int = opt(10, "training examples to keep per query")
    lambda_k: typing.Optional[int] = opt(None, "component where the eigenvalue curves cross (default: scaled)")
    damping: float = opt(1e-3, "damping of R before its inverse square root")

    def __post_init__(self):
        super().__post_init__()
        if self.queries is None:
            raise ValueError("--queries is required")
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")


def _base_type(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def parser_for(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, _base_type(hints[f.name])
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=f.name.upper(), help=meta["help"])
        elif tp is bool:
            parser.add_argument(
                f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                help=f"{meta['help']} (default: {f.default})",
            )
        else:
            parser.add_argument(
                f"--{f.name}", type=tp, default=f.default, choices=meta.get("choices"),
                help=f"{meta['help']} (default: {f.default})",
            )
    return parser


def from_args(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
