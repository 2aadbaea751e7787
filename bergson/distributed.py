"""Several processes, one index: ``torch.distributed`` (launched by ``torchrun``; gloo on CPU,
NCCL on GPU).

Every rank plans the same batches (deterministic tokenization and batching) and takes a
disjoint, round-robin slice of those not yet done; it writes its own shards and records them in
its own progress journal (``OUT/progress/rank-R.json``).  Rank 0 prepares the directory (lock,
checks, resume) before any rank writes, and merges the journals into ``manifest.json`` once
every rank has finished, so the manifest never claims a row that was not written.  Statistics
(normalizer moments, ``R_train``, scores) are all-reduced; top-k lists are merged.

Collectives fail instead of hanging: a peer that dies closes its connections (gloo raises at
once, NCCL at its watchdog), and a peer that stops responding runs into the process group's
timeout (``BERGSON_DIST_TIMEOUT`` seconds when bergson creates the group; default 1800).  The
error says which phase failed and that ``--resume`` continues from the shards finished so far.

:func:`shard_model` applies FSDP2 (``fully_shard``) per decoder block and at the root; the
collection hooks see full activations (FSDP shards parameters, not activations), so the
features equal the unsharded model's.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor
TIMEOUT_ENV = "BERGSON_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stopped responding, or raised."""


def _dist():
    import torch.distributed as dist

    return dist


def timeout_seconds() -> float:
    """The collective timeout bergson uses when it creates the process group (``BERGSON_DIST_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Create the default process group from torchrun's environment (``WORLD_SIZE > 1``).

    gloo on CPU, NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``).  Returns True
    when this call created the group (the caller then destroys it with :func:`shutdown`).
    """
    if not launched_by_torchrun():
        return False
    dist = _dist()
    if dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return True


def shutdown() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Group:
    """This process's place in a run: ``rank`` of ``world`` (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def split(self, items: Sequence) -> list:
        """This rank's round-robin share of ``items`` (all of them when ``world == 1``)."""
        return list(items[self.rank :: self.world])

    # -- collectives (no-ops for one process) -------------------------------------------------
    def _call(self, what: str, fn: Callable):
        try:
            return fn()
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo/NCCL errors, DistBackendError, timeouts
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed: another rank exited or stopped "
                f"responding ({str(e).splitlines()[0][:300]}); a build keeps the shards finished so far: "
                "rerun with --resume"
            ) from None

    def barrier(self, what: str) -> None:
        if self.active:
            self._call(what, lambda: _dist().barrier())

    def all_reduce_sum(self, t: Tensor, what: str) -> Tensor:
        """Sum of ``t`` over ranks (computed in float64 for floating tensors), same dtype back."""
        if not self.active:
            return t
        dtype = torch.float64 if t.is_floating_point() else torch.int64
        work = t.to(_collective_device(), dtype, copy=True).contiguous()
        self._call(what, lambda: _dist().all_reduce(work))
        return work.to(t.device, t.dtype)

    def all_reduce_max(self, value: float, what: str) -> float:
        if not self.active:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        self._call(what, lambda: _dist().all_reduce(t, op=_dist().ReduceOp.MAX))
        return float(t.item())

    def all_gather_object(self, obj, what: str) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self._call(what, lambda: _dist().all_gather_object(out, obj))
        return out

    def on_main(self, fn: Callable, what: str):
        """Run ``fn`` on rank 0 only; if it raised, every rank raises (a ``ValueError`` or
        ``IndexFormatError``, bergson's user errors, with the same message; else a
        :class:`DistributedError`), else all return ``fn``'s result on rank 0 and None elsewhere.
        Doubles as a barrier."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # handed to every rank below
                error = e
        if not self.active:
            if error is not None:
                raise error
            return result
        from .storage import IndexFormatError

        kind = None if error is None else next(
            (k for k, cls in (("index", IndexFormatError), ("value", ValueError)) if isinstance(error, cls)), "other")
        payload = [None if error is None else (kind, type(error).__name__, str(error))]
        self._call(what, lambda: _dist().broadcast_object_list(payload, src=0))
        if error is not None:
            raise error
        if payload[0] is not None:
            kind, name, msg = payload[0]
            if kind == "index":
                raise IndexFormatError(msg)
            if kind == "value":
                raise ValueError(msg)
            raise DistributedError(f"rank 0 failed during {what}: {name}: {msg}")
        return result

    def merge_topk(self, scores: Tensor, row_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Merge every rank's top-k lists (``[Q, k_r]``) into the global top-k, ties by row id."""
        if not self.active:
            return scores, row_ids
        parts = self.all_gather_object((scores.cpu(), row_ids.cpu()), "merging top-k lists")
        s = torch.cat([p[0] for p in parts], dim=1)
        ids = torch.cat([p[1] for p in parts], dim=1)
        order = torch.argsort(ids, dim=1, stable=True)  # row id ascending...
        s, ids = s.gather(1, order), ids.gather(1, order)
        order = torch.argsort(-s, dim=1, stable=True)[:, :k]  # ...then score descending (as TopK)
        return s.gather(1, order), ids.gather(1, order)


def _collective_device() -> torch.device:
    dist = _dist()
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def current(enabled: bool | None = None) -> Group:
    """The group bergson runs in: the default process group when it is initialized (and
    ``enabled`` is not False), else a single process.  ``enabled=True`` without an initialized
    group raises."""
    dist = _dist()
    initialized = dist.is_available() and dist.is_initialized()
    if enabled is False or (enabled is None and not initialized):
        return Group()
    if not initialized:
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group "
            "(launch with torchrun, or call torch.distributed.init_process_group first)"
        )
    return Group(dist.get_rank(), dist.get_world_size())


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when ``model`` (or a submodule) is sharded with FSDP2: ranks must then run the same
    number of forward/backward passes (the parameters are gathered collectively)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``): each repeated block (the classes
    in ``model._no_split_modules``, e.g. ``LlamaDecoderLayer``) and then the root.

    Parameters are gathered one block at a time during forward and backward and freed after, so a
    model need not fit on one device.  Needs an initialized process group.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--fsdp needs a process group: launch with torchrun --nproc_per_node N")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
