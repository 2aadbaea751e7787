"""Attribution: score queries against an index (``Attributor``), all pairs or top-k to disk.

Query features are computed exactly like the index's: the manifest's projection seed and type,
layers, loss reduction and the index's saved normalizers.  A model whose layers or weights
differ from the index's is refused, naming the difference.

Statistics: ``R_train`` (per-layer ``E[g gᵀ]`` of the index rows) is accumulated once by
streaming the shards and cached next to the index (``autocorrelation.safetensors``).
``R_query`` comes from :meth:`Attributor.fit_query_stats` (a query set); without it TrackStar
uses ``R_train`` alone (``λ = 0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .score import SCORES, Autocorrelation, Preconditioner, build_preconditioner, stream_topk, unit_normalize
from .storage import GradientIndex, IndexFormatError, atomic_write_bytes, load_index

AUTOCORR = "autocorrelation.safetensors"


@dataclass
class Hit:
    rank: int
    score: float
    row_id: int
    text: str | None


class Attributor:
    """Rank an index's training examples by how much they drove each query's completion.

    Args:
        index: a :class:`GradientIndex` or its path.
        model, tokenizer: the model the index was built with (default: re-loaded from the
            manifest — a local directory or the embedded default).
        score: ``"trackstar"`` (default), ``"cosine"``, ``"inner"`` or ``"one_sided"``.
        lambda_k: component at which TrackStar's eigenvalue curves cross (default: the paper's
            1000/65536 of the feature size).
        damping: ``R + damping·mean(eig(R))·I`` before inverting.
        chunk_rows: rows per streamed chunk.
        dataset: the training dataset, for the texts of hits (default: re-loaded from the
            manifest when the index was built from a file, a saved dataset or the default).
    """

    def __init__(
        self,
        index: GradientIndex | str | os.PathLike,
        model=None,
        tokenizer=None,
        *,
        score: str = "trackstar",
        lambda_k: int | None = None,
        damping: float = 1e-3,
        chunk_rows: int = 8192,
        backend: str = "auto",
        progress: bool = False,
        dataset=None,
        distributed: bool | None = None,
    ):
        from . import distributed as dist_

        self._group = dist_.current(distributed)  # every rank scores a share of the shards
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.index = index if isinstance(index, GradientIndex) else load_index(index)
        if not self.index.complete:
            raise IndexFormatError(f"{self.index.path} is an unfinished build: finish it with --resume first")
        if len(self.index) == 0:
            raise IndexFormatError(f"{self.index.path} holds no rows")
        m = self.index.manifest
        if model is None:
            from .data_sources import DEFAULT, load_model

            spec = m["model"].get("path") or m["model"].get("id")
            model, tokenizer, _, _ = load_model(None if spec == DEFAULT else spec)
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to turn query text into tokens")
        self.model, self.tokenizer = model, tokenizer
        self._check_model()
        self.score, self.lambda_k, self.damping = score, lambda_k, damping
        self.chunk_rows, self.backend, self.progress = chunk_rows, backend, progress
        self.blocks = [(mod.name, mod.offset, mod.size) for mod in self.index.modules]
        self._r_train: dict | None = None
        self._r_query: dict | None = None
        self._precond: dict[float, Preconditioner] = {}
        self._dataset = dataset
        self._texts = None

    # -- compatibility -----------------------------------------------------------------------
    def _check_model(self) -> None:
        from .collect import model_fingerprint
        from .layers import find_layers

        m = self.index.manifest
        want = {x["name"]: (x["out"], x["in"]) for x in m["modules"]}
        try:
            have = {n: (s.out_features, s.in_features) for n, s in find_layers(self.model, list(want)).items()}
        except ValueError as e:
            raise ValueError(f"the model does not match the index {self.index.path}: {e}") from None
        diff = [f"{n}: index {want[n]} vs model {have.get(n, 'missing')}" for n in want if have.get(n) != want[n]]
        if diff:
            raise ValueError(f"the model's layers differ from the index {self.index.path}: " + "; ".join(diff[:5]))
        fp = m["model"].get("fingerprint")
        if fp is not None and fp != model_fingerprint(self.model):
            raise ValueError(
                f"the model's weights differ from those the index {self.index.path} was built with "
                f"({m['model'].get('id')}): attribution needs the same model"
            )

    # -- features ----------------------------------------------------------------------------
    def features(self, prompts: Sequence[str], completions: Sequence[str] | None = None) -> torch.Tensor:
        """Query features ``[Q, D]``, computed like the index's (only completion tokens in the loss)."""
        import datasets

        from .collect import collect_gradients

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if completions is not None:
            completions = [completions] if isinstance(completions, str) else list(completions)
            if len(completions) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        s = self.index.settings
        cols = {"prompt": prompts} | ({"completion": completions} if completions is not None else {})
        out = collect_gradients(
            self.model,
            datasets.Dataset.from_dict(cols),
            tokenizer=self.tokenizer,
            prompt_column="prompt",
            completion_column="completion" if completions is not None else None,
            projection_dim=s["projection_dim"],
            projection_type=s["projection_type"],
            seed=s["seed"],
            normalizers=self.index.normalizers() or {},
            loss_reduction=s["loss_reduction"],
            max_length=s["max_length"],
            target_modules=s["target_modules"],
            include_bias=s["include_bias"],
            backend=self.backend,
            progress=self.progress,
            distributed=self._group.active,
        )
        return out.with_format("torch")[:]["gradients"]

    # -- statistics --------------------------------------------------------------------------
    def train_autocorrelation(self) -> dict[str, torch.Tensor]:
        """Per-layer ``E[g gᵀ]`` over the index rows (cached in the index directory)."""
        if self._r_train is None:
            path = self.index.path / AUTOCORR
            key = self._stats_key()
            if path.exists():
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}).get("key") == key:
                        self._r_train = {n: f.get_tensor(n) for n in f.keys()}
            if self._r_train is None:
                acc = Autocorrelation(self.blocks)
                for _, feats in self.index.iter_chunks(self.chunk_rows, part=self._part):
                    acc.update(feats)
                acc.all_reduce(self._group)
                self._r_train = acc.result()
                try:
                    from safetensors.torch import save

                    if self._group.is_main:  # one writer
                        atomic_write_bytes(path, save({n: t.contiguous() for n, t in self._r_train.items()},
                                                      metadata={"key": key}))
                except OSError:
                    pass  # a read-only index still works, just without the cache
        return self._r_train

    @property
    def _part(self) -> tuple[int, int] | None:
        return (self._group.rank, self._group.world) if self._group.active else None

    def _stats_key(self) -> str:
        return ",".join(s["sha256"][:16] for s in self.index.manifest["shards"])

    def fit_query_stats(
        self, prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None, *,
        features: torch.Tensor | None = None,
    ) -> float | None:
        """Estimate ``R_query`` from a query set (TrackStar's mixing) given as text or as already
        computed ``features``; returns the resulting ``λ``."""
        feats = features if features is not None else self.features(prompts, completions)
        acc = Autocorrelation(self.blocks)
        acc.update(feats)
        self._r_query = acc.result()
        self._precond.clear()
        return self.preconditioner(0.5).lam

    def preconditioner(self, power: float) -> Preconditioner:
        if power not in self._precond:
            self._precond[power] = build_preconditioner(
                self.blocks, self.train_autocorrelation(), self._r_query, k=self.lambda_k,
                damping=self.damping, power=power,
            )
        return self._precond[power]

    # -- scoring -----------------------------------------------------------------------------
    def index_transform(self, feats: torch.Tensor) -> torch.Tensor:
        """How index rows are mapped before the inner product with (transformed) queries."""
        if self.score == "trackstar":
            return unit_normalize(self.preconditioner(0.5).apply(feats))
        if self.score == "cosine":
            return unit_normalize(feats.float())
        return feats.float()

    def query_transform(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim != 2 or feats.shape[1] != self.index.feature_dim:
            raise ValueError(
                f"query features of shape {tuple(feats.shape)} do not match the index ({self.index.feature_dim} "
                "values per row): compute them with this index's settings (Attributor.features)"
            )
        if self.score == "one_sided":
            return self.preconditioner(1.0).apply(feats)
        return self.index_transform(feats)

    def scores_topk(self, query_feats: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [Q, k'], row_ids [Q, k'])`` by streaming over the shards."""
        q = self.query_transform(query_feats)
        scores, ids = stream_topk(self.index.iter_chunks(self.chunk_rows, part=self._part), q, k,
                                  transform=self.index_transform)
        return self._group.merge_topk(scores, ids, k)

    def scores_all(self, query_feats: torch.Tensor) -> torch.Tensor:
        """All-pairs scores ``[Q, N]`` in row-id order (holds Q×N floats in memory)."""
        q = self.query_transform(query_feats)
        out = torch.zeros(q.shape[0], len(self.index))
        for ids, feats in self.index.iter_chunks(self.chunk_rows, part=self._part):
            out[:, ids] = q @ self.index_transform(feats).T
        return self._group.all_reduce_sum(out, "gathering the scores")  # disjoint rows: exact

    def texts(self) -> list[str] | None:
        if self._texts is None:
            try:
                from .data_sources import load_dataset_from_manifest

                ds = self._dataset if self._dataset is not None else load_dataset_from_manifest(self.index.manifest["dataset"])
                col = self.index.settings.get("prompt_column") or "text"
                self._texts = list(ds[col][:]) if col in ds.column_names else []
            except (ValueError, OSError, KeyError):
                self._texts = []
        return self._texts or None

    def query(
        self, prompts: Sequence[str] | str, completions: Sequence[str] | str | None = None, *, k: int = 10
    ) -> list[list[Hit]]:
        """Top-``k`` training examples for each query: ``[[Hit(rank, score, row_id, text), ...], ...]``."""
        scores, ids = self.scores_topk(self.features(prompts, completions), k)
        texts = self.texts()
        return [
            [Hit(r + 1, float(s), int(i), texts[int(i)] if texts else None) for r, (s, i) in enumerate(zip(srow, irow))]
            for srow, irow in zip(scores.tolist(), ids.tolist())
        ]

    def faiss_index(self):
        """An exact ``faiss.IndexFlatIP`` over the transformed index rows (``faiss-cpu`` extra),
        with the row ids as its labels.  Search it with ``query_transform(features)``."""
        try:
            import faiss
        except ImportError:
            raise ImportError("FAISS search needs the optional extra: pip install 'bergson[faiss]'") from None
        flat = faiss.IndexIDMap(faiss.IndexFlatIP(self.index.feature_dim))
        for ids, feats in self.index.iter_chunks(self.chunk_rows):
            flat.add_with_ids(self.index_transform(feats).contiguous().numpy(), ids.numpy())
        return flat


def write_scores(path: str | os.PathLike, scores: torch.Tensor, row_ids: torch.Tensor | None, meta: dict) -> None:
    """Scores (``[Q, k]`` + ``row_ids``, or all pairs ``[Q, N]``) as one safetensors file, atomically."""
    import json

    from safetensors.torch import save

    tensors = {"scores": scores.float().contiguous()}
    if row_ids is not None:
        tensors["row_ids"] = row_ids.to(torch.int64).contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), save(tensors, metadata={"bergson_scores": json.dumps(meta)}))
