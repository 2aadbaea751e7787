"""Attribution: streaming top-k, TrackStar statistics, self-retrieval, counterfactual sanity."""

import copy
import json

import datasets
import pytest
import torch

import bergson
from bergson.__main__ import main
from bergson.query import Attributor
from bergson.score import (
    TopK,
    build_preconditioner,
    crossing_lambda,
    inverse_root,
    stream_topk,
    unit_normalize,
)
from tests.models import CORPUS, make_model, make_tokenizer

DOCS = [f"{CORPUS[i % len(CORPUS)]} number {i} of {3 * i + 1}" for i in range(24)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, tok = make_model("llama"), make_tokenizer()
    ds = datasets.Dataset.from_dict({"text": DOCS})
    path = tmp_path_factory.mktemp("idx") / "index"
    bergson.collect_gradients(
        model, ds, tokenizer=tok, projection_dim=6, normalizer="adafactor", progress=False,
        output_path=str(path), shard_rows=5,
    )
    return model, tok, path


def brute_topk(scores, ids, k):
    out_s, out_i = [], []
    for row in scores:
        pairs = sorted(zip(row.tolist(), ids.tolist()), key=lambda t: (-t[0], t[1]))[:k]
        out_s.append([p[0] for p in pairs])
        out_i.append([p[1] for p in pairs])
    return torch.tensor(out_s), torch.tensor(out_i)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 200])
@pytest.mark.parametrize("k", [1, 5, 80])
def test_streaming_topk_equals_brute_force(chunk, k):
    g = torch.Generator().manual_seed(chunk * 100 + k)
    n, d, q = 57, 9, 4
    feats = torch.randn(n, d, generator=g)
    feats[10] = 0  # an all-zero row
    feats[20] = feats[3]  # an exact tie
    ids = torch.randperm(n, generator=g) + 1000
    queries = unit_normalize(torch.randn(q, d, generator=g))
    chunks = [(ids[s : s + chunk], feats[s : s + chunk]) for s in range(0, n, chunk)]
    s, i = stream_topk(chunks, queries, k, transform=unit_normalize)
    bs, bi = brute_topk(queries @ unit_normalize(feats).T, ids, k)
    assert s.shape == (q, min(k, n)) and torch.isfinite(s).all()
    assert torch.equal(i, bi) and torch.allclose(s, bs, rtol=1e-5, atol=1e-6)


def test_topk_rejects_k_below_one():
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        TopK(2, 0)


def test_lambda_rule_and_whitening_on_synthetic_spectra():
    g = torch.Generator().manual_seed(0)
    d = 12
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    e_t = torch.logspace(0, -3, d, dtype=torch.float64)
    e_q = torch.logspace(1, -5, d, dtype=torch.float64)
    r_t = {"a": basis @ torch.diag(e_t) @ basis.T}
    r_q = {"a": basis @ torch.diag(e_q) @ basis.T}
    for k in (0, 4, 9):
        lam = crossing_lambda(r_q, r_t, k)
        assert abs(lam * e_q[k] - (1 - lam) * e_t[k]) < 1e-12 * e_t[k].item() * 10
        assert 0 < lam < 1
    # whitened features have identity autocorrelation
    x = torch.randn(4000, d, generator=g, dtype=torch.float64) @ torch.diag(e_t.sqrt()) @ basis.T
    r = x.T @ x / len(x)
    white = x @ inverse_root(r, 0.0, 0.5)
    assert (white.T @ white / len(x) - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-8
    p = build_preconditioner([("a", 0, d)], {"a": r}, damping=0.0)
    assert p.lam is None and (p.apply(x).double().T @ p.apply(x).double() / len(x) - torch.eye(d)).abs().max() < 1e-3


@pytest.mark.parametrize("score", ["cosine", "trackstar"])
def test_a_training_document_ranks_itself_first(built, score):
    model, tok, path = built
    att = Attributor(path, model, tok, score=score)
    hits = att.query([DOCS[3], DOCS[17]], k=3)
    assert [h[0].row_id for h in hits] == [3, 17], [[(x.row_id, x.score) for x in h] for h in hits]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4) and hits[0][1].score < 0.999
    assert hits[1][0].text is None  # an in-memory dataset cannot be re-loaded from the manifest
    with_texts = Attributor(path, model, tok, score=score, dataset=datasets.Dataset.from_dict({"text": DOCS}))
    assert with_texts.query(DOCS[17], k=1)[0][0].text == DOCS[17]


def test_query_stats_mix_and_one_sided(built):
    model, tok, path = built
    att = Attributor(path, model, tok, score="trackstar")
    lam = att.fit_query_stats(DOCS[:6])
    assert 0 < lam < 1
    assert att.query(DOCS[4], k=1)[0][0].row_id == 4
    assert (path / "autocorrelation.safetensors").exists()
    one = Attributor(path, model, tok, score="one_sided")
    s, i = one.scores_topk(one.features(DOCS[:2]), 24)
    assert i.shape == (2, 24) and torch.isfinite(s).all()


def test_faiss_flat_equals_exact_streaming(built):
    pytest.importorskip("faiss")
    model, tok, path = built
    att = Attributor(path, model, tok, score="trackstar")
    feats = att.features(DOCS[:5])
    s, i = att.scores_topk(feats, 6)
    fs, fi = att.faiss_index().search(att.query_transform(feats).numpy(), 6)
    assert torch.equal(torch.from_numpy(fi), i)
    assert torch.allclose(torch.from_numpy(fs), s, atol=1e-5)


def test_all_pairs_matches_topk(built):
    model, tok, path = built
    att = Attributor(path, model, tok, score="cosine")
    feats = att.features(DOCS[5:7])
    full = att.scores_all(feats)
    s, i = att.scores_topk(feats, 4)
    assert full.shape == (2, 24)
    assert torch.allclose(full.gather(1, i), s)


def test_mismatched_model_is_refused(built):
    model, tok, path = built
    other = make_model("llama", seed=1)
    with pytest.raises(ValueError, match="weights differ"):
        Attributor(path, other, tok)
    with pytest.raises(ValueError, match="layers differ|does not match"):
        Attributor(path, make_model("gpt2"), tok)


def _spearman(a, b):
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def test_inner_scores_predict_loss_change_after_an_ascent_step(tmp_path):
    model, tok = make_model("llama", dtype=torch.float64), make_tokenizer()
    ds = datasets.Dataset.from_dict({"text": DOCS[:16]})
    path = tmp_path / "full"
    bergson.collect_gradients(model, ds, tokenizer=tok, projection_dim=0, normalizer="none", progress=False,
                              output_path=str(path))
    att = Attributor(path, model, tok, score="inner")
    prompt, completion = "the cat sat on", " the mat"
    predicted = att.scores_all(att.features([prompt], [completion]))[0]

    from bergson.data import per_example_loss

    def query_loss(m):
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            return per_example_loss(m(input_ids=ids).logits, labels).item()

    base, eta = query_loss(model), 1e-3
    layers = [m.name for m in att.index.modules]
    actual = []
    for text in DOCS[:16]:
        m2 = copy.deepcopy(model)
        ids = torch.tensor([tok(text)["input_ids"]])
        loss = per_example_loss(m2(input_ids=ids).logits, ids).sum()
        weights = [m2.get_submodule(n).weight for n in layers]
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.add_(eta * g)  # ascent on z: unlearn it
        actual.append(query_loss(m2) - base)
    actual = torch.tensor(actual, dtype=torch.float64)
    assert _spearman(predicted.double(), actual) > 0.9
    assert torch.allclose(actual, eta * predicted.double(), rtol=0.2, atol=1e-4 * actual.abs().max().item())


def test_cli_query_score_and_trackstar(tmp_path, capsys):
    model, tok = make_model("llama"), make_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    datasets.Dataset.from_dict({"text": DOCS}).to_json(tmp_path / "train.jsonl")
    queries = [{"prompt": d.split(" number")[0], "completion": " number" + d.split(" number")[1]} for d in DOCS[:4]]
    with open(tmp_path / "q.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in queries)
    common = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"), "--no-progress",
              "--projection_dim", "4"]
    out = tmp_path / "ts"
    assert main(["trackstar", str(out), *common, "--queries", str(tmp_path / "q.jsonl"), "--top_k", "3"]) == 0
    text = capsys.readouterr().out
    assert "scored 4 queries" in text and (out / "scores.safetensors").exists()
    from safetensors.torch import load_file

    res = load_file(out / "scores.safetensors")
    assert res["scores"].shape == (4, 3) and res["row_ids"].shape == (4, 3)
    # the second run reuses the complete index
    assert main(["trackstar", str(out), *common, "--queries", str(tmp_path / "q.jsonl")]) == 0
    assert "reusing the complete index" in capsys.readouterr().out
    assert main(["query", str(out), "--prompt", DOCS[2], "--top_k", "2", "--score", "cosine"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[1].startswith("rank") and lines[2].split()[:3] == ["1", "+1.0000", "2"]
    assert DOCS[2][:30] in lines[2]
    assert main(["score", str(out), "--queries", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "s.st"),
                 "--all_pairs"]) == 0
    assert load_file(tmp_path / "s.st")["scores"].shape == (4, 24)
