"""pytest-benchmark suite for the CPU hot paths: `pytest bench/ --benchmark-only`.

Shapes are a 17M-Llama MLP layer (384 -> 1024) on a batch of 8 x 128 tokens, p = 16.
"""


import pytest
import torch

from bergson_kernels import projection_matrix, reference

N, S, O, I, P = 8, 128, 1024, 384, 16


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(N, S, I, generator=g),
        delta=torch.randn(N, S, O, generator=g),
        L=projection_matrix(P, O, name="m", side="left"),
        R=projection_matrix(P, I, name="m", side="right"),
        alpha=torch.rand(O, generator=g) + 0.5,
        beta=torch.rand(I, generator=g) + 0.5,
        v=torch.rand(O, I, generator=g) + 0.5,
    )


def test_project_scale(benchmark, data):
    out = benchmark(reference.project_scale, data["x"], data["R"], data["beta"])
    assert out.shape == (N, S, P)


def test_outer_project(benchmark, data):
    xt = reference.project_scale(data["x"], data["R"], data["beta"])
    out = benchmark(reference.outer_project_padded, data["delta"], xt, data["L"], data["alpha"])
    assert out.shape == (N, P, P)


def test_adam_project_chunked(benchmark, data):
    out = benchmark(reference.adam_project_padded, data["delta"], data["x"], data["L"], data["R"], data["v"])
    assert out.shape == (N, P, P)


def test_naive_materialize_then_project(benchmark, data):
    def naive():
        g = torch.bmm(data["delta"].transpose(1, 2), data["x"])
        return data["L"] @ g @ data["R"].T

    assert benchmark(naive).shape == (N, P, P)


def test_collector_step_tiny_llama(benchmark):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bergson import GradientCollector
    from bergson.data import per_example_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=1024)).eval()
    ids = torch.randint(0, 1024, (8, 128))
    col = GradientCollector(model, lambda n, g: None, projection_dim=16)

    def step():
        with col:
            per_example_loss(model(input_ids=ids).logits, ids).sum().backward()

    benchmark(step)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_next_token_loss_8k_vocab(benchmark, fused):
    """per_example_loss forward + backward on 8 × 128 positions of a 8192-token vocabulary: the
    fused path vs plain ``F.cross_entropy`` on the shifted, upcast logits (same values)."""
    from bergson.data import IGNORE_INDEX, per_example_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, S, 8192, generator=g).requires_grad_(True)
    labels = torch.randint(0, 8192, (N, S), generator=g)

    def plain(z, y):
        z, t = z[:, :-1], y[:, 1:]
        return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]).float(), t.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="none").view(t.shape).sum(1)

    loss = per_example_loss if fused else plain

    def step():
        logits.grad = None
        loss(logits, labels).sum().backward()
        return logits.grad

    grad = benchmark(step)
    assert grad.shape == logits.shape and grad[:, -1].abs().max() == 0
