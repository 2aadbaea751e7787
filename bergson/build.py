"""``bergson build``: model + dataset -> on-disk gradient index, with a one-line summary."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import BuildConfig


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def load_optimizer_normalizers(path: str, model, kind: str | None):
    """Normalizers from a bergson ``.safetensors`` file or a saved optimizer ``state_dict``."""
    import torch

    from .normalizers import convert, load_normalizers, normalizers_from_state_dict

    if not os.path.exists(path):
        raise ValueError(f"--optimizer_state {path}: no such file")
    if path.endswith(".safetensors"):
        norms = load_normalizers(path)
        return {k: convert(v, kind) for k, v in norms.items()} if kind else norms
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--optimizer_state {path}: cannot read it as a torch optimizer state_dict: {e}") from None
    return normalizers_from_state_dict(model, sd, kind=kind)


def build(cfg: BuildConfig):
    """Run a build; returns ``(index, summary line)``."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is a file, not a directory")
    from .collect import collect_gradients, model_fingerprint
    from .data_sources import load_dataset, load_model

    # With --fsdp the full weights stay in CPU memory; fully_shard moves each rank's shard to its device.
    model, tokenizer, model_info, tok_info = load_model(
        cfg.model, dtype=cfg.model_dtype, device="cpu" if cfg.fsdp else cfg.device, allow_download=cfg.allow_download
    )
    model_info["fingerprint"] = model_fingerprint(model)
    if cfg.fsdp:
        from .distributed import shard_model

        shard_model(model)
    ds, ds_info = load_dataset(cfg.dataset, split=cfg.split, allow_download=cfg.allow_download)
    if cfg.max_examples is not None and cfg.max_examples < len(ds):
        ds = ds.select(range(cfg.max_examples))
        ds_info = {**ds_info, "max_examples": cfg.max_examples, "num_rows": len(ds)}
    normalizers = None
    if cfg.optimizer_state is not None:
        kind = None if cfg.normalizer == "none" else cfg.normalizer
        normalizers = load_optimizer_normalizers(cfg.optimizer_state, model, kind)
    targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()] if cfg.target_modules else None
    index = collect_gradients(
        model,
        ds,
        tokenizer=tokenizer,
        prompt_column=cfg.prompt_column,
        completion_column=cfg.completion_column,
        projection_dim=cfg.projection_dim,
        projection_type=cfg.projection_type,
        normalizer=cfg.normalizer,
        normalizers=normalizers,
        fit_examples=cfg.fit_examples,
        loss_reduction=cfg.loss_reduction,
        token_batch_size=cfg.token_batch_size,
        max_length=cfg.max_length,
        target_modules=targets,
        include_bias=cfg.include_bias,
        backend=cfg.backend,
        seed=cfg.seed,
        progress=cfg.progress,
        output_path=str(out),
        store_dtype=cfg.precision,
        shard_rows=cfg.shard_rows,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        model_info=model_info,
        dataset_info=ds_info,
        tokenizer_info=tok_info,
    )
    wall = time.perf_counter() - t0
    m = index.manifest
    tokens = m.get("tokens", 0)
    rate = tokens / m["collect_seconds"] if m.get("collect_seconds") else float("nan")
    summary = (
        f"bergson: {len(index)} rows × {index.feature_dim} features ({len(index.modules)} layers), "
        f"{tokens} tokens in {wall:.1f} s wall ({rate:,.0f} tok/s collecting), "
        f"{_human_bytes(_dir_bytes(out))} on disk at {out}"
    )
    if m.get("truncated"):
        summary += f"; {m['truncated']} documents truncated to {cfg.max_length} tokens"
    if m.get("skipped_rows"):
        summary += (f"; {len(m['skipped_rows'])} documents with a non-finite loss stored as zero rows "
                    "(manifest: skipped_rows)")
    return index, summary
