"""Tokenization, token-budget batching and the per-example loss.

An example is a list of token ids plus a list of labels (``-100`` = not in the loss).  Raw
text is tokenized from ``prompt_column``; with ``completion_column`` the prompt tokens get
label ``-100`` so only the completion is in the loss.  Already tokenized datasets
(``input_ids``, optional ``labels``) are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IGNORE_INDEX = -100
LOSS_REDUCTIONS = ("sum", "mean", "sum_log")
# ``sum_log``: log(token loss + LOG_LOSS_EPS); the floor keeps a perfectly predicted token finite.
LOG_LOSS_EPS = 1e-6


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0  # documents cut to max_length
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, idx: Sequence[int]) -> "Tokenized":
        return Tokenized([self.input_ids[i] for i in idx], [self.labels[i] for i in idx])


def _columns(dataset) -> list[str]:
    return list(getattr(dataset, "column_names", None) or [])


def check_column(dataset, column: str, role: str) -> None:
    cols = _columns(dataset)
    if column not in cols:
        raise ValueError(f"{role} {column!r} is not a column of the dataset; available columns: {cols}")


def tokenize(
    dataset,
    tokenizer=None,
    *,
    prompt_column: str = "text",
    completion_column: str | None = None,
    max_length: int | None = None,
    batch_size: int = 1000,
) -> Tokenized:
    """Tokenize a ``datasets.Dataset`` (or anything with ``column_names`` and ``__getitem__``)."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to collect")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a loss needs two tokens), got {max_length}")
    cols = _columns(dataset)
    if tokenizer is None:
        if "input_ids" not in cols:
            raise ValueError(
                f"no tokenizer given and the dataset has no 'input_ids' column; available columns: {cols}"
            )
        ids = [_as_ids(x, i, "input_ids") for i, x in enumerate(dataset["input_ids"])]
        labels = ([_as_ids(x, i, "labels") for i, x in enumerate(dataset["labels"])] if "labels" in cols
                  else [list(x) for x in ids])
    else:
        check_column(dataset, prompt_column, "prompt_column")
        if completion_column is not None:
            check_column(dataset, completion_column, "completion_column")
        ids, labels = [], []
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            prompts = [_as_text(t, prompt_column) for t in rows[prompt_column]]
            p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
            if completion_column is None:
                ids.extend(p_ids)
                labels.extend(list(x) for x in p_ids)
            else:
                comps = [_as_text(t, completion_column) for t in rows[completion_column]]
                c_ids = tokenizer(comps, add_special_tokens=False)["input_ids"]
                for a, b in zip(p_ids, c_ids):
                    ids.append(list(a) + list(b))
                    labels.append([IGNORE_INDEX] * len(a) + list(b))
    truncated = 0
    if max_length is not None:
        for i, x in enumerate(ids):
            if len(x) > max_length:
                ids[i], labels[i] = x[:max_length], labels[i][:max_length]
                truncated += 1
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"row {i}: input_ids has {len(x)} tokens but labels has {len(y)}")
    if all(len(x) == 0 for x in ids):
        raise ValueError("every document is empty after tokenization")
    return Tokenized(ids, labels, truncated)


def _as_ids(value: Any, row: int, column: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"row {row}: column {column!r} must hold lists of token ids, found {type(value).__name__}")
    try:
        return [int(t) for t in value]
    except (TypeError, ValueError):
        raise ValueError(f"row {row}: column {column!r} must hold lists of integer token ids, found {value!r:.80}") from None


def _as_text(value: Any, column: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    raise ValueError(f"column {column!r} must hold strings, found {type(value).__name__}")


def token_batches(lengths: Sequence[int], token_batch_size: int) -> list[list[int]]:
    """Group example indices into batches of at most ``token_batch_size`` padded tokens.

    Examples are sorted by length (longest first) so padding is small; a document longer than
    the budget gets a batch of its own.
    """
    if token_batch_size < 1:
        raise ValueError(f"token_batch_size must be >= 1, got {token_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = max(lengths[i], 1)
        width = max(cur_max, n)
        if cur and width * (len(cur) + 1) > token_batch_size:
            batches.append(cur)
            cur, width = [], n
        cur.append(i)
        cur_max = width
    if cur:
        batches.append(cur)
    return batches


def pad_batch(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int = 0, device=None):
    """Right-pad a batch: ``(input_ids [B, S], attention_mask [B, S], labels [B, S])``."""
    width = max(max((len(x) for x in ids), default=1), 1)
    b = len(ids)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    lab = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids, labels)):
        n = len(x)
        if n:
            input_ids[r, :n] = torch.tensor(x, dtype=torch.long)
            lab[r, :n] = torch.tensor(y, dtype=torch.long)
            mask[r, :n] = 1
    return input_ids.to(device), mask.to(device), lab.to(device)


# Logits processed at once by the fused loss, in elements (whole rows): 2^20 (4 MB of float32) on
# CPU, where 2^18-2^22 measured alike once the scratch block is reused (a fresh 16 MB temporary
# per block cost more in page faults than the arithmetic); 2^26 on an accelerator (few, large
# kernel launches).
_CE_CHUNK_ELEMENTS = 1 << 20
_CE_CHUNK_ELEMENTS_ACCEL = 1 << 26


def _ce_blocks(n_rows: int, vocab: int, device: torch.device):
    """``(start, stop)`` row ranges of a ``[n_rows, vocab]`` logits matrix, one block each."""
    budget = _CE_CHUNK_ELEMENTS if device.type == "cpu" else _CE_CHUNK_ELEMENTS_ACCEL
    rows = max(1, budget // max(vocab, 1))
    return [(r, min(r + rows, n_rows)) for r in range(0, n_rows, rows)]


class _NextTokenCE(torch.autograd.Function):
    """Next-token cross-entropy per token, fused: ``logits [B, S, V]``, ``labels [B, S]`` ->
    ``[B, S-1]`` (float32, float64 for float64 logits).

    Same values and gradient as ``F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ...,
    reduction="none")``, without its full-size intermediates: no shifted/upcast copy of the
    logits and no stored log-softmax.  The logits are walked as ``[B*S, V]`` rows in blocks (the
    last position of each example, which predicts nothing, gets weight 0): forward runs
    log-softmax (max-shifted, so a confident token keeps its small loss) into one reused scratch
    block and keeps the target's entry; backward writes ``softmax``, scales it by the incoming
    gradient and subtracts it at the target, straight into the logits' gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        b_, s_, v = logits.shape
        wdt = torch.promote_types(logits.dtype, torch.float32)
        t = torch.full((b_, s_), IGNORE_INDEX, dtype=torch.long, device=logits.device)
        t[:, :-1] = labels[:, 1:].to(logits.device)
        t = t.view(-1)  # row r of [B*S, V] predicts t[r]
        valid = t != IGNORE_INDEX
        t = torch.where(valid, t, 0)
        z = logits.reshape(b_ * s_, v)
        blocks = _ce_blocks(b_ * s_, v, logits.device)
        scratch = torch.empty(blocks[0][1] if blocks else 0, v, dtype=wdt, device=logits.device)
        tok = torch.empty(b_ * s_, dtype=wdt, device=logits.device)
        for r0, r1 in blocks:
            blk = scratch[: r1 - r0]
            zb = z[r0:r1]
            if zb.dtype != wdt:
                zb = blk.copy_(zb)
            torch.log_softmax(zb, -1, out=blk)
            torch.gather(blk, 1, t[r0:r1, None], out=tok[r0:r1, None])
        ctx.save_for_backward(logits, t, valid)
        return torch.where(valid, tok, 0.0).neg_().view(b_, s_)[:, :-1].contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_tok):
        logits, t, valid = ctx.saved_tensors
        b_, s_, v = logits.shape
        wdt = torch.promote_types(logits.dtype, torch.float32)
        g = torch.zeros(b_, s_, dtype=wdt, device=logits.device)
        g[:, :-1] = grad_tok
        g = torch.where(valid, g.view(-1), 0.0)[:, None]  # [B*S, 1]
        z = logits.reshape(b_ * s_, v)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        gz = grad.view(b_ * s_, v)
        blocks = _ce_blocks(b_ * s_, v, logits.device)
        same = logits.dtype == wdt  # then write straight into the gradient, else via a scratch block
        scratch = None if same or not blocks else torch.empty(blocks[0][1], v, dtype=wdt, device=logits.device)
        for r0, r1 in blocks:
            blk = gz[r0:r1] if same else scratch[: r1 - r0]
            zb = z[r0:r1] if same else blk.copy_(z[r0:r1])
            torch.softmax(zb, -1, out=blk)
            blk.mul_(g[r0:r1])
            blk.scatter_add_(1, t[r0:r1, None], -g[r0:r1])
            if not same:
                gz[r0:r1] = blk
        return grad, None


def _under_torch_func(t: torch.Tensor) -> bool:
    """Whether ``t`` is wrapped by a torch.func transform (vmap, grad, ...)."""
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # a torch without this (private) helper: assume plain autograd
        return False
    return is_functorch_wrapped_tensor(t)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross-entropy per example: ``logits [B, S, V]``, ``labels [B, S]`` -> ``[B]``.

    Token ``t`` predicts ``labels[t+1]``; labels of ``-100`` contribute nothing.  ``"sum"``
    (default) adds the token losses, ``"mean"`` divides by the example's number of loss tokens
    (examples without any give 0), ``"sum_log"`` adds ``log(loss + 1e-6)`` of each token: its
    gradient is ``Σ_t ∇ℓ_t / (ℓ_t + 1e-6)``, the *relative* change of every token's loss, so the
    tokens a model predicts well (what it learned from the document) weigh as much as the
    unpredictable ones, which dominate a plain sum.  Summing the result over the batch gives
    every example its own gradient, independent of which other examples share the batch.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    target = labels[:, 1:].to(logits.device)
    if logits.dim() == 3 and logits.shape[1] > 1 and not _under_torch_func(logits):
        tok = _NextTokenCE.apply(logits, labels)
    else:  # under torch.func transforms (vmap/grad), which the fused autograd.Function does not support
        z = logits[:, :-1]
        tok = torch.nn.functional.cross_entropy(
            z.reshape(-1, z.shape[-1]).to(torch.promote_types(z.dtype, torch.float32)), target.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="none",
        ).view(target.shape)
    if reduction == "sum_log":
        tok = torch.where(target != IGNORE_INDEX, torch.log(tok + LOG_LOSS_EPS), 0.0)
    loss = tok.sum(1)
    if reduction == "mean":
        loss = loss / (target != IGNORE_INDEX).sum(1).clamp_min(1)
    return loss


def join_columns(dataset, gradients: torch.Tensor, **extra):
    """``dataset`` with a fixed-length float32 ``gradients`` column (``[N, D]``) and any ``extra``
    columns (name -> (values, datasets feature type string)) appended, row for row."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 has no List
    features = {"gradients": seq(datasets.Value("float32"), length=gradients.shape[1])}
    data = {"gradients": gradients.numpy()}
    for name, (values, dtype) in extra.items():
        features[name] = datasets.Value(dtype)
        data[name] = values
    col = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    return datasets.concatenate_datasets([dataset, col], axis=1)
