"""A synthetic product catalog and graded judgments built around the real WANDS queries.

For each query (with its WANDS ``query_class``) the generator writes products in the ESCI/WANDS style:

* **exact** (label 2): the query's class, every query word present, no contradicting attribute;
* **partial** (label 1): the query's class but one attribute wrong (another colour, material, style,
  size...) or the query's modifier missing: the classic "same class, wrong attribute" hard negative;
* **irrelevant, hard** (label 0): another class that shares the query's words (``turquoise area rug``
  for ``turquoise pillows``), some with keyword-stuffed descriptions ("pairs with turquoise pillows")
  that fool lexical matching;
* **irrelevant, easy** (label 0): products of other classes, drawn from the rest of the catalog.

Everything is deterministic from :attr:`DataSettings.seed`. Queries are split into train and
held-out sets by query, so evaluation uses queries the ranker never saw.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rankserve.data.wands import Query
from rankserve.settings import DataSettings

EXACT, PARTIAL, IRRELEVANT = 2, 1, 0
LABEL_NAMES = {EXACT: "exact", PARTIAL: "partial", IRRELEVANT: "irrelevant"}

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": (
        "black", "white", "gray", "grey", "blue", "navy", "turquoise", "teal", "aqua", "green", "sage",
        "olive", "red", "burgundy", "pink", "blush", "yellow", "mustard", "gold", "silver", "brown", "tan",
        "beige", "cream", "ivory", "orange", "coral", "purple", "lavender", "charcoal", "bronze", "clear",
    ),
    "material": (
        "wood", "wooden", "oak", "walnut", "pine", "acacia", "teak", "bamboo", "metal", "iron", "steel",
        "brass", "copper", "chrome", "glass", "marble", "stone", "concrete", "leather", "velvet", "linen",
        "cotton", "wool", "jute", "rattan", "wicker", "ceramic", "porcelain", "acrylic", "plastic", "fabric",
        "upholstered", "microfiber", "shag",
    ),
    "style": (
        "modern", "contemporary", "rustic", "farmhouse", "industrial", "vintage", "mid-century", "boho",
        "bohemian", "coastal", "traditional", "scandinavian", "minimalist", "glam", "retro", "antique",
    ),
    "size": (
        "small", "large", "oversized", "mini", "tall", "low", "twin", "full", "queen", "king", "round",
        "square", "rectangular", "oval", "narrow", "wide", "long", "short", "60", "72", "48", "36", "30",
    ),
    "feature": (
        "outdoor", "indoor", "kids", "storage", "adjustable", "folding", "extendable", "swivel",
        "reclining", "convertible", "waterproof", "cordless", "led", "wall-mounted", "floating",
        "lighted", "cushioned", "stackable", "ergonomic", "corner",
    ),
}
_FAMILY = {word: family for family, words in ATTRIBUTES.items() for word in words}
_BRANDS = (
    "Larkin", "Ashby", "Brookline", "Harper & Vine", "Millwood", "Stonecrest", "Oakhurst", "Bellamy",
    "Northfield", "Wren & Co", "Calloway", "Marlow Home", "Everly", "Hadley", "Rowan Studio", "Sutton",
)
_BLURBS = (
    "easy assembly", "free shipping", "5-year warranty", "best seller", "ships in 2 days",
    "designer pick", "eco-friendly finish", "easy to clean", "new arrival", "customer favorite",
)
_STUFFING = ("pairs well with {q}", "a great match for your {q}", "complements {q}", "goes with any {q}")
ACCESSORIES = ("replacement legs for {p}", "cover for {p}", "{p} hardware kit", "cleaning kit for {p}")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclass(frozen=True)
class Product:
    product_id: int
    text: str
    product_class: str


@dataclass(frozen=True)
class Judgment:
    query_id: int
    product_id: int
    label: int
    kind: str  # exact | partial | hard_negative | easy_negative


@dataclass(frozen=True)
class LabeledQuery:
    query_id: int
    text: str
    query_class: str
    split: str  # train | heldout


@dataclass
class Dataset:
    queries: list[LabeledQuery]
    products: dict[int, Product]
    judgments: list[Judgment]

    def split(self, name: str) -> list[LabeledQuery]:
        return [q for q in self.queries if q.split == name]

    def subset(self, heldout: int) -> "Dataset":
        """Only the first ``heldout`` held-out queries (every training query kept: calibration
        samples from them): the accuracy gate of a ranker too large to score them all in time."""
        keep = {q.query_id for q in self.split("heldout")[:heldout]} | {q.query_id for q in self.split("train")}
        return Dataset([q for q in self.queries if q.query_id in keep], self.products,
                       [j for j in self.judgments if j.query_id in keep])

    def candidates(self, query_id: int) -> list[Judgment]:
        return [j for j in self.judgments if j.query_id == query_id]

    def by_query(self) -> dict[int, list[Judgment]]:
        out: dict[int, list[Judgment]] = {}
        for j in self.judgments:
            out.setdefault(j.query_id, []).append(j)
        return out

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_jsonl(d / "queries.jsonl", (asdict(q) for q in self.queries))
        _write_jsonl(d / "products.jsonl", (asdict(p) for p in self.products.values()))
        _write_jsonl(d / "judgments.jsonl", (asdict(j) for j in self.judgments))

    @classmethod
    def load(cls, directory: str | Path) -> "Dataset":
        d = Path(directory)
        return cls(
            queries=[LabeledQuery(**r) for r in _read_jsonl(d / "queries.jsonl")],
            products={r["product_id"]: Product(**r) for r in _read_jsonl(d / "products.jsonl")},
            judgments=[Judgment(**r) for r in _read_jsonl(d / "judgments.jsonl")],
        )


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def product_type(query_class: str, rng: random.Random) -> str:
    """A singular product type from a WANDS class: ``Coffee & Cocktail Tables`` -> ``Cocktail Table``."""
    head = query_class.split(" and ")[-1] if " and " in query_class else query_class
    parts = [p.strip() for p in head.split("&")]
    if len(parts) > 1:
        last_words = parts[-1].split()
        # "Coffee & Cocktail Tables": the shared noun is the last word of the last part
        parts = [p if len(p.split()) > 1 else f"{p} {last_words[-1]}" for p in parts]
    words = rng.choice(parts).split()
    words[-1] = _singular(words[-1])
    return " ".join(words)


def _singular(word: str) -> str:
    lower = word.lower()
    if lower.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if lower.endswith("ies"):
        return word[:-3] + "y"
    if lower.endswith("s") and not lower.endswith("ss"):
        return word[:-1]
    return word


def _title(words: Iterable[str]) -> str:
    return " ".join(w if any(c.isupper() for c in w) else w.capitalize() for w in words)


def _other_value(word: str, rng: random.Random) -> str:
    family = ATTRIBUTES[_FAMILY[word]]
    choice = rng.choice(family)
    while choice == word:
        choice = rng.choice(family)
    return choice


def _extras(present: set[str], rng: random.Random, n: int) -> list[str]:
    """Up to ``n`` attribute words from families the query does not constrain."""
    used = {_FAMILY[w] for w in present if w in _FAMILY}
    free = [f for f in ("color", "material", "style") if f not in used]
    rng.shuffle(free)
    return [rng.choice(ATTRIBUTES[f]) for f in free[:n]]


def _render(rng: random.Random, core: list[str], ptype: str, product_class: str, stuffing: str | None = None) -> str:
    brand = rng.choice(_BRANDS)
    if ptype and _singular(ptype.split()[-1].lower()) in {_singular(w) for w in core}:
        ptype = ""  # the core already names the product ("salon chair"): no "Salon Chair Massage Chair"
    tail = [product_class, rng.choice(_BLURBS)]
    if stuffing:
        tail.insert(1, stuffing)
    return " ".join(filter(None, (brand, _title(core), ptype))) + " | " + " | ".join(tail)


class _Generator:
    def __init__(self, queries: Sequence[Query], settings: DataSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.queries = [q for q in queries if q.query_class]
        self.classes = sorted({q.query_class for q in self.queries})
        self.products: dict[int, Product] = {}

    def add(self, text: str, product_class: str) -> int:
        pid = len(self.products)
        self.products[pid] = Product(pid, text, product_class)
        return pid

    def modifiers(self, q: Query) -> list[str]:
        """Query words that are not part of the class name (the attributes the user asked for)."""
        class_words = {_singular(w) for w in tokens(q.query_class)} | set(tokens(q.query_class))
        return [w for w in tokens(q.text) if w not in class_words and _singular(w) not in class_words]

    def exact(self, q: Query) -> str:
        words = tokens(q.text)
        extra = _extras(set(words), self.rng, self.rng.randint(0, 2))
        return _render(self.rng, extra + words, product_type(q.query_class, self.rng), q.query_class)

    def partial(self, q: Query) -> str:
        words = tokens(q.text)
        mods = set(self.modifiers(q))  # attribute words that are not part of the class name
        swappable = [i for i, w in enumerate(words) if w in _FAMILY and w in mods]
        if swappable:  # same class, one attribute contradicts the query
            i = self.rng.choice(swappable)
            words = words[:i] + [_other_value(words[i], self.rng)] + words[i + 1 :]
        elif mods:  # same class, the query's modifiers missing
            kept = [w for w in words if w not in mods]
            words = _extras(set(kept), self.rng, 1) + kept
        else:  # the query is the class itself: an accessory of that product, not the product
            ptype = product_type(q.query_class, self.rng)
            return _render(self.rng, [self.rng.choice(ACCESSORIES).format(p=ptype)], "", q.query_class)
        ptype = product_type(q.query_class, self.rng)
        return _render(self.rng, words, ptype, q.query_class)

    def hard_negative(self, q: Query) -> tuple[str, str]:
        other = self.rng.choice([c for c in self.classes if c != q.query_class])
        shared = self.modifiers(q) or tokens(q.text)
        stuffing = self.rng.choice(_STUFFING).format(q=q.text) if self.rng.random() < 0.4 else None
        text = _render(self.rng, shared + _extras(set(shared), self.rng, 1), product_type(other, self.rng), other, stuffing)
        return text, other

    def run(self) -> Dataset:
        s = self.settings
        per_query: dict[int, list[tuple[int, int, str]]] = {}
        for q in self.queries:
            rows = [(self.add(self.exact(q), q.query_class), EXACT, "exact") for _ in range(s.exact_per_query)]
            rows += [(self.add(self.partial(q), q.query_class), PARTIAL, "partial") for _ in range(s.partial_per_query)]
            for _ in range(s.hard_negatives_per_query):
                text, cls = self.hard_negative(q)
                rows.append((self.add(text, cls), IRRELEVANT, "hard_negative"))
            per_query[q.query_id] = rows
        pool = list(self.products.values())
        judgments: list[Judgment] = []
        for q in self.queries:
            rows = list(per_query[q.query_id])
            taken = {pid for pid, _, _ in rows}
            while len(rows) < len(per_query[q.query_id]) + s.easy_negatives_per_query:
                p = self.rng.choice(pool)
                if p.product_class != q.query_class and p.product_id not in taken:
                    taken.add(p.product_id)
                    rows.append((p.product_id, IRRELEVANT, "easy_negative"))
            self.rng.shuffle(rows)
            judgments += [Judgment(q.query_id, pid, label, kind) for pid, label, kind in rows]
        order = [q.query_id for q in self.queries]
        self.rng.shuffle(order)
        heldout = set(order[: max(1, round(len(order) * s.heldout_fraction))])
        labeled = [
            LabeledQuery(q.query_id, q.text, q.query_class, "heldout" if q.query_id in heldout else "train")
            for q in self.queries
        ]
        return Dataset(labeled, self.products, judgments)


def generate(queries: Sequence[Query], settings: DataSettings = DataSettings()) -> Dataset:
    """Build the catalog and judgments for ``queries`` (those without a class are skipped)."""
    return _Generator(queries, settings).run()


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
