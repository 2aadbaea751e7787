"""backend="triton" (through Triton's interpreter on CPU) equals backend="torch" end to end."""

import pytest
import torch

import bergson
from bergson import GradientCollector
from bergson.hooks import resolve_backend
from tests.models import CORPUS, make_model, make_tokenizer, random_docs, rel_err
from tests.test_collector import _random_moments, run


@pytest.mark.parametrize("kind", ["none", "adafactor", "adam"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_triton_collector_equals_torch(arch, kind):
    model = make_model(arch)
    docs = random_docs((7, 12, 1, 9), seed=3)
    norms = None if kind == "none" else _random_moments(GradientCollector(model), kind)
    feats = {}
    for backend in ("torch", "triton"):
        col = run(GradientCollector(model, projection_dim=8, normalizers=norms, backend=backend), model, docs)
        assert col._ops.backend == backend
        feats[backend] = col.flat_gradients()
    assert feats["torch"].abs().sum() > 0
    assert rel_err(feats["triton"], feats["torch"]) < 1e-5


def test_collect_gradients_with_triton_backend():
    model, tok = make_model("neox"), make_tokenizer()
    kw = dict(tokenizer=tok, projection_dim=4, normalizer="adafactor", progress=False, fit_examples=4)
    a = bergson.collect_gradients(model, [{"text": t} for t in CORPUS], backend="torch", **kw)
    b = bergson.collect_gradients(model, [{"text": t} for t in CORPUS], backend="triton", **kw)
    ga, gb = (x.with_format("torch")[:]["gradients"] for x in (a, b))
    assert rel_err(gb, ga) < 1e-5


def test_auto_backend_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # TRITON_INTERPRET=1 in tests
