"""GradientCollector against a float64 batch-size-1 autograd loop."""

import pytest
import torch
from torch import nn

import bergson
from bergson import AdafactorNormalizer, AdamNormalizer, GradientCollector
from bergson.data import pad_batch, per_example_loss
from tests.models import ground_truth, make_model, random_docs, rel_err

LENGTHS = (7, 12, 3, 9)  # one padded batch of different lengths


def run(collector, model, docs, labels=None):
    ids, mask, lab = pad_batch(docs, labels or docs)
    with collector:
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_example_loss(logits, lab).sum().backward()
    return collector


def full_feature(gt_row, layers):
    return torch.cat([gt_row[n].flatten() for n in layers])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_full_gradient_equals_autograd_loop(arch, dtype, tol):
    model = make_model(arch, dtype=dtype)
    docs = random_docs(LENGTHS)
    col = run(GradientCollector(model, projection_dim=0, backend="torch"), model, docs)
    gt = ground_truth(make_model(arch, dtype=torch.float64), col.layers, docs)
    flat = col.flat_gradients()
    assert flat.shape == (len(docs), sum(s.out_features * s.in_features for s in col.layers.values()))
    for n in range(len(docs)):
        assert rel_err(flat[n], full_feature(gt[n], col.layers)) < tol
    # every layer on its own too (the example's whole vector could hide one bad layer)
    for name in col.layers:
        g = torch.stack([gt[n][name].flatten() for n in range(len(docs))])
        if g.norm() > 1e-8:
            assert rel_err(col.gradients[name], g) < tol, name


def test_projected_features_are_L_G_Rt(arch):
    model = make_model(arch, dtype=torch.float64)
    docs = random_docs(LENGTHS, seed=1)
    col = run(GradientCollector(model, projection_dim=5, seed=3, backend="torch"), model, docs)
    gt = ground_truth(model, col.layers, docs)
    for name in col.layers:
        L, R = col.projection(name, dtype=torch.float64)
        assert L.shape == (5, col.layers[name].out_features) and R.shape == (5, col.layers[name].in_features)
        want = torch.stack([(L @ gt[n][name] @ R.T).flatten() for n in range(len(docs))])
        assert col.gradients[name].shape == (len(docs), 25)
        assert rel_err(col.gradients[name], want) < 1e-10, name


def _random_moments(col, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in col.layers.items():
        if kind == "adafactor":
            out[name] = AdafactorNormalizer(
                torch.rand(s.out_features, generator=g, dtype=torch.float64) + 0.1,
                torch.rand(s.in_features, generator=g, dtype=torch.float64) + 0.1,
            )
        else:
            out[name] = AdamNormalizer(
                torch.rand(s.out_features, s.in_features, generator=g, dtype=torch.float64) + 0.1, eps=1e-3
            )
    return out


@pytest.mark.parametrize("kind", ["adafactor", "adam"])
@pytest.mark.parametrize("p", [0, 4])
def test_normalization_matches_elementwise_definition(kind, p):
    model = make_model("gpt2", dtype=torch.float64)
    docs = random_docs(LENGTHS, seed=2)
    layers = GradientCollector(model).layers
    norms = _random_moments(GradientCollector(model), kind)
    col = run(GradientCollector(model, projection_dim=p, normalizers=norms, backend="torch"), model, docs)
    gt = ground_truth(model, layers, docs)
    for name in layers:
        nrm = norms[name]
        if kind == "adafactor":  # V = r cᵀ / mean(r), G / sqrt(V)
            v = torch.outer(nrm.row, nrm.col) / nrm.row.mean()
            denom = v.sqrt()
        else:  # G / (sqrt(v) + eps)
            denom = nrm.avg_sq.sqrt() + nrm.eps
        L, R = col.projection(name, dtype=torch.float64)
        want = []
        for n in range(len(docs)):
            g = gt[n][name] / denom
            want.append((g if p == 0 else L @ g @ R.T).flatten())
        assert rel_err(col.gradients[name], torch.stack(want)) < 1e-10, name


def test_same_document_alone_and_in_padded_batch(arch):
    model = make_model(arch)
    docs = random_docs((5, 30, 17), seed=4)
    a = run(GradientCollector(model, projection_dim=8, backend="torch"), model, docs).flat_gradients()
    b = run(GradientCollector(model, projection_dim=8, backend="torch"), model, docs[:1]).flat_gradients()
    assert a.shape[0] == 3 and b.shape[0] == 1
    assert rel_err(a[0], b[0]) < 1e-5
    assert rel_err(a[0], a[2]) > 0.1  # different documents really differ


def test_closure_and_dict_modes_agree():
    model = make_model("llama")
    docs = random_docs(LENGTHS, seed=5)
    seen = {}
    calls = []

    def closure(name, grads):
        calls.append(name)
        seen[name] = grads.clone()

    run(GradientCollector(model, closure, projection_dim=4, backend="torch"), model, docs)
    col = run(GradientCollector(model, projection_dim=4, backend="torch"), model, docs)
    assert sorted(calls) == sorted(col.layers)  # once per layer per backward
    for name in col.layers:
        assert torch.equal(seen[name], col.gradients[name])


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_requires_grad_restored_after_exception():
    model = make_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's own setting
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert _hook_count(model) == 0
    col = GradientCollector(model, projection_dim=4)
    with pytest.raises(RuntimeError, match="boom"):
        with col:
            assert _hook_count(model) > 0
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    # the model trains normally afterwards
    ids = torch.tensor([random_docs((6,))[0]])
    model(input_ids=ids).logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_collection_populates_no_parameter_grad():
    model = make_model("gpt2")
    run(GradientCollector(model, projection_dim=4), model, random_docs(LENGTHS))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_bias_feature_is_bias_gradient():
    model = make_model("gpt2", dtype=torch.float64)
    docs = random_docs(LENGTHS, seed=6)
    col = run(GradientCollector(model, projection_dim=0, include_bias=True), model, docs)
    name = "transformer.h.0.mlp.c_fc"  # Conv1D with bias
    spec = col.layers[name]
    assert col.feature_dim(name) == spec.out_features * spec.in_features + spec.out_features
    bias = model.get_submodule(name).bias
    for n, d in enumerate(docs):
        bias.requires_grad_(True)
        x = torch.tensor([d])
        (gb,) = torch.autograd.grad(per_example_loss(model(input_ids=x).logits, x).sum(), bias)
        assert rel_err(col.gradients[name][n, -spec.out_features :], gb) < 1e-10


class TwiceMLP(nn.Module):
    """A non-LM whose one Linear is applied twice (shared weights) to a float input."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_shared_layer_called_twice_and_float_inputs():
    torch.manual_seed(0)
    model = TwiceMLP().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with GradientCollector(model, projection_dim=0) as col:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for n in range(5):
        (g,) = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum"), model.shared.weight
        )
        assert rel_err(col.gradients["shared"][n], g.flatten()) < 1e-10


def test_target_module_globs_and_layout():
    model = make_model("llama")
    col = GradientCollector(model, projection_dim=3, target_modules=["*.mlp.*", "lm_head"])
    assert list(col.layers)[-1] == "lm_head"
    assert all(".mlp." in n for n in list(col.layers)[:-1]) and len(col.layers) == 7
    offsets = [off for _, off, _ in col.layout]
    assert offsets == [9 * k for k in range(7)] and col.total_dim == 63


def test_bad_arguments_raise_clear_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="projection_dim must be an int >= 0, got -1"):
        GradientCollector(model, projection_dim=-1)
    with pytest.raises(ValueError, match="no torch.nn.Linear or transformers Conv1D"):
        GradientCollector(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))
    with pytest.raises(ValueError, match="match none of the model's layers"):
        GradientCollector(model, target_modules="nothing*")
    with pytest.raises(ValueError, match="backend must be one of"):
        GradientCollector(model, backend="cuda")
    with pytest.raises(ValueError, match=r"expected \(out, in\) = \(48, 32\)"):
        GradientCollector(
            model, normalizers={"model.layers.0.mlp.up_proj": AdafactorNormalizer(torch.ones(32), torch.ones(48))}
        )
    with pytest.raises(ValueError, match="not layers of the model: \\['nope'\\]"):
        GradientCollector(model, normalizers={"nope": AdafactorNormalizer(torch.ones(2), torch.ones(2))})
    # a dict covering the whole model serves a subset of layers
    full = {n: AdafactorNormalizer(torch.ones(s.out_features), torch.ones(s.in_features))
            for n, s in GradientCollector(model).layers.items()}
    assert list(GradientCollector(model, normalizers=full, target_modules="lm_head").normalizers) == ["lm_head"]


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    model = make_model("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with GradientCollector(model, backend="triton"):
            pass
    assert _hook_count(model) == 0


def test_public_api_is_exported():
    for name in bergson.__all__:
        assert getattr(bergson, name) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_accumulates_in_fp32(dtype):
    docs = random_docs(LENGTHS, seed=8)
    model32 = make_model("llama")
    ref = run(GradientCollector(model32, projection_dim=4), model32, docs)
    model = make_model("llama", dtype=dtype)
    half = run(GradientCollector(model, projection_dim=4), model, docs)
    feats, want = half.flat_gradients(), ref.flat_gradients()
    assert feats.dtype == torch.float32  # features are accumulated and returned in fp32
    assert rel_err(feats, want) < 0.05  # the model itself computes in half precision
