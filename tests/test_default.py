"""The embedded default: synthetic fact corpus and the small model shipped with the package."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import bergson.default as default
from bergson.default import corpus

DEFAULT_DIR = Path(default.__file__).resolve().parent


def test_corpus_is_deterministic():
    assert corpus.documents() == corpus.documents()
    assert corpus.queries() == corpus.queries()
    assert corpus.facts() == corpus.facts()
    assert corpus.documents(seed=1) != corpus.documents()
    # returned rows are copies: mutating them does not change later calls
    docs = corpus.documents()
    docs[0]["facts"].append(-1)
    assert corpus.documents()[0]["facts"] != docs[0]["facts"]


def test_corpus_import_is_stdlib_only():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(DEFAULT_DIR / 'corpus.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.documents()\n"
        "bad = {'torch', 'transformers', 'datasets', 'numpy'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_corpus_shape():
    docs, qs, fs = corpus.documents(), corpus.queries(), corpus.facts()
    assert [d["doc_id"] for d in docs] == list(range(len(docs)))
    assert 2000 <= len(docs) <= 5000
    kinds = Counter(d["kind"] for d in docs)
    assert set(kinds) == {"fact", "filler"}
    assert 0.2 <= kinds["filler"] / len(docs) <= 0.3
    assert all((d["kind"] == "fact") == bool(d["facts"]) for d in docs)
    assert len(qs) == len(fs) == len({q["fact_id"] for q in qs})
    assert all(q["completion"].startswith(" ") and not q["prompt"].endswith(" ") for q in qs)
    # fact documents are interleaved with fillers, not grouped
    first = [d["kind"] for d in docs[:200]]
    assert 20 < first.count("filler") < 100
    # every template is held out for some facts and used in training for most
    held = Counter((f["attribute"], f["heldout_template"]) for f in fs)
    for attr, templates in corpus.TEMPLATES.items():
        n = sum(f["attribute"] == attr for f in fs)
        assert len(templates) >= 4
        for t in range(len(templates)):
            assert 0 < held[(attr, t)] <= 0.3 * n


def test_gold_documents_are_exact():
    docs = corpus.documents()
    for q in corpus.queries():
        value = q["completion"].strip()
        assert len(q["gold_doc_ids"]) >= 3
        for i in q["gold_doc_ids"]:
            assert q["fact_id"] in docs[i]["facts"]
            assert q["entity"] in docs[i]["text"] and value in docs[i]["text"]
        # no other document mentions both the person and the value
        pat = re.compile(rf"\b{re.escape(value)}\b")
        others = [d for d in docs if d["doc_id"] not in q["gold_doc_ids"]
                  and q["entity"] in d["text"] and pat.search(d["text"])]
        assert not others, (q, others[:2])


def test_heldout_template_not_in_training_docs():
    texts = [d["text"] for d in corpus.documents()]
    for q in corpus.queries():
        sentence = q["prompt"] + q["completion"]
        assert not any(q["prompt"] in t for t in texts), q
        assert not any(sentence in t for t in texts), q
    # the training-template prompts do appear, with their value right after them
    for p in corpus.template_prompts()[:50]:
        assert any(p["prompt"] + p["completion"] in t for t in texts)


def test_datasets():
    ds = default.dataset()
    assert ds.column_names == ["doc_id", "text", "kind", "facts"]
    assert len(ds) == len(corpus.documents())
    assert ds[5]["facts"] == corpus.documents()[5]["facts"]
    qd = default.query_dataset()
    assert qd.column_names == ["fact_id", "prompt", "completion", "gold_doc_ids", "entity", "attribute"]
    assert qd[3] == corpus.queries()[3]


def test_shipped_files_are_small():
    assert default.MODEL_DIR == DEFAULT_DIR / "model"
    files = [f for f in DEFAULT_DIR.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    names = {f.name for f in default.MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20


@pytest.fixture(scope="module")
def shipped():
    return default.load_model()


def test_tokenizer_prepends_bos(shipped):
    _, tok = shipped
    ids = tok("Ello lives in")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_shipped_model_recalls_heldout_facts(shipped):
    """Greedy accuracy on 50 held-out-template queries, recomputed with ``generate`` (not
    trusted from training.json, which used a teacher-forced check)."""
    import torch

    model, tok = shipped
    assert model.config.model_type == "llama"
    record = json.loads((default.MODEL_DIR / "training.json").read_text())
    recorded = record["heldout_query_accuracy"]["fraction"]
    qs = corpus.queries()[::12][:50]
    assert len(qs) == 50
    correct = 0
    with torch.no_grad():
        for q in qs:
            p = tok(q["prompt"], return_tensors="pt")
            target = tok(q["completion"], add_special_tokens=False)["input_ids"]
            out = model.generate(**p, max_new_tokens=len(target), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            correct += out[0, p["input_ids"].shape[1]:].tolist() == target
    acc = correct / len(qs)
    assert acc >= recorded - 0.15, (acc, recorded)


def test_fast_loader_equals_transformers():
    """``bergson.default.fast`` (what the CLI loads) = transformers' LlamaForCausalLM: same
    tokens, logits, parameter names, fingerprint and per-example features."""
    import torch

    import bergson
    from bergson.collect import model_fingerprint
    from bergson.data import pad_batch
    from bergson.data_sources import _tokenizer_hash
    from bergson.default import fast

    hf_model, hf_tok = default.load_model()
    model, tok = fast.load(default.model_path())
    texts = [d["text"] for d in corpus.documents()[:300]]
    comps = [q["completion"] for q in corpus.queries()[:50]]
    assert tok(texts)["input_ids"] == hf_tok(texts)["input_ids"]
    assert tok(comps, add_special_tokens=False)["input_ids"] == hf_tok(comps, add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id == hf_tok.pad_token_id and tok.eos_token_id == hf_tok.eos_token_id
    assert _tokenizer_hash(tok) == _tokenizer_hash(hf_tok)
    assert list(model.state_dict()) == list(hf_model.state_dict())
    assert model_fingerprint(model) == model_fingerprint(hf_model)
    ids = hf_tok(texts[:24])["input_ids"]
    x, mask, _ = pad_batch(ids, ids, tok.pad_token_id)
    assert not bool(mask.all())  # a padded batch
    with torch.no_grad():
        a, b = model(input_ids=x, attention_mask=mask).logits, hf_model(input_ids=x, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max().item() < 1e-5 * b.abs().max().item()
    kw = dict(projection_dim=0, normalizer="none", progress=False, token_batch_size=256)
    ds = default.dataset().select(range(12))
    f1 = bergson.collect_gradients(model, ds, tokenizer=tok, **kw).with_format("torch")[:]["gradients"]
    f2 = bergson.collect_gradients(hf_model, ds, tokenizer=hf_tok, **kw).with_format("torch")[:]["gradients"]
    assert ((f1 - f2).norm() / f2.norm()).item() < 1e-5


def test_cli_default_model_does_not_import_transformers():
    code = (
        "import sys\n"
        "from bergson.data_sources import load_model\n"
        "model, tok, info, tok_info = load_model(None)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print(info['class'], info['id'], tok_info['class'], type(model).__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LlamaForCausalLM", "bergson:default", "TokenizersBackend", "bergson.default.fast"]
