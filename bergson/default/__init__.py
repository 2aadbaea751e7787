"""The embedded default: a synthetic fact corpus and a small Llama trained on it, shipped inside
the package so that ``bergson build OUT`` works offline with no ``--model`` / ``--dataset``.

* ``corpus`` — deterministic documents, facts and held-out-template queries (stdlib only);
  the gold documents of every query (those stating its fact) are known exactly.
* ``model/`` — ``LlamaForCausalLM`` + tokenizer trained by ``scripts/train_default.py``
  (``model/training.json`` records the command, accuracies and versions).

transformers and datasets are imported lazily inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from .corpus import documents, facts, queries

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = ["MODEL_DIR", "dataset", "documents", "facts", "load_model", "model_path", "queries", "query_dataset"]


def model_path() -> str:
    """Path of the shipped model directory (usable as ``from_pretrained`` argument)."""
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is missing from {MODEL_DIR}; "
            "regenerate it with `python scripts/train_default.py`"
        )
    return str(MODEL_DIR)


def load_model(dtype=None):
    """Load the shipped model and tokenizer offline: returns ``(model, tokenizer)``, model in
    eval mode (float32 unless ``dtype`` is given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path()
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def _list_feature():
    try:  # datasets >= 4
        from datasets import List
    except ImportError:  # older datasets
        from datasets import Sequence as List
    return List


def dataset(seed: int = 0):
    """``datasets.Dataset`` of the training documents: doc_id, text, kind, facts (list of int)."""
    from datasets import Dataset, Features, Value

    List = _list_feature()
    rows = documents(seed)
    features = Features({"doc_id": Value("int64"), "text": Value("string"), "kind": Value("string"),
                         "facts": List(Value("int64"))})
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def query_dataset(seed: int = 0):
    """``datasets.Dataset`` of the queries: fact_id, prompt, completion, gold_doc_ids (list of
    int), entity, attribute."""
    from datasets import Dataset, Features, Value

    List = _list_feature()
    rows = queries(seed)
    features = Features({"fact_id": Value("int64"), "prompt": Value("string"),
                         "completion": Value("string"), "gold_doc_ids": List(Value("int64")),
                         "entity": Value("string"), "attribute": Value("string")})
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
