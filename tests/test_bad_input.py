"""Bad input, a table of cases (one test each, some parametrized): each ends in a clear error
naming the problem, or in the documented behaviour (README, "Guarantees") — never in a crash
deep inside torch."""

from __future__ import annotations

import json
import os
import warnings

import datasets
import pytest
import torch

import bergson
from bergson import storage
from bergson.__main__ import main
from tests.models import CORPUS, make_model, make_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    make_model("llama").save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    datasets.Dataset.from_dict({"text": [f"{CORPUS[i % 6]} item {i}" for i in range(12)]}).to_json(d / "data.jsonl")
    return d


def build(assets, out, *extra, dataset=None):
    return main([str(out), "--model", str(assets / "model"), "--dataset", str(dataset or assets / "data.jsonl"),
                 "--no-progress", "--projection_dim", "4", "--token_batch_size", "96", "--shard_rows", "4", *extra])


def fails(capsys, code: int, *fragments: str) -> None:
    """The command exited with 2 and printed one ``bergson: error: ...`` message (after any
    progress bars) holding every fragment."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("bergson: error: ") == 1, err
    message = err[err.index("bergson: error: "):]
    for f in fragments:
        assert f in message, message


def collect(model, texts, **kw):
    ds = datasets.Dataset.from_dict({"text": texts})
    out = bergson.collect_gradients(model, ds, tokenizer=make_tokenizer(), projection_dim=4, progress=False, **kw)
    return out.with_format("torch")[:]


# -- documents ------------------------------------------------------------------------------
def test_empty_strings(assets, tmp_path, capsys):
    """Empty (and None) documents have no loss: their row is zero, the others are unaffected."""
    model = make_model("llama")
    got = collect(model, ["", "the cat sat on the mat", None, "a quick brown fox"], normalizer="none")
    alone = collect(model, ["the cat sat on the mat", "a quick brown fox"], normalizer="none")
    assert got["gradients"][[0, 2]].abs().max() == 0 and got["loss"][[0, 2]].tolist() == [0, 0]
    assert torch.allclose(got["gradients"][[1, 3]], alone["gradients"], rtol=1e-5, atol=1e-5)
    blank = tmp_path / "blank.jsonl"
    datasets.Dataset.from_dict({"text": ["", "a"]}).to_json(blank)
    capsys.readouterr()
    fails(capsys, build(assets, tmp_path / "o", dataset=blank), "no document has two tokens or more")


def test_longer_than_the_token_budget(assets, tmp_path, capsys):
    """A document longer than --token_batch_size gets a batch of its own: same features."""
    model = make_model("llama")
    texts = [CORPUS[2] + " " + CORPUS[3], "the cat sat", "a quick brown fox jumps"]
    small = collect(model, texts, normalizer="none", token_batch_size=8)
    big = collect(model, texts, normalizer="none", token_batch_size=4096)
    assert torch.allclose(small["gradients"], big["gradients"], rtol=1e-5, atol=1e-4)


def test_longer_than_the_model_positions(assets, tmp_path, capsys):
    """Past the position table (GPT-2: 128) is an error suggesting --max_length, which truncates."""
    model = make_model("gpt2")
    texts = ["the cat sat " * 60, "a quick brown fox"]
    with pytest.raises(ValueError, match=r"document 0 has \d+ tokens, more than the model's 128 positions "
                                         r"\(config.max_position_embeddings\); pass max_length=128"):
        collect(model, texts)
    out = bergson.collect_gradients(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=make_tokenizer(),
                                    projection_dim=4, progress=False, max_length=128, output_path=str(tmp_path / "i"))
    assert out.manifest["truncated"] == 1 and len(out) == 2


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "txt"])
def test_non_utf8_bytes(assets, tmp_path, capsys, suffix):
    """Text files must be UTF-8: the error names the byte and the line."""
    body = {"jsonl": b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n', "csv": b"text\nfine\ncaf\xe9 au lait\n",
            "txt": b"fine\ncaf\xe9 au lait\n"}[suffix]
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(body)
    line = 3 if suffix == "csv" else 2
    fails(capsys, build(assets, tmp_path / "o", dataset=path), "is not valid UTF-8: byte 0xe9 on line", f"line {line}",
          "iconv")
    path.write_bytes(body.replace(b"\xe9", "é".encode()))  # the same file in UTF-8 builds
    assert build(assets, tmp_path / "o2", dataset=path) == 0
    assert len(bergson.load_index(tmp_path / "o2")) == 2


@pytest.mark.parametrize("value,message", [(7, "found int"), ([1, 2], "found list")], ids=["int", "list"])
def test_text_column_of_the_wrong_type(assets, tmp_path, capsys, value, message):
    path = tmp_path / "typed.jsonl"
    path.write_text("".join(json.dumps({"text": value}) + "\n" for _ in range(3)))
    fails(capsys, build(assets, tmp_path / "o", dataset=path), f"column 'text' must hold strings, {message}")


def test_text_column_with_nulls(assets, tmp_path, capsys):
    """A null text is an empty document (zero row), like ""."""
    path = tmp_path / "nulls.jsonl"
    path.write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "the cat sat on the mat"}) + "\n")
    assert build(assets, tmp_path / "o", dataset=path) == 0
    ids, feats = bergson.load_index(tmp_path / "o").load()
    assert ids.tolist() == [0, 1] and feats[0].abs().max() == 0 and feats[1].abs().max() > 0


@pytest.mark.parametrize("ids,message", [
    (["abc", "def"], "row 0: column 'input_ids' must hold lists of token ids, found str"),
    ([None, [5, 6, 7]], "row 0: column 'input_ids' must hold lists of token ids, found NoneType"),
    ([[5, 6, 7000], [5, 6, 7]], r"document 0 has token id 7000, outside the model's vocabulary \(0..100\)"),
    ([[5, -6, 7], [5, 6, 7]], r"document 0 has token id -6, outside the model's vocabulary"),
], ids=["str", "none", "too-large", "negative"])
def test_token_ids_of_the_wrong_type_or_range(assets, tmp_path, capsys, ids, message):
    with pytest.raises(ValueError, match=message):
        bergson.collect_gradients(make_model("llama"), datasets.Dataset.from_dict({"input_ids": ids}),
                                  projection_dim=4, progress=False)


def test_nan_or_inf_loss(assets, tmp_path, capsys):
    """A document whose loss is NaN/inf: a warning, a zero row listed in skipped_rows, and the
    moments fitted from the other documents only."""
    tok = make_tokenizer()
    model = make_model("llama")
    poison = tok("zor")["input_ids"][-1]
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    texts = ["the cat sat on the mat", "zor is miralt", "a quick brown fox"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = bergson.collect_gradients(model, datasets.Dataset.from_dict({"text": texts}), tokenizer=tok,
                                          projection_dim=4, progress=False, output_path=str(tmp_path / "i"))
    assert [str(w.message) for w in caught if w.category is UserWarning] == [
        "1 examples with a non-finite loss (NaN/inf) were left out of the fitted moments",
        "1 documents had a non-finite loss or gradient (NaN/inf): their rows are zeros ([1])",
    ]
    assert index.skipped_rows == [1] and index.manifest["shards"][0]["skipped"] == [1]
    ids, feats = index.load()
    assert feats[1].abs().max() == 0 and torch.isfinite(feats).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = collect(model, [texts[0], texts[2]])  # the moments of the two good documents
    assert torch.allclose(feats[[0, 2]], clean["gradients"], rtol=1e-4, atol=1e-4)


# -- queries against an index ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def index(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    assert build(assets, out) == 0
    return out


def test_query_with_another_model(assets, tmp_path, capsys, index):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="the model's weights differ from those the index .* was built with"):
        bergson.Attributor(index, model=make_model("llama", seed=1), tokenizer=tok)
    with pytest.raises(ValueError, match="the model's layers differ from the index|does not match the index"):
        bergson.Attributor(index, model=make_model("neox"), tokenizer=tok)


def test_mismatched_projection_settings(assets, tmp_path, capsys, index):
    att = bergson.Attributor(index, model=make_model("llama"), tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match=r"query features of shape \(1, 64\) do not match the index \(240 values"):
        att.scores_topk(torch.randn(1, 64))  # features computed with p=2 instead of the index's p=4
    fails(capsys, build(assets, index, "--resume", "--projection_dim", "8"), "holds a different run",
          "settings.projection_dim: 4 (on disk) != 8 (this run)")


def test_index_missing_its_normalizers(assets, tmp_path, capsys, index):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(index, copy)
    (copy / storage.NORMALIZERS).unlink()
    with pytest.raises(storage.IndexFormatError, match="normalizers.safetensors is missing, but the index was built "
                                                       "with adafactor normalizers"):
        bergson.Attributor(copy, model=make_model("llama"), tokenizer=make_tokenizer()).query("the cat", " sat")


# -- the output directory -------------------------------------------------------------------------
def _make_read_only(path):
    """chmod for a normal user; root ignores modes, so an immutable attribute (chattr +i) instead."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    import subprocess

    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not allowed: no way to make a directory read-only")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_output_directory(assets, tmp_path, capsys, index):
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _make_read_only(ro)
    try:
        fails(capsys, build(assets, ro / "idx"), f"cannot write to the output directory {ro / 'idx'}")
        fails(capsys, build(assets, ro), f"cannot write to the output directory {ro}", "choose a writable output path")
    finally:
        undo()
    import shutil

    shutil.copytree(index, tmp_path / "ro_index")  # a read-only index can still be queried (no cache written)
    undo = _make_read_only(tmp_path / "ro_index")
    try:
        hits = bergson.Attributor(tmp_path / "ro_index", model=make_model("llama"), tokenizer=make_tokenizer()).query(
            "the cat", " sat", k=3)[0]
        assert len(hits) == 3
    finally:
        undo()


def test_two_runs_on_one_directory(assets, tmp_path, capsys):
    """The second run is refused, naming the first one's pid; once it ends, the directory is free."""
    out = tmp_path / "shared"
    holder = storage.DirLock(out).acquire()  # another run, alive, writing here
    try:
        fails(capsys, build(assets, out), f"{out} is being written by another bergson run (pid {os.getpid()} on ")
    finally:
        holder.release()
    assert build(assets, out) == 0


def test_stale_lock_does_not_block_resume(assets, tmp_path, capsys):
    """A lock file left by a run that died (its flock died with it) blocks nothing."""
    out = tmp_path / "idx"
    real = storage.ShardWriter.flush
    calls = {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self)

    storage.ShardWriter.flush = dies
    try:
        assert build(assets, out) == 130
    finally:
        storage.ShardWriter.flush = real
    capsys.readouterr()
    (out / storage.LOCK).write_text("pid 999999 on a-host-that-crashed\n")
    assert build(assets, out, "--resume") == 0
    assert len(bergson.load_index(out)) == 12
