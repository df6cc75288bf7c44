from rankserve.data.catalog import ACCESSORIES, EXACT, IRRELEVANT, PARTIAL, Dataset, generate, product_type, tokens
from rankserve.settings import DataSettings


def test_deterministic_from_seed(wands_queries, dataset):
    again = generate(wands_queries, DataSettings())
    assert again.judgments == dataset.judgments and again.products == dataset.products
    other = generate(wands_queries, DataSettings(seed=99))
    assert other.judgments != dataset.judgments


def test_every_classified_query_gets_graded_candidates(wands_queries, dataset):
    s = DataSettings()
    assert len(dataset.queries) == sum(1 for q in wands_queries if q.query_class)
    per_query = s.exact_per_query + s.partial_per_query + s.hard_negatives_per_query + s.easy_negatives_per_query
    by_query = dataset.by_query()
    for q in dataset.queries:
        labels = [j.label for j in by_query[q.query_id]]
        assert len(labels) == per_query
        assert labels.count(EXACT) == s.exact_per_query and labels.count(PARTIAL) == s.partial_per_query
        assert len({j.product_id for j in by_query[q.query_id]}) == per_query


def test_labels_follow_the_esci_rules(dataset):
    """exact: same class, every query word; partial: same class, not every query word or a contradicting
    attribute; irrelevant: another class (hard negatives still share the query's words)."""
    queries = {q.query_id: q for q in dataset.queries}
    shared_words = 0
    for j in dataset.judgments:
        q, p = queries[j.query_id], dataset.products[j.product_id]
        words = set(tokens(p.text))
        if j.label == EXACT:
            assert p.product_class == q.query_class and set(tokens(q.text)) <= words, (q, p)
        elif j.label == PARTIAL:
            assert p.product_class == q.query_class
            title = p.text.split("|")[0]
            fragments = [f.strip() for a in ACCESSORIES for f in a.split("{p}") if f.strip()]
            accessory = any(f in title for f in fragments)
            assert accessory or not set(tokens(q.text)) <= set(tokens(title)), (q, p)
        else:
            assert j.label == IRRELEVANT and p.product_class != q.query_class
            if j.kind == "hard_negative":
                assert set(tokens(q.text)) & words, (q, p)
                shared_words += 1
    assert shared_words > 1000


def test_heldout_split_is_by_query(dataset):
    heldout = dataset.split("heldout")
    train = dataset.split("train")
    assert 0.15 < len(heldout) / len(dataset.queries) < 0.25
    assert not {q.query_id for q in heldout} & {q.query_id for q in train}


def test_save_and_load_round_trip(dataset, tmp_path):
    dataset.save(tmp_path)
    loaded = Dataset.load(tmp_path)
    assert loaded.queries == dataset.queries and loaded.products == dataset.products
    assert loaded.judgments == dataset.judgments


def test_product_type_from_wands_class():
    import random

    rng = random.Random(0)
    assert product_type("Accent Pillows", rng) == "Accent Pillow"
    assert product_type("Benches", rng) == "Bench"
    assert {product_type("Coffee & Cocktail Tables", random.Random(s)) for s in range(10)} == {"Coffee Table", "Cocktail Table"}
