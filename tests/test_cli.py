"""The `bergson build` CLI and the on-disk index: formats, manifest, resume, errors, corruption."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

import bergson
from bergson import storage
from bergson.__main__ import main
from tests.models import CORPUS, make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def texts(n):
    return [f"{CORPUS[i % len(CORPUS)]} item {i}" for i in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    ds = datasets.Dataset.from_dict({"text": texts(30), "label": list(range(30))})
    ds.to_json(d / "data.jsonl")
    ds.to_csv(d / "data.csv", index=False)
    ds.to_parquet(d / "data.parquet")
    with open(d / "data.json", "w") as f:
        json.dump([{"text": t} for t in texts(30)], f)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(d / "saved")
    return d


def build(assets, out, *extra, dataset="data.jsonl"):
    args = [str(out), "--model", str(assets / "model"), "--dataset", str(assets / dataset), "--no-progress",
            "--projection_dim", "4", "--token_batch_size", "96", "--shard_rows", "8", *extra]
    return main(args)


@pytest.mark.parametrize("fmt", ["data.jsonl", "data.json", "data.csv", "data.parquet", "saved"])
def test_build_every_dataset_format(assets, tmp_path, fmt, capsys):
    out = tmp_path / "idx"
    assert build(assets, out, dataset=fmt) == 0
    summary = capsys.readouterr().out
    assert "30 rows × 240 features (15 layers)" in summary and str(out) in summary
    index = bergson.load_index(out)
    assert len(index) == 30 and index.complete and index.feature_dim == 15 * 16
    ids, feats = index.load()
    assert ids.tolist() == list(range(30))
    assert torch.isfinite(feats).all() and (feats.abs().sum(1) > 0).all()


def test_manifest_records_identity_settings_layout_and_shards(assets, tmp_path):
    out = tmp_path / "idx"
    assert build(assets, out, "--normalizer", "adam", "--precision", "bfloat16") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "bergson-index" and m["version"] == 1 and m["complete"]
    assert m["model"]["class"] == "LlamaForCausalLM" and len(m["model"]["weights_sha256"]) == 64
    assert m["dataset"]["num_rows"] == 30 and len(m["dataset"]["fingerprint"]) == 64
    assert m["tokenizer"]["vocab_size"] == 101
    s = m["settings"]
    assert (s["projection_dim"], s["normalizer"], s["loss_reduction"], s["seed"]) == (4, "adam", "sum", 0)
    assert m["dtype"] == "bfloat16" and m["num_rows"] == 30 and m["feature_dim"] == 240
    assert [x["offset"] for x in m["modules"]] == [16 * k for k in range(15)]
    assert m["modules"][0] == {"name": "model.layers.0.self_attn.q_proj", "out": 32, "in": 32, "offset": 0, "size": 16}
    rows = 0
    for sh in m["shards"]:
        assert sh["row_start"] == rows
        rows = sh["row_end"]
        f = out / sh["file"]
        assert f.stat().st_size == sh["bytes"] and storage.sha256_file(f) == sh["sha256"]
    assert rows == 30 and len(m["shards"]) >= 3
    assert (out / "normalizers.safetensors").exists()
    assert bergson.load_index(out).load()[1].dtype == torch.float32  # bf16 on disk, float32 out
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_index_equals_in_memory_collection_and_to_dataset(assets, tmp_path):
    model = make_model("llama")
    tok = make_tokenizer()
    ds = datasets.Dataset.from_dict({"text": texts(12)})
    kw = dict(tokenizer=tok, projection_dim=3, normalizer="adafactor", progress=False, token_batch_size=64)
    mem = bergson.collect_gradients(model, ds, **kw)
    index = bergson.collect_gradients(model, ds, output_path=str(tmp_path / "i"), shard_rows=5, **kw)
    assert isinstance(index, bergson.GradientIndex) and len(index) == 12
    ids, feats = index.load()
    assert torch.equal(feats, mem.with_format("torch")[:]["gradients"])
    joined = index.to_dataset(ds)
    assert joined["text"][:] == ds["text"][:]
    assert torch.equal(joined.with_format("torch")[:]["gradients"], feats)
    chunks = list(index.iter_chunks(chunk_rows=2, module="lm_head"))
    assert all(c[1].shape[1] == 9 for c in chunks) and sum(len(c[0]) for c in chunks) == 12
    lm = index.module("lm_head").columns
    assert torch.equal(torch.cat([c[1] for c in chunks])[torch.argsort(torch.cat([c[0] for c in chunks]))], feats[:, lm])


def test_refuses_a_different_run_and_says_what_differs(assets, tmp_path, capsys):
    out = tmp_path / "idx"
    assert build(assets, out) == 0
    assert build(assets, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "holds a different run" in err and "settings.seed: 0 (on disk) != 1 (this run)" in err
    assert build(assets, out) == 2
    assert "already holds this complete index" in capsys.readouterr().err
    assert build(assets, out, "--seed", "1", "--overwrite") == 0
    assert bergson.load_index(out).settings["seed"] == 1
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert build(assets, tmp_path / "junk") == 2
    assert "holds no bergson index" in capsys.readouterr().err
    assert (tmp_path / "junk" / "notes.txt").exists()


def test_bad_inputs_fail_with_clear_messages(assets, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cases = [
        ([str(tmp_path / "afile")], "is a file"),
        (["--prompt_column", "body"], "'body' is not a column of the dataset; available columns: ['text', 'label']"),
        (["--model", str(tmp_path / "nope")], "no such directory"),
        (["--dataset", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--model", "some-org/some-model"], "not in the local Hugging Face cache"),
        (["--projection_dim", "-1"], "--projection_dim must be >= 0"),
    ]
    for extra, msg in cases:
        out = extra[0] if extra and not extra[0].startswith("--") else str(tmp_path / "o")
        args = [a for a in extra if a != out]
        assert build(assets, out, *args) == 2, msg
        assert msg in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    datasets.Dataset.from_dict({"text": []}).to_json(empty)
    assert build(assets, tmp_path / "o2", dataset=str(empty)) == 2
    assert "empty" in capsys.readouterr().err
    blank = tmp_path / "blank.jsonl"
    datasets.Dataset.from_dict({"text": ["", ""]}).to_json(blank)
    assert build(assets, tmp_path / "o3", dataset=str(blank)) == 2
    assert "every document is empty after tokenization" in capsys.readouterr().err
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "vit"
    )
    assert build(assets, tmp_path / "o4", "--model", str(tmp_path / "vit")) == 2
    assert "is not a causal language model" in capsys.readouterr().err


def test_hub_id_fails_at_once_without_network(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "bergson", str(tmp_path / "o"), "--model", "EleutherAI/pythia-14m"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "0"},
    )
    assert r.returncode == 2 and "pass a local model directory" in r.stderr
    assert time.perf_counter() - t0 < 30


def _rows(path):
    return bergson.load_index(path).load()


def test_write_error_mid_run_leaves_a_resumable_index(assets, tmp_path, monkeypatch, capsys):
    clean = tmp_path / "clean"
    assert build(assets, clean) == 0
    out = tmp_path / "idx"
    real = storage.atomic_write_bytes
    calls = {"n": 0}

    def failing(path, data):
        if path.suffix == ".safetensors" and "shards" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_bytes(data[: len(data) // 2])  # half-written, then the disk is full
                tmp.unlink()
                raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", failing)
    assert build(assets, out) == 1
    assert "No space left on device" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]) == 1 and not m["complete"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.safetensors"]
    monkeypatch.setattr(storage, "atomic_write_bytes", real)
    assert build(assets, out) == 2  # an interrupted run is not silently restarted
    assert "pass --resume" in capsys.readouterr().err
    assert build(assets, out, "--resume") == 0
    a, b = _rows(clean), _rows(out)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ctrl_c_keeps_a_resumable_index(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "idx"
    real_add = storage.ShardWriter.add
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(storage.ShardWriter, "add", interrupted)
    assert build(assets, out) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(storage.ShardWriter, "add", real_add)
    assert build(assets, out, "--resume") == 0
    assert len(bergson.load_index(out)) == 30


def test_truncated_or_corrupted_shard_is_named(assets, tmp_path):
    out = tmp_path / "idx"
    assert build(assets, out) == 0
    shard = out / "shards" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    index = bergson.load_index(out)
    with pytest.raises(storage.IndexFormatError, match="shards/00001.safetensors .* corrupt: sha256"):
        index.load()
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(storage.IndexFormatError, match="shards/00001.safetensors .* truncated"):
        bergson.load_index(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(storage.IndexFormatError, match="manifest.json is corrupt"):
        bergson.load_index(out)


def test_optimizer_state_file_is_used(assets, tmp_path):
    model = make_model("llama")
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-3)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "trained")
    make_tokenizer().save_pretrained(tmp_path / "trained")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    out = tmp_path / "idx"
    args = ["--model", str(tmp_path / "trained"), "--optimizer_state", str(tmp_path / "optimizer.pt"),
            "--normalizer", "adam"]
    assert build(assets, out, *args) == 0
    norms = bergson.load_index(out).normalizers()
    want = bergson.normalizers_from_optimizer(model, opt)
    assert torch.allclose(norms["lm_head"].avg_sq, want["lm_head"].avg_sq)


def test_sigkill_then_resume_gives_the_same_index_bit_for_bit(assets, tmp_path):
    ds = datasets.Dataset.from_dict({"text": texts(160)})
    ds.to_json(tmp_path / "big.jsonl")
    common = ["--model", str(assets / "model"), "--dataset", str(tmp_path / "big.jsonl"), "--no-progress",
              "--projection_dim", "4", "--token_batch_size", "40", "--shard_rows", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "bergson", str(clean), *common], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bergson", str(out), *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and 3 <= len(m["shards"]) < 80, "the kill did not land mid-run"
    assert (out / ".lock").read_text() == f"pid {proc.pid} on {socket.gethostname()}\n"  # stale: blocks nothing
    r = subprocess.run([sys.executable, "-m", "bergson", str(out), *common, "--resume"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (ia, fa), (ib, fb) = _rows(clean), _rows(out)
    assert torch.equal(ia, ib) and torch.equal(fa, fb)
    assert len(ib) == 160


def test_same_inputs_and_seed_give_a_bit_identical_index(assets, tmp_path):
    """Determinism: two builds of the same data, model and seed write byte-identical shards and
    normalizers, and manifests that differ only in the timing."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert build(assets, a, "--normalizer", "adam") == 0 and build(assets, b, "--normalizer", "adam") == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(files) >= 5 and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("collect_seconds")
    assert ma == mb


def test_embedded_default_through_a_subprocess(tmp_path):
    out = tmp_path / "default"
    r = subprocess.run(
        [sys.executable, "-m", "bergson", "build", str(out), "--max_examples", "64", "--no-progress",
         "--projection_dim", "4"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert "64 rows × 464 features (29 layers)" in r.stdout
    index = bergson.load_index(out)
    m = index.manifest
    assert m["model"]["id"] == "bergson:default" and m["model"]["path"] is None
    assert m["dataset"]["id"] == "bergson:default" and m["dataset"]["num_rows"] == 64
    joined = index.to_dataset()  # re-loads the embedded corpus from the manifest
    assert len(joined) == 64 and joined["text"][:3] == bergson.default.dataset()["text"][:3]
