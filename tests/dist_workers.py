"""Process bodies for the multi-process tests (spawned: they must be importable functions).

Each runs one rank: it joins a gloo process group through a ``file://`` rendezvous, does its
job with the same arguments as every other rank, and leaves what the test compares in files.
"""

from __future__ import annotations

import datetime
import os
import signal
import traceback

import torch

QUERIES = (["the cat sat", "a quick brown", "bergson traces what"], [" on the mat", " fox jumps", " a network learned"])
COLLECT = dict(projection_dim=4, normalizer="adafactor", token_batch_size=256, shard_rows=4, progress=False)


def texts(n: int) -> list[str]:
    from tests.models import CORPUS

    # lengths vary (1 to 3 corpus sentences, and a few 0/1-character documents), so the batches
    # differ in size and each rank gets a different number of them
    out = [" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(1 + i % 3)) + f" item {i}" for i in range(n)]
    out[3], out[11] = "", "a"
    return out


class CharTokenizer:
    """Characters to ids (a stand-in that keeps transformers out of the spawned processes: its
    import alone costs ~8 s per process on a 2-core machine)."""

    pad_token_id = 0
    vocab = 101

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [([2] if add_special_tokens else []) + [3 + ord(c) % (self.vocab - 3) for c in t]
                              for t in texts]}


class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        s = x.shape[1]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        att = (q @ k.transpose(1, 2) / q.shape[-1] ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.o(att @ v)
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class TinyLM(torch.nn.Module):
    """A causal LM in plain torch (right padding needs no mask: causal attention never looks right)."""

    _no_split_modules = ["Block"]  # what bergson.distributed.shard_model wraps with fully_shard

    def __init__(self, vocab: int = 101, d: int = 32, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def setup():
    import datasets

    return TinyLM(), CharTokenizer(), datasets.Dataset.from_dict({"text": texts(N_DOCS)})


N_DOCS = 48


def _join(rank: int, world: int, rendezvous: str, timeout_s: float = 60.0) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _run(rank: int, world: int, rendezvous: str, out: str, job, *args) -> None:
    """Run ``job``; an exception is written to ``out/error-R.txt`` and the exit code is 3."""
    import torch.distributed as dist

    try:
        _join(rank, world, rendezvous)
        job(rank, out, *args)
    except BaseException as e:  # the test reads the message
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        os._exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resume_and_score(rank: int, out: str) -> None:
    """Resume the killed run in ``out/index``; then a clean run, one in memory, Adam fitting,
    scoring, and a run with the model sharded by FSDP2.  Rank 0 saves what the test compares."""
    import bergson
    from bergson.distributed import shard_model

    model, tok, ds = setup()
    index = bergson.collect_gradients(model, ds, tokenizer=tok, output_path=os.path.join(out, "index"), resume=True,
                                      **COLLECT)
    bergson.collect_gradients(model, ds, tokenizer=tok, output_path=os.path.join(out, "clean"), **COLLECT)
    mem = bergson.collect_gradients(model, ds, tokenizer=tok, **{k: v for k, v in COLLECT.items() if k != "shard_rows"})
    norms = bergson.fit_normalizers(model, ds, tokenizer=tok, kind="adam", token_batch_size=256, progress=False)
    att = bergson.Attributor(index, model=model, tokenizer=tok, score="trackstar")
    feats = att.features(*QUERIES)
    lam = att.fit_query_stats(features=feats)
    top_scores, top_ids = att.scores_topk(feats, k=5)
    all_scores = att.scores_all(feats)
    bergson.collect_gradients(shard_model(TinyLM()), ds, tokenizer=tok, output_path=os.path.join(out, "fsdp"), **COLLECT)
    if rank == 0:
        torch.save({
            "mem": mem.with_format("torch")[:]["gradients"], "adam": {k: v.avg_sq for k, v in norms.items()},
            "lam": lam, "feats": feats, "top_scores": top_scores, "top_ids": top_ids, "all_scores": all_scores,
        }, os.path.join(out, "results.pt"))


def collect_killed(rank: int, out: str, kill_rank: int, kill_at_journal: int) -> None:
    """Collect; rank ``kill_rank`` SIGKILLs itself after writing a shard, before its
    ``kill_at_journal``-th journal update (so that shard is on disk but listed nowhere)."""
    import bergson
    from bergson import storage

    if rank == kill_rank:
        real = storage.atomic_write_json
        calls = {"n": 0}

        def dying(path, obj):
            if path.parent.name == storage.PROGRESS_DIR:
                calls["n"] += 1
                if calls["n"] == kill_at_journal:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(path, obj)

        storage.atomic_write_json = dying
    model, tok, ds = setup()
    bergson.collect_gradients(model, ds, tokenizer=tok, output_path=os.path.join(out, "index"), **COLLECT)
