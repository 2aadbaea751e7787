"""Train the embedded default model (``bergson/default/model/``) on the synthetic fact corpus.

    python scripts/train_default.py            # default arguments reproduce the shipped model

Trains a byte-level BPE tokenizer and a small ``LlamaForCausalLM`` from scratch on
``bergson.default.corpus.documents()`` (each document tokenized exactly as ``tokenizer(text)``
does it: BOS + text, no EOS), with AdamW and a warmup + cosine schedule.  Every few epochs it
logs the greedy accuracy on the held-out-template queries (``corpus.queries()``) and on the
training-template prompts; at the end it saves the model (safetensors), the tokenizer and
``training.json``.

Greedy accuracy is computed teacher-forced: one forward pass over prompt + completion, and a
query counts as correct when the argmax at every completion position is the next completion
token.  This is exactly "greedy decoding of len(completion tokens) tokens reproduces the
completion".
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bergson" / "default" / "model"


def load_corpus():
    # Load corpus.py by path: importing ``bergson`` would pull in the rest of the package.
    spec = importlib.util.spec_from_file_location("_bergson_default_corpus", ROOT / "bergson" / "default" / "corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=max_len, padding_side="right",
    )


@torch.no_grad()
def greedy_accuracy(model, tok, items: list[dict], batch_size: int = 256) -> tuple[int, int]:
    """Number of items whose completion greedy decoding reproduces (teacher-forced check)."""
    model.eval()
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        seqs, spans = [], []
        for it in chunk:
            p = tok(it["prompt"])["input_ids"]
            c = tok(it["completion"], add_special_tokens=False)["input_ids"]
            seqs.append(p + c)
            spans.append((len(p), len(c)))
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), tok.pad_token_id)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for j, (np_, nc) in enumerate(spans):
            correct += bool((pred[j, np_ - 1 : np_ - 1 + nc] == ids[j, np_ : np_ + nc]).all())
    model.train()
    return correct, len(items)


def make_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length documents (less padding): shuffle, sort each window
    of 16 batches by length, cut into batches, shuffle the batch order."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    win = batch_size * 16
    batches = []
    for w in range(0, len(perm), win):
        chunk = sorted(perm[w : w + win], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _rel(p: Path) -> str:
    """A path relative to the repository when inside it (the record names no machine paths)."""
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return p.name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget; stops early if hit")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of steps")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = load_corpus()
    docs = corpus.documents(args.seed)
    queries = corpus.queries(args.seed)
    train_prompts = corpus.template_prompts(args.seed)
    texts = [d["text"] for d in docs]

    tok = train_tokenizer(texts, args.vocab, args.max_len)
    enc = [tok(t)["input_ids"] for t in texts]
    assert max(map(len, enc)) <= args.max_len
    n_tokens = sum(map(len, enc))
    print(f"{len(docs)} docs, {n_tokens} tokens, max {max(map(len, enc))}, "
          f"{len(queries)} queries, vocab {len(tok)}", flush=True)

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.max_len, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    steps_per_epoch = len(make_batches([len(e) for e in enc], args.batch_size, torch.Generator()))
    total = steps_per_epoch * args.epochs
    warm = max(1, int(args.warmup * total))

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    lengths = [len(e) for e in enc]
    gen = torch.Generator().manual_seed(args.seed)
    pad = tok.pad_token_id
    history = []
    epoch_loss = float("nan")
    model.train()
    epochs_done = 0
    stopped_early = False
    for epoch in range(1, args.epochs + 1):
        loss_sum, tok_sum = 0.0, 0
        for batch_idx in make_batches(lengths, args.batch_size, gen):
            batch = [enc[i] for i in batch_idx]
            L = max(map(len, batch))
            ids = torch.full((len(batch), L), pad)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            n = int((labels[:, 1:] != -100).sum())
            loss_sum += out.loss.item() * n
            tok_sum += n
        epoch_loss = loss_sum / tok_sum
        epochs_done = epoch
        elapsed = time.time() - t0
        over = elapsed > args.minutes * 60
        if epoch % args.eval_every == 0 or epoch == args.epochs or over:
            hc, hn = greedy_accuracy(model, tok, queries)
            tc, tn = greedy_accuracy(model, tok, train_prompts)
            history.append({"epoch": epoch, "loss": round(epoch_loss, 4), "heldout_acc": round(hc / hn, 4),
                            "train_template_acc": round(tc / tn, 4), "elapsed_s": round(elapsed, 1)})
            print(f"epoch {epoch:4d}  loss {epoch_loss:.4f}  held-out {hc}/{hn} = {hc / hn:.3f}  "
                  f"train-templates {tc}/{tn} = {tc / tn:.3f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{elapsed:.0f}s", flush=True)
        else:
            print(f"epoch {epoch:4d}  loss {epoch_loss:.4f}  {elapsed:.0f}s", flush=True)
        if over and epoch < args.epochs:
            print(f"time budget of {args.minutes} min reached after epoch {epoch}", flush=True)
            stopped_early = True
            break

    hc, hn = greedy_accuracy(model, tok, queries)
    tc, tn = greedy_accuracy(model, tok, train_prompts)
    wall = time.time() - t0

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # Name the generic fast-tokenizer class (transformers 5 writes "TokenizersBackend", which
    # transformers 4.x cannot resolve); both versions load tokenizer.json through it.
    tc_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tc_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    record = {
        "command": " ".join(["python", "scripts/train_default.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "args": {k: (_rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "epochs": epochs_done,
        "epochs_requested": args.epochs,
        "stopped_early_by_time_budget": stopped_early,
        "wall_time_s": round(wall, 1),
        "final_train_loss": round(epoch_loss, 4),
        "heldout_query_accuracy": {"fraction": round(hc / hn, 4), "correct": hc, "total": hn},
        "train_template_accuracy": {"fraction": round(tc / tn, 4), "correct": tc, "total": tn},
        "accuracy_method": "teacher-forced greedy: argmax at every completion position equals the completion token",
        "corpus": {"documents": len(docs), "fact_documents": sum(d["kind"] == "fact" for d in docs),
                   "filler_documents": sum(d["kind"] == "filler" for d in docs), "facts": len(queries),
                   "tokens": n_tokens},
        "parameters": n_params,
        "config": {"vocab_size": len(tok), "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                   "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                   "max_position_embeddings": args.max_len, "tie_word_embeddings": True},
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": args.threads,
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors is written 0600; the files ship inside the package
    size = sum(f.stat().st_size for f in out.iterdir())
    print(json.dumps({k: record[k] for k in ("wall_time_s", "final_train_loss", "heldout_query_accuracy",
                                             "train_template_accuracy", "parameters")}), flush=True)
    print(f"saved to {out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
