"""Normalizers from real optimizer states, fitted from data, converted, saved and loaded."""

import pytest
import torch

import bergson
from bergson import AdafactorNormalizer, AdamNormalizer, GradientCollector
from bergson.data import pad_batch, per_example_loss
from tests.models import ground_truth, make_model, random_docs, rel_err


def train_steps(model, opt, steps=3):
    docs = random_docs((9, 14, 6, 11), seed=10)
    ids, mask, lab = pad_batch(docs, docs)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        per_example_loss(model(input_ids=ids, attention_mask=mask).logits, lab).mean().backward()
        opt.step()
    model.eval()


def make_optimizer(model, name):
    from transformers.optimization import Adafactor as HFAdafactor

    attn = [p for n, p in model.named_parameters() if "attn" in n]
    rest = [p for n, p in model.named_parameters() if "attn" not in n]
    if name == "adam":  # two parameter groups with their own eps
        return torch.optim.Adam([{"params": attn, "eps": 1e-6}, {"params": rest}], lr=1e-2, betas=(0.9, 0.95))
    if name == "adamw":
        return torch.optim.AdamW([{"params": attn, "eps": 1e-7}, {"params": rest}], lr=1e-2)
    if name == "torch_adafactor":
        return torch.optim.Adafactor([{"params": attn, "lr": 1e-3}, {"params": rest}], lr=1e-2)
    return HFAdafactor(
        [{"params": attn, "lr": 1e-3}, {"params": rest}], lr=1e-2, relative_step=False, scale_parameter=False
    )


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "torch_adafactor", "hf_adafactor"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_normalizers_from_real_optimizer_state(arch, opt_name):
    model = make_model(arch)
    opt = make_optimizer(model, opt_name)
    train_steps(model, opt)
    norms = bergson.normalizers_from_optimizer(model, opt)
    layers = GradientCollector(model).layers
    assert set(norms) == set(layers)
    for name, spec in layers.items():
        mod = model.get_submodule(name)
        st = opt.state[mod.weight]
        nrm = norms[name]
        assert nrm.shape == (spec.out_features, spec.in_features)
        group = next(g for g in opt.param_groups if any(p is mod.weight for p in g["params"]))
        if opt_name in ("adam", "adamw"):
            assert isinstance(nrm, AdamNormalizer)
            v = st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))
            assert torch.allclose(nrm.avg_sq, v.T if spec.transposed else v, rtol=1e-6, atol=0)
            assert nrm.eps == group["eps"]
        else:
            assert isinstance(nrm, AdafactorNormalizer)
            if opt_name == "torch_adafactor":
                row, col = st["row_var"].reshape(-1), st["col_var"].reshape(-1)
            else:
                row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
            if spec.transposed:  # Conv1D stores [in, out]: the optimizer's rows are our columns
                row, col = col, row
            assert torch.equal(nrm.row, row) and torch.equal(nrm.col, col)
            # the optimizer's own preconditioner equals ours
            if opt_name == "torch_adafactor":
                v_opt = st["row_var"] @ st["col_var"] / st["row_var"].mean()
                assert torch.allclose(nrm.full().float(), v_opt.T if spec.transposed else v_opt, rtol=1e-4)
    assert any(n.startswith("transformer") or n.startswith("model") for n in norms)


def test_bias_moments_and_kind_conversion_from_adam():
    model = make_model("gpt2")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, steps=2)
    norms = bergson.normalizers_from_optimizer(model, opt, kind="adafactor")
    adam = bergson.normalizers_from_optimizer(model, opt)
    name = "transformer.h.1.mlp.c_proj"
    assert isinstance(norms[name], AdafactorNormalizer)
    assert torch.allclose(norms[name].row, adam[name].avg_sq.mean(1))
    assert torch.allclose(norms[name].col, adam[name].avg_sq.mean(0))
    b = opt.state[model.get_submodule(name).bias]["exp_avg_sq"] / (1 - 0.999 ** 2)
    assert torch.allclose(adam[name].bias, b)


def test_adafactor_to_adam_is_the_rank_one_estimate():
    nrm = AdafactorNormalizer(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0, 5.0]))
    v = nrm.to_adam().avg_sq
    assert torch.allclose(v, torch.tensor([[2.0, 3.0, 5.0], [8.0, 12.0, 20.0]]) / 2.5)
    alpha, beta = nrm.scales(torch.float64)
    assert torch.allclose(torch.outer(alpha, beta), v.double().rsqrt())


def test_save_and_load_round_trip(tmp_path):
    norms = {
        "a.b": AdafactorNormalizer(torch.rand(3), torch.rand(4), bias=torch.rand(3), eps=1e-20),
        "c": AdamNormalizer(torch.rand(2, 5), eps=1e-6),
    }
    path = tmp_path / "norms.safetensors"
    bergson.save_normalizers(norms, path)
    back = bergson.load_normalizers(path)
    assert set(back) == set(norms)
    assert torch.equal(back["a.b"].row, norms["a.b"].row) and torch.equal(back["a.b"].bias, norms["a.b"].bias)
    assert back["a.b"].eps == 1e-20 and back["c"].eps == 1e-6
    assert torch.equal(back["c"].avg_sq, norms["c"].avg_sq) and back["c"].bias is None
    assert not list(tmp_path.glob("*.tmp*"))


# lengths include long documents so both moment paths run: S(O+I) < OI uses Gram matrices,
# longer documents materialize G
@pytest.mark.parametrize("lengths", [(7, 12, 3, 9), (70, 40, 66)], ids=["gram", "materialize"])
def test_fit_normalizers_equals_mean_of_squared_gradients(lengths):
    model = make_model("llama", dtype=torch.float64)
    docs = random_docs(lengths, seed=11)
    ds = [{"input_ids": d} for d in docs]
    ada = bergson.fit_normalizers(model, ds, kind="adafactor", progress=False, token_batch_size=64)
    adam = bergson.fit_normalizers(model, ds, kind="adam", progress=False, max_examples=2)
    layers = GradientCollector(model).layers
    gt = ground_truth(model, layers, docs)
    for name in layers:
        sq = torch.stack([gt[n][name] ** 2 for n in range(len(docs))])
        assert rel_err(ada[name].row, sq.mean(2).mean(0)) < 1e-5, name  # stored in float32
        assert rel_err(ada[name].col, sq.mean(1).mean(0)) < 1e-5, name
        assert rel_err(adam[name].avg_sq, sq[:2].mean(0)) < 1e-5, name


def test_fit_normalizers_rejects_bad_kind():
    with pytest.raises(ValueError, match="kind must be 'adafactor' or 'adam'"):
        bergson.fit_normalizers(make_model("llama"), [{"input_ids": [1, 2, 3]}], kind="sgd")
