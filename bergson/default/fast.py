"""A transformers-free loader for the embedded default model, so that ``bergson build`` on the
default starts computing in seconds: importing transformers' model classes costs ~5 s on a
2-core CPU, more than everything else before the first batch together.

:class:`Llama` is the Llama forward the default model needs (RMSNorm, rotary embeddings with
HF's ``rotate_half`` convention, causal attention with a padding mask, SwiGLU MLP, tied output
embedding) with the same module tree and parameter names as ``transformers``'
``LlamaForCausalLM``, so layer names, fingerprints and indexes are interchangeable; tests hold
its logits and per-example gradients to the transformers model's.  :class:`Tokenizer` wraps the
``tokenizers`` library (BOS comes from ``tokenizer.json``'s post-processor, as in transformers).
Only what bergson calls is implemented: this is not a general model class.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or h // self.heads
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, getattr(cfg, "mlp_bias", False)
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _inv_freq(cfg) -> torch.Tensor:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)


class Llama(nn.Module):
    """``model(input_ids, attention_mask=None).logits``, parameter names as transformers'."""

    _no_split_modules = ["DecoderLayer"]  # the blocks FSDP shards one by one (bergson --fsdp)

    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", _inv_freq(cfg), persistent=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, **_):
        b, s = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        pos = torch.arange(s, device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(input_ids.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return SimpleNamespace(logits=self.lm_head(self.model.norm(x)))


class Tokenizer:
    """The parts of a transformers fast tokenizer that bergson uses, over ``tokenizers``."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self.backend_tokenizer = _Tok.from_file(str(path / "tokenizer.json"))
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        tok_id = self.backend_tokenizer.token_to_id
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            tok_id(cfg[k]) if isinstance(cfg.get(k), str) else None for k in ("bos_token", "eos_token", "pad_token")
        )

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __call__(self, text, add_special_tokens: bool = True, return_offsets_mapping: bool = False, **_):
        single = isinstance(text, str)
        encs = self.backend_tokenizer.encode_batch([text] if single else list(text), add_special_tokens=add_special_tokens)
        out = {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return {k: v[0] for k, v in out.items()} if single else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load(path: str | Path, dtype: torch.dtype | None = None) -> tuple[Llama, Tokenizer]:
    """The model in ``path`` (a Llama ``config.json`` + ``model.safetensors``) and its tokenizer."""
    from safetensors.torch import load_file

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "llama" or raw.get("rope_parameters", {}).get("rope_type", "default") != "default":
        raise ValueError(f"{path} is not a plain Llama: load it with transformers")
    cfg = SimpleNamespace(**{"attention_bias": False, "tie_word_embeddings": False, "pad_token_id": None, **raw})
    # Built on CPU, not on the meta device: meta initializers import torch._dynamo (~2 s).
    model = Llama(cfg)
    state = load_file(str(path / "model.safetensors"))
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), Tokenizer(path)


__all__ = ["Llama", "Tokenizer", "load"]
