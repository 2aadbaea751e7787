"""Several processes, one index (gloo on CPU): a 2-rank run equals a 1-process run row for row,
a killed rank leaves a resumable directory, scoring and FSDP2 run across ranks, and torchrun
drives the CLI.

The ranks are forked from the test process (modules already imported: ~8 s per launch instead
of ~30 s spawned) and meet through a ``file://`` rendezvous; a launch that outlives its
deadline fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import bergson
from bergson import storage
from tests import dist_workers as W

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform != "linux", reason="needs torch.distributed (gloo) on Linux"
)
TOL = 1e-6  # max abs difference allowed between a 2-rank and a 1-process index (observed: 0.0)


def launch(job, out: Path, *args, world: int = 2, deadline_s: float = 240) -> list[int]:
    """Run ``W._run(rank, world, ..., job, *args)`` on ``world`` forked ranks; exit codes."""
    ctx = multiprocessing.get_context("fork")
    rendezvous = out / f"rendezvous-{job.__name__}"
    procs = [ctx.Process(target=W._run, args=(r, world, str(rendezvous), str(out), job, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(deadline_s)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} ranks of {job.__name__} hung past {deadline_s} s"
    return [p.exitcode for p in procs]


def errors(out: Path) -> dict[int, str]:
    return {int(f.stem.split("-")[1]): f.read_text() for f in out.glob("error-*.txt")}


@contextmanager
def one_thread():
    """Each rank runs one thread; the reference must too (matmul blocking depends on threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reference(out: Path, **kw):
    with one_thread():
        model, tok, ds = W.setup()
        return bergson.collect_gradients(model, ds, tokenizer=tok, output_path=str(out), **{**W.COLLECT, **kw})


def rows(path) -> tuple[torch.Tensor, torch.Tensor]:
    return bergson.load_index(path).load()


def assert_same_index(path, ref) -> None:
    (ia, fa), (ib, fb) = rows(path), rows(ref)
    assert ia.tolist() == ib.tolist() == list(range(W.N_DOCS))
    assert (fa - fb).abs().max().item() <= TOL
    m = bergson.load_index(path).manifest
    assert m["complete"] and m["num_rows"] == W.N_DOCS
    listed = {s["file"] for s in m["shards"]}
    assert {f"shards/{f.name}" for f in (Path(path) / "shards").iterdir()} == listed  # nothing unlisted left
    assert not (Path(path) / storage.PROGRESS_DIR).exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two ranks collect; rank 1 is SIGKILLed after writing its 3rd shard and before listing it.
    The state left behind is saved; then two ranks resume and do everything else (one launch)."""
    d = tmp_path_factory.mktemp("dist")
    killed_codes = launch(W.collect_killed, d, 1, 3)
    index = d / "index"
    killed = {
        "codes": killed_codes,
        "errors": errors(d),
        "manifest": json.loads((index / storage.MANIFEST).read_text()),
        "journals": {j.name: json.loads(j.read_text()) for j in (index / storage.PROGRESS_DIR).iterdir()},
        "files": sorted(f.name for f in (index / "shards").iterdir()),
        "lock": (index / storage.LOCK).read_text(),
    }
    shutil.copytree(index, d / "killed-copy")
    for f in d.glob("error-*.txt"):
        f.unlink()
    codes = launch(W.resume_and_score, d)
    assert codes == [0, 0], errors(d)
    return d, killed


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory.mktemp("ref") / "index")


def test_killed_rank_others_fail_clearly_and_manifest_claims_nothing_unwritten(runs):
    d, killed = runs
    assert killed["codes"] == [3, -9]  # rank 0 raised; rank 1 died by SIGKILL
    err = killed["errors"][0]
    assert err.startswith("DistributedError: rank 0 of 2:") and "another rank exited or stopped responding" in err
    assert "rerun with --resume" in err
    m = killed["manifest"]
    assert not m["complete"] and m["num_rows"] == 0 and m["shards"] == []  # rank 0 merges only at the end
    j0, j1 = killed["journals"]["rank-00000.json"], killed["journals"]["rank-00001.json"]
    assert len(j1["shards"]) == 2 and len(j0["shards"]) >= 3  # rank 0 finished its share
    listed = {Path(s["file"]).name for s in j0["shards"] + j1["shards"]}
    assert len(killed["files"]) == len(listed) + 1  # rank 1's 3rd shard: on disk, listed nowhere
    copy = d / "killed-copy"
    for s in j0["shards"] + j1["shards"]:
        assert storage.sha256_file(copy / s["file"]) == s["sha256"]
    assert killed["lock"].startswith("pid ")  # stale: its holder is gone, and it blocked nothing


def test_two_ranks_resume_the_killed_run_to_the_single_process_index(runs, ref):
    d, _ = runs
    assert_same_index(d / "index", ref.path)
    assert bergson.load_index(d / "index").manifest["world_size"] == 2
    assert_same_index(d / "clean", ref.path)


def test_one_process_resumes_a_two_rank_run_and_checks_rank_shards(runs, ref, tmp_path):
    d, killed = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(d / "killed-copy", resumed)
    assert_same_index(reference(resumed, resume=True).path, ref.path)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(d / "killed-copy", corrupt)
    victim = killed["journals"]["rank-00001.json"]["shards"][1]["file"]
    data = bytearray((corrupt / victim).read_bytes())
    data[-3] ^= 0xFF
    (corrupt / victim).write_bytes(bytes(data))
    with pytest.raises(storage.IndexFormatError, match=f"shard {victim} of .* is truncated or corrupt"):
        reference(corrupt, resume=True)
    (corrupt / victim).unlink()  # as the error says: delete it and resume; its rows are recomputed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_index(reference(corrupt, resume=True).path, ref.path)


def test_in_memory_fitting_and_fsdp_match_one_process(runs, ref):
    d, _ = runs
    res = torch.load(d / "results.pt")
    ids, feats = rows(ref.path)
    assert (res["mem"] - feats).abs().max().item() <= TOL
    with one_thread():
        model, tok, ds = W.setup()
        adam = bergson.fit_normalizers(model, ds, tokenizer=tok, kind="adam", token_batch_size=256, progress=False)
    assert res["adam"].keys() == adam.keys()
    for name, v in adam.items():
        assert ((res["adam"][name] - v.avg_sq).abs().max() / v.avg_sq.abs().max()).item() <= TOL
    assert_same_index(d / "fsdp", ref.path)  # hooks saw full activations with sharded parameters


def test_scores_across_ranks_match_one_process(runs, ref):
    d, _ = runs
    res = torch.load(d / "results.pt")
    with one_thread():
        model, tok, _ = W.setup()
        att = bergson.Attributor(ref, model=model, tokenizer=tok, score="trackstar")
        feats = att.features(*W.QUERIES)
        lam = att.fit_query_stats(features=feats)
        scores, ids = att.scores_topk(feats, k=5)
        all_scores = att.scores_all(feats)
    assert (feats - res["feats"]).abs().max().item() <= TOL
    assert abs(lam - res["lam"]) < 1e-9
    assert res["top_ids"].tolist() == ids.tolist()
    assert (res["top_scores"] - scores).abs().max().item() <= TOL
    assert (res["all_scores"] - all_scores).abs().max().item() <= TOL


def test_torchrun_trackstar_with_fsdp_equals_one_process(tmp_path):
    """A real torchrun (2 processes) drives `bergson trackstar --fsdp` on a Hugging Face Llama:
    build with the model sharded by FSDP2, statistics and scores across ranks."""
    import datasets

    from bergson.__main__ import main
    from tests.models import CORPUS, make_model, make_tokenizer

    make_model("llama").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    docs = [f"{CORPUS[i % len(CORPUS)]} {CORPUS[(3 * i) % len(CORPUS)]} item {i}" for i in range(37)]
    datasets.Dataset.from_dict({"text": docs}).to_json(tmp_path / "data.jsonl")
    queries = {"prompt": ["the cat", "a quick brown", "the capital of"], "completion": [" sat", " fox", " zor"]}
    datasets.Dataset.from_dict(queries).to_json(tmp_path / "queries.jsonl")
    common = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.jsonl"), "--queries",
              str(tmp_path / "queries.jsonl"), "--projection_dim", "4", "--token_batch_size", "64",
              "--shard_rows", "4", "--top_k", "5", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BERGSON_DIST_TIMEOUT": "120",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bergson", "trackstar", str(tmp_path / "dist"), *common, "--fsdp"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("bergson: 37 rows") == 1  # one summary: rank 0 prints, the other is quiet
    with one_thread():
        assert main(["trackstar", str(tmp_path / "one"), *common]) == 0
    (ia, fa), (ib, fb) = rows(tmp_path / "dist"), rows(tmp_path / "one")
    assert ia.tolist() == ib.tolist() == list(range(37))
    assert (fa - fb).abs().max().item() <= TOL
    assert bergson.load_index(tmp_path / "dist").manifest["world_size"] == 2
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "dist" / "scores.safetensors"), load_file(tmp_path / "one" / "scores.safetensors")
    assert a["row_ids"].tolist() == b["row_ids"].tolist()
    assert (a["scores"] - b["scores"]).abs().max().item() <= TOL
