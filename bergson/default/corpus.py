"""Deterministic synthetic fact corpus for the embedded default model (stdlib only).

Fictional people (names built from syllables) each have three attributes: a home city
(invented names), a profession and a musical instrument.  Every fact (person, attribute,
value) can be stated by ``N_TEMPLATES`` paraphrase templates, all of which end with the value.
For each fact one template is *held out*: the training corpus states the fact with the other
templates (one short document each, sometimes two facts of the same person in one document,
sometimes after an unrelated opening sentence), and the *query* for the fact is the held-out
template's text up to the value (``prompt``) with `` <value>`` as the expected ``completion``.
The held-out template rotates with the person and the attribute, so every template is used in
training for 80% of the facts.

About a quarter of the documents are fillers stating no fact: generic sentences, sentences that
mention people without stating any attribute, and sentences that mention a city without a person.

Everything is a pure function of ``seed`` (``random.Random(seed)``), so the gold documents of
each query (the documents stating its fact) are known exactly.  This module must not import
torch, transformers or datasets.
"""

from __future__ import annotations

import random
from functools import lru_cache

__all__ = [
    "ATTRIBUTES",
    "N_ENTITIES",
    "N_TEMPLATES",
    "TEMPLATES",
    "documents",
    "facts",
    "queries",
]

N_ENTITIES = 200

# --- values ---------------------------------------------------------------------------------

CITIES = (
    "Velmora", "Dunhaven", "Quillbrook", "Marrowick", "Ostravel", "Tamsford", "Brisnel",
    "Caldermoor", "Elsport", "Fenwater", "Glimmerton", "Harrowdale", "Ivorast", "Jessamor",
    "Korrin", "Lunetta", "Mossgrave", "Norvale", "Pellmouth", "Rookhollow", "Sablecross",
    "Thistlemere", "Umbergate", "Wrenfield",
)

# Consonant-initial so that "a <profession>" is always grammatical.
PROFESSIONS = (
    "baker", "carpenter", "doctor", "farmer", "fisherman", "gardener", "journalist", "lawyer",
    "librarian", "mechanic", "nurse", "painter", "pilot", "plumber", "potter", "sailor",
    "tailor", "teacher", "weaver", "banker", "chemist", "dentist", "jeweler", "surgeon",
)

INSTRUMENTS = (
    "violin", "cello", "flute", "guitar", "harp", "piano", "trumpet", "drums", "banjo",
    "clarinet", "saxophone", "trombone", "harmonica", "tuba", "mandolin", "accordion",
)

ATTRIBUTES = ("city", "profession", "instrument")
VALUES = {"city": CITIES, "profession": PROFESSIONS, "instrument": INSTRUMENTS}

# --- fact templates (every one ends with "{v}.") --------------------------------------------

TEMPLATES = {
    "city": (
        "{n} lives in {v}.",
        "{n} has made a home in the city of {v}.",
        "The hometown of {n} is {v}.",
        "Ask anyone and they will tell you that {n} resides in {v}.",
        "Every morning {n} walks through the quiet streets of {v}.",
    ),
    "profession": (
        "{n} works as a {v}.",
        "By profession, {n} is a {v}.",
        "{n} earns a living as a {v}.",
        "For many years {n} has been employed as a {v}.",
        "People in town know {n} as a skilled {v}.",
    ),
    "instrument": (
        "{n} plays the {v}.",
        "The favourite instrument of {n} is the {v}.",
        "In the evenings {n} likes to practise the {v}.",
        "{n} has been learning to play the {v}.",
        "At every concert {n} performs on the {v}.",
    ),
}
N_TEMPLATES = 5
assert all(len(t) == N_TEMPLATES for t in TEMPLATES.values())

# --- names ----------------------------------------------------------------------------------

_FIRST_SYL = (
    "ka", "lo", "mi", "ren", "dor", "vel", "sa", "tin", "bri", "mor", "fen", "ra", "zu", "el",
    "tho", "ny", "gal", "is", "ob", "ur", "pe", "qui", "sol", "va",
)
_LAST_SYL = (
    "mar", "dek", "sto", "vin", "hol", "bar", "ric", "tal", "won", "ger", "lin", "shaw",
    "ter", "bek", "rond", "mal", "fis", "kel", "nov", "pra", "dun", "wick",
)

# --- filler material ------------------------------------------------------------------------

# Adjectives and objects are consonant-initial so that "a {a}" / "a {x}" is always grammatical.
_ADJ = ("faded", "small", "bright", "quiet", "busy", "green", "narrow", "heavy", "warm", "tiny",
        "distant", "wooden")
_NOUN = ("bridge", "market", "garden", "library", "harbor", "train", "river", "tower", "bakery",
         "school", "museum", "orchard", "road", "lantern", "boat", "window")
_VERB_PAST = ("closed", "opened", "flooded", "was painted", "was repaired", "grew crowded",
              "fell silent", "was decorated", "was rebuilt", "stayed empty")
_TIME = ("last winter", "after the storm", "on Sunday", "at dawn", "during the festival",
         "in early spring", "before noon", "late at night", "every autumn", "for a whole week")
_OBJECT = ("parcel", "notebook", "kettle", "lamp", "scarf", "map", "clock", "basket",
           "bicycle", "teapot", "blanket", "compass")
_WEATHER = ("rain", "snow", "fog", "wind", "sunshine", "thunder")

_GENERIC = (
    "The {a} {o} {vp} {t}.",
    "Nobody remembered why the {a} {o} {vp} {t}.",
    "A {a} {x} was left near the {o} {t}.",
    "The {w} lasted longer than anyone expected {t}.",
    "Children gathered by the {a} {o} to watch the {w}.",
    "The newspaper wrote that the {o} {vp} {t}.",
    "A traveller asked for directions to the {a} {o}.",
    "Someone found a {x} under a bench near the {o}.",
)
_MENTION = (  # mention people, state no attribute
    "{n} met {m} near the {a} {o} {t}.",
    "{n} wrote a long letter to {m} {t}.",
    "Nobody expected {n} to arrive so early {t}.",
    "{n} bought a {a} {x} at the market {t}.",
    "{n} and {m} argued about the {w} for an hour.",
    "{n} lost a {x} somewhere near the {o}.",
    "It was {m} who lent {n} a {x} {t}.",
    "{n} laughed when the {a} {o} {vp}.",
)
_CITY_MENTION = (  # mention a city, state no fact
    "The {o} in {c} {vp} {t}.",
    "Travellers say the {w} in {c} is unforgettable.",
    "A {a} {o} stands at the edge of {c}.",
    "The road to {c} {vp} {t}.",
)

FILLER_FRACTION = 0.25  # fillers / all documents
P_PAIR = 0.2  # chance a statement is merged with another fact of the same person
P_PREAMBLE = 0.3  # chance a fact document starts with an unrelated generic sentence


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    seen_words: set[str] = set()
    while len(names) < n:
        first_syl = [rng.choice(_FIRST_SYL) for _ in range(rng.choice((2, 2, 3)))]
        last_syl = [rng.choice(_LAST_SYL) for _ in range(rng.choice((2, 3)))]
        if len(set(first_syl)) < len(first_syl) or len(set(last_syl)) < len(last_syl):
            continue  # no "Fenfen" / "Marmar"
        first, last = "".join(first_syl).capitalize(), "".join(last_syl).capitalize()
        # Unique first and last names: no full name is a substring of another one, and no
        # name collides with a city or a filler word.
        if first in seen_words or last in seen_words or first == last:
            continue
        if first in CITIES or last in CITIES or len(first) < 4:
            continue
        seen_words.update((first, last))
        names.append(f"{first} {last}")
    return names


def _generic(rng: random.Random) -> str:
    return rng.choice(_GENERIC).format(
        a=rng.choice(_ADJ), o=rng.choice(_NOUN), vp=rng.choice(_VERB_PAST), t=rng.choice(_TIME),
        x=rng.choice(_OBJECT), w=rng.choice(_WEATHER),
    )


def _filler(rng: random.Random, names: list[str]) -> str:
    r = rng.random()
    kw = dict(a=rng.choice(_ADJ), o=rng.choice(_NOUN), vp=rng.choice(_VERB_PAST),
              t=rng.choice(_TIME), x=rng.choice(_OBJECT), w=rng.choice(_WEATHER))
    if r < 0.45:
        n, m = rng.sample(names, 2)
        text = rng.choice(_MENTION).format(n=n, m=m, **kw)
    elif r < 0.65:
        text = rng.choice(_CITY_MENTION).format(c=rng.choice(CITIES), **kw)
    else:
        text = _generic(rng)
    if rng.random() < 0.5:  # a second sentence, so fillers are not all shorter than facts
        text += " " + _generic(rng)
    return text


def heldout_template(entity_index: int, attribute_index: int) -> int:
    """Index of the template held out (used only for the query) for this fact."""
    return (entity_index + 2 * attribute_index) % N_TEMPLATES


@lru_cache(maxsize=8)
def _build(seed: int):
    rng = random.Random(seed)
    names = _names(rng, N_ENTITIES)
    fact_rows = []
    for e, name in enumerate(names):
        for a, attr in enumerate(ATTRIBUTES):
            fact_rows.append({
                "fact_id": len(fact_rows),
                "entity": name,
                "entity_id": e,
                "attribute": attr,
                "value": rng.choice(VALUES[attr]),
                "heldout_template": heldout_template(e, a),
            })

    # One statement per (fact, non-held-out template).
    by_entity: list[list[tuple[int, str]]] = [[] for _ in names]
    for f in fact_rows:
        for t, tmpl in enumerate(TEMPLATES[f["attribute"]]):
            if t != f["heldout_template"]:
                by_entity[f["entity_id"]].append((f["fact_id"], tmpl.format(n=f["entity"], v=f["value"])))

    # Group statements into documents: mostly one each, sometimes two facts of one person.
    fact_docs: list[tuple[str, list[int]]] = []
    for stmts in by_entity:
        rng.shuffle(stmts)
        i = 0
        while i < len(stmts):
            fid, text = stmts[i]
            ids = [fid]
            if i + 1 < len(stmts) and stmts[i + 1][0] != fid and rng.random() < P_PAIR:
                ids.append(stmts[i + 1][0])
                text = text + " " + stmts[i + 1][1]
                i += 1
            if rng.random() < P_PREAMBLE:
                text = _generic(rng) + " " + text
            fact_docs.append((text, ids))
            i += 1

    n_filler = round(len(fact_docs) * FILLER_FRACTION / (1 - FILLER_FRACTION))
    filler_docs = [(_filler(rng, names), []) for _ in range(n_filler)]

    rows = [(t, ids, "fact") for t, ids in fact_docs] + [(t, ids, "filler") for t, ids in filler_docs]
    rng.shuffle(rows)
    docs = [{"doc_id": i, "text": t, "kind": k, "facts": list(ids)} for i, (t, ids, k) in enumerate(rows)]

    gold: dict[int, list[int]] = {f["fact_id"]: [] for f in fact_rows}
    for d in docs:
        for fid in d["facts"]:
            gold[fid].append(d["doc_id"])

    query_rows = []
    for f in fact_rows:
        tmpl = TEMPLATES[f["attribute"]][f["heldout_template"]]
        prefix = tmpl[: tmpl.index(" {v}")]
        query_rows.append({
            "fact_id": f["fact_id"],
            "prompt": prefix.format(n=f["entity"]),
            "completion": " " + f["value"],
            "gold_doc_ids": gold[f["fact_id"]],
            "entity": f["entity"],
            "attribute": f["attribute"],
        })
    return fact_rows, docs, query_rows


def _copy(rows: list[dict]) -> list[dict]:
    return [{k: (list(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]


def facts(seed: int = 0) -> list[dict]:
    """All facts: fact_id, entity, entity_id, attribute, value, heldout_template."""
    return _copy(_build(seed)[0])


def documents(seed: int = 0) -> list[dict]:
    """Training documents in a fixed order: doc_id (row index), text, kind ("fact"|"filler"),
    facts (ids of the facts the document states; empty for fillers)."""
    return _copy(_build(seed)[1])


def queries(seed: int = 0) -> list[dict]:
    """One query per fact, phrased with its held-out template: fact_id, prompt, completion
    (value with a leading space), gold_doc_ids (documents stating the fact), entity, attribute."""
    return _copy(_build(seed)[2])


def template_prompts(seed: int = 0) -> list[dict]:
    """Prompts of the *training* templates for every fact (for measuring memorization):
    fact_id, template, prompt, completion."""
    out = []
    for f in _build(seed)[0]:
        for t, tmpl in enumerate(TEMPLATES[f["attribute"]]):
            if t == f["heldout_template"]:
                continue
            prefix = tmpl[: tmpl.index(" {v}")]
            out.append({"fact_id": f["fact_id"], "template": t, "prompt": prefix.format(n=f["entity"]),
                        "completion": " " + f["value"]})
    return out
