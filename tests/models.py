"""Tiny models and a tokenizer built at test time (nothing is downloaded), and the ground truth:
per-example gradients from a batch-size-1 ``torch.autograd.grad`` loop."""

from __future__ import annotations

import copy

import torch

from bergson.data import per_example_loss

ARCHS = ("llama", "neox", "gpt2")
VOCAB = 101

CORPUS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "bergson traces what a network learned back to its data",
    "gradients of every example are projected and stored",
    "the capital of the fictional land of zor is miralt",
    "attribution asks which training documents drove a completion",
]


def make_model(arch: str, dtype=torch.float32, vocab: int = VOCAB, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=2, eos_token_id=2
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def make_tokenizer(vocab_size: int = VOCAB):
    """A BPE tokenizer trained in a second on CORPUS; deterministic (sorted initial alphabet)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    alphabet = sorted(set("".join(CORPUS)) | set("0123456789.,?!'-▁") - {" "})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>"], show_progress=False,
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def random_docs(lengths, vocab: int = VOCAB, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def ground_truth(model, layers, ids, labels=None, reduction="sum") -> list[dict[str, torch.Tensor]]:
    """Per-example gradients ``{layer: G [out, in]}`` from a batch-size-1 autograd loop.

    A weight tied to an embedding (GPT-2's ``lm_head``) is untied in a copy first: the layer's
    own contribution is what the collector measures.
    """
    labels = labels or ids
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    if any(id(model.get_submodule(n).weight) in tied for n in layers):
        model = copy.deepcopy(model)
        for n in layers:
            mod = model.get_submodule(n)
            mod.weight = torch.nn.Parameter(mod.weight.detach().clone())
    weights = [model.get_submodule(n).weight for n in layers]
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    out = []
    try:
        for x, y in zip(ids, labels):
            logits = model(input_ids=torch.tensor([x])).logits
            loss = per_example_loss(logits, torch.tensor([y]), reduction).sum()
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            row = {}
            for (name, spec), g in zip(layers.items(), grads):
                g = torch.zeros_like(weights[0]) if g is None else g
                row[name] = g.T if spec.transposed else g
            out.append(row)
    finally:
        for w, s in zip(weights, saved):
            w.requires_grad_(s)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
