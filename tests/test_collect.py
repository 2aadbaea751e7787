"""collect_gradients end to end: text in, a Dataset with one feature row per example out."""

import datasets
import pytest
import torch

import bergson
from bergson import GradientCollector
from bergson.data import IGNORE_INDEX, token_batches
from tests.models import CORPUS, ground_truth, make_model, rel_err


@pytest.fixture
def text_ds():
    return datasets.Dataset.from_dict({"text": CORPUS, "idx": list(range(len(CORPUS)))})


def test_full_gradients_match_ground_truth_in_input_order(tokenizer, text_ds):
    model = make_model("gpt2", dtype=torch.float64)
    out = bergson.collect_gradients(
        model, text_ds, tokenizer=tokenizer, projection_dim=0, normalizer="none", token_batch_size=40, progress=False
    )
    assert out.column_names == ["text", "idx", "gradients", "loss", "num_tokens"]
    assert out["idx"] == list(range(len(CORPUS)))
    ids = [tokenizer(t)["input_ids"] for t in CORPUS]
    assert out["num_tokens"] == [len(x) for x in ids]
    layers = GradientCollector(model).layers
    gt = ground_truth(model, layers, ids)
    grads = out.with_format("torch")[:]["gradients"]
    for n in range(len(CORPUS)):
        want = torch.cat([gt[n][name].flatten() for name in layers])
        assert rel_err(grads[n], want) < 1e-6  # stored as float32
    assert all(p.grad is None for p in model.parameters())


def test_features_do_not_depend_on_batching(tokenizer, text_ds):
    model = make_model("llama")
    kw = dict(tokenizer=tokenizer, projection_dim=6, normalizer="adafactor", progress=False, fit_examples=3)
    small = bergson.collect_gradients(model, text_ds, token_batch_size=1, **kw)
    big = bergson.collect_gradients(model, text_ds, token_batch_size=10_000, **kw)
    a = small.with_format("torch")[:]["gradients"]
    b = big.with_format("torch")[:]["gradients"]
    assert a.shape == (len(CORPUS), GradientCollector(model).layers.__len__() * 36)
    assert rel_err(a, b) < 1e-5
    assert torch.allclose(torch.tensor(small["loss"]), torch.tensor(big["loss"]), rtol=1e-5)


def test_completion_only_loss_and_mean_reduction(tokenizer):
    model = make_model("neox", dtype=torch.float64)
    ds = datasets.Dataset.from_dict({"q": ["the cat sat", "a quick"], "a": [" on the mat", " brown fox jumps"]})
    out = bergson.collect_gradients(
        model, ds, tokenizer=tokenizer, prompt_column="q", completion_column="a",
        projection_dim=0, normalizer="none", loss_reduction="mean", progress=False,
    )
    layers = GradientCollector(model).layers
    ids, labels = [], []
    for q, a in zip(ds["q"], ds["a"]):
        p, c = tokenizer(q)["input_ids"], tokenizer(a, add_special_tokens=False)["input_ids"]
        ids.append(p + c)
        labels.append([IGNORE_INDEX] * len(p) + c)
    gt = ground_truth(model, layers, ids, labels, reduction="mean")
    grads = out.with_format("torch")[:]["gradients"]
    for n in range(2):
        assert rel_err(grads[n], torch.cat([gt[n][k].flatten() for k in layers])) < 1e-6
    # the prompt is not in the loss: the sum-reduced gradient is (number of completion tokens) × the mean one
    summed = bergson.collect_gradients(
        model, ds, tokenizer=tokenizer, prompt_column="q", completion_column="a",
        projection_dim=0, normalizer="none", progress=False,
    )
    n_comp = len(tokenizer(ds["a"][1], add_special_tokens=False)["input_ids"])
    s = summed.with_format("torch")[:]["gradients"]
    assert rel_err(s[1], n_comp * grads[1]) < 1e-6


def test_pretokenized_input_and_normalizers_given():
    model = make_model("llama")
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10, 11], [12]]})
    norms = bergson.fit_normalizers(model, ds, kind="adam", progress=False)
    out = bergson.collect_gradients(model, ds, normalizers=norms, projection_dim=4, progress=False)
    g = out.with_format("torch")[:]["gradients"]
    assert torch.isfinite(g).all()
    assert g[0].abs().sum() > 0 and g[2].abs().sum() == 0  # a 1-token document has no loss
    assert out["loss"][2] == 0.0


def test_bad_inputs_raise_clear_errors(tokenizer, text_ds):
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"'body' is not a column.*available columns: \['text', 'idx'\]"):
        bergson.collect_gradients(model, text_ds, tokenizer=tokenizer, prompt_column="body")
    with pytest.raises(ValueError, match="dataset is empty"):
        bergson.collect_gradients(model, text_ds.select([]), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="projection_dim must be an int >= 0"):
        bergson.collect_gradients(model, text_ds, tokenizer=tokenizer, projection_dim=-3)
    with pytest.raises(ValueError, match="no torch.nn.Linear or transformers Conv1D"):
        bergson.collect_gradients(torch.nn.Embedding(10, 3), text_ds, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no tokenizer given"):
        bergson.collect_gradients(model, text_ds)
    with pytest.raises(ValueError, match="normalizer must be one of"):
        bergson.collect_gradients(model, text_ds, tokenizer=tokenizer, normalizer="sgd")
    with pytest.raises(ValueError, match="already has column"):
        bergson.collect_gradients(model, text_ds.add_column("loss", [0.0] * len(text_ds)), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="every document is empty"):
        bergson.collect_gradients(model, datasets.Dataset.from_dict({"text": ["", ""]}), tokenizer=tokenizer)


def test_token_batches_respect_the_budget():
    lengths = [5, 30, 2, 17, 17, 1, 40]
    batches = token_batches(lengths, 40)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 40
    assert batches[0] == [6]  # longest first, alone


def test_sum_log_reduction_is_the_sum_of_log_token_losses(tokenizer):
    """``sum_log`` = Σ_t log(ℓ_t + 1e-6) over loss tokens; its gradient is Σ_t ∇ℓ_t / (ℓ_t + 1e-6)."""
    from bergson.data import LOG_LOSS_EPS, per_example_loss

    model = make_model("llama", dtype=torch.float64)
    ids = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    labels = [list(x) for x in ids]
    labels[1][2] = IGNORE_INDEX  # a token outside the loss
    layers = GradientCollector(model).layers
    name = next(iter(layers))
    weight = model.get_submodule(name).weight
    expected_loss = []
    assert weight.requires_grad
    for x, y in zip(ids, labels):
        logits = model(input_ids=torch.tensor([x])).logits
        logp = torch.log_softmax(logits[0], -1)
        tok_losses = [-logp[t - 1, y[t]] for t in range(1, len(x)) if y[t] != IGNORE_INDEX]
        want = sum(torch.log(lt + LOG_LOSS_EPS) for lt in tok_losses)
        got = per_example_loss(logits, torch.tensor([y]), "sum_log")
        assert abs(got.item() - want.item()) < 1e-10
        expected_loss.append(want.item())
        # gradient identity, token by token through autograd
        g_want = sum(torch.autograd.grad(lt, weight, retain_graph=True)[0] / (lt.item() + LOG_LOSS_EPS) for lt in tok_losses)
        g_got = torch.autograd.grad(got.sum(), weight, retain_graph=True)[0]
        g_sum = torch.autograd.grad(per_example_loss(logits, torch.tensor([y])).sum(), weight)[0]
        assert rel_err(g_got, g_want) < 1e-6  # the tiny Llama's rotary tables are float32
        # not the plain sum (an untrained model has similar token losses, so only slightly different)
        assert rel_err(g_got / g_got.norm(), g_sum / g_sum.norm()) > 1e-3
    out = bergson.collect_gradients(
        model, datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}), projection_dim=0,
        normalizer="none", loss_reduction="sum_log", progress=False,
    )
    gt = ground_truth(model, layers, ids, labels, reduction="sum_log")
    grads = out.with_format("torch")[:]["gradients"]
    for n in range(len(ids)):
        assert rel_err(grads[n], torch.cat([gt[n][k].flatten() for k in layers])) < 1e-6
    assert torch.allclose(torch.tensor(out["loss"], dtype=torch.float64), torch.tensor(expected_loss, dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize("chunk", [1 << 22, 32 * 13, 7 * 13, 13], ids=["one-block", "32-rows", "7-rows", "1-row"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_next_token_loss_matches_cross_entropy(monkeypatch, dtype, chunk):
    """The fused loss = F.cross_entropy on the shifted, upcast logits: values and logits gradient,
    with ignored labels, odd shapes and block boundaries: all 3×17 rows at once, blocks of 32 rows
    (across an example's end), of 7 rows (the last block shorter) and of single rows."""
    from bergson import data

    monkeypatch.setattr(data, "_CE_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    B, S, V = 3, 17, 13
    logits = (4 * torch.randn(B, S, V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 3:6] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX  # an example without any loss token
    w = torch.randn(B, S - 1, generator=g, dtype=torch.float64)

    tok = data._NextTokenCE.apply(logits, labels)
    (grad,) = torch.autograd.grad((tok.double() * w).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    z = ref_logits[:, :-1].reshape(-1, V).to(torch.promote_types(dtype, torch.float32))
    want = torch.nn.functional.cross_entropy(z, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                             reduction="none").view(B, S - 1)
    (grad_want,) = torch.autograd.grad((want.double() * w).sum(), ref_logits)
    assert tok.dtype == want.dtype and grad.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(tok.double(), want.double()) < tol
    assert rel_err(grad.double(), grad_want.double()) < tol
    assert torch.all(tok[labels[:, 1:] == IGNORE_INDEX] == 0) and torch.all(grad[2] == 0) and torch.all(grad[:, -1] == 0)
    assert grad.abs().max() > 0.1  # the comparison is not between zeros


def test_fused_loss_of_an_empty_batch():
    """No examples: an empty loss and an empty gradient, not an error (there is no first block)."""
    from bergson.data import per_example_loss

    logits = torch.randn(0, 5, 7, requires_grad=True)
    loss = per_example_loss(logits, torch.zeros(0, 5, dtype=torch.long))
    loss.sum().backward()
    assert loss.shape == (0,) and logits.grad.shape == (0, 5, 7)


def test_per_example_loss_under_torch_func_uses_the_plain_path():
    """torch.func transforms (tail-patch's vmap(grad(...))) take the unfused path, same values."""
    from bergson.data import per_example_loss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 9), generator=g)
    want = torch.autograd.grad(per_example_loss(logits.requires_grad_(True), labels).sum(), logits)[0]
    got = torch.func.grad(lambda z: per_example_loss(z, labels).sum())(logits.detach())
    assert rel_err(got, want) < 1e-12
    per_row = torch.func.vmap(lambda z, y: per_example_loss(z[None], y[None])[0])(logits.detach(), labels)
    assert rel_err(per_row, per_example_loss(logits.detach(), labels)) < 1e-12


def test_fused_loss_keeps_small_losses_of_confident_tokens():
    """Logits of magnitude ~60 with a confident target: the float32 loss (~1e-3 nats) must not be
    the rounded difference of two ~60-sized numbers (ulp(60) ≈ 4e-6)."""
    from bergson import data

    g = torch.Generator().manual_seed(2)
    z = 60 + torch.randn(2, 6, 50, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    z.scatter_(-1, labels.roll(-1, 1)[..., None], 71.0)  # the next token is 11 nats above the rest
    truth = -torch.log_softmax(z[:, :-1], -1).gather(-1, labels[:, 1:, None])[..., 0]
    got = data._NextTokenCE.apply(z.float(), labels).double()
    assert 1e-4 < truth.min() and truth.max() < 1e-2
    assert (got - truth).abs().max() < 3e-7  # float32 resolution near 1, not near 60
