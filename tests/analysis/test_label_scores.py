"""Label scores: a label that says where a feature fires scores high, a wrong one scores near chance; scores are
stored with their method, follow the label they belong to, and reach the dashboard and concept search."""

from __future__ import annotations

import numpy as np
import pytest

from featurelens.analysis import scoring
from featurelens.search import concept_search
from featurelens.search.embed import Embedder
from featurelens.store import FeatureStore

TOPICS = {
    0: ["film", "movie", "cinema", "actor"],
    1: ["court", "judge", "lawyer", "trial"],
    2: ["rain", "storm", "snow", "weather"],
    3: ["dog", "cat", "horse", "pet"],
}
FILLER = "the a of and to in it was is that on for with as at by this from we they".split()


def build_store(path, seed: int = 0) -> FeatureStore:
    """Features 0-3 each fire on their topic's words (examples are filler text with a topic word at the max);
    feature 4 fires on filler words anywhere (a dense, unclear feature)."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    ids = {w: i + 10 for i, w in enumerate(vocab)}
    store = FeatureStore(path, create=True)
    ctx = 0
    with store.transaction():
        store.write_tokens((i, " " + w) for w, i in ids.items())
        rows = []
        for f in range(5):
            words = TOPICS.get(f)
            for kind, n in (("top", 12), ("quantile", 12)):
                for r in range(n):
                    toks = [ids[w] for w in rng.choice(FILLER, 14)]
                    i = int(rng.integers(6, 12))
                    if words is not None:
                        toks[i] = ids[str(rng.choice(words))]
                    acts = [0.0] * 14
                    acts[i] = 5.0 - 0.1 * r
                    ctx += 1
                    rows.append({"feature": f, "kind": kind, "rank": r, "bin": r // 3 if kind == "quantile" else 0,
                                 "ctx": ctx, "pos": 100 + i, "start": 100, "act": acts[i], "tokens": toks,
                                 "acts": acts})
        store.write_examples(rows)
        store.write_features({"idx": f, "n_fires": 100, "density": 0.2 if f == 4 else 0.001, "max_act": 5.0,
                              "mean_act": 2.0, "hist": None, "logit_up": [], "logit_down": [], "similar": [],
                              "cofire": []} for f in range(5))
        store.write_labels([(0, "auto:v3", '"film", "movie", "cinema" | context: actor'),
                            (1, "auto:v3", '"court", "judge", "lawyer", "trial"'),
                            (2, "auto:v3", '"dog", "cat"'),  # wrong: feature 2 is about weather
                            (3, "auto:v3", '"dog", "cat", "horse", "pet"'), (4, "auto:v3", '"the", "of"')])
    return store


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, 30).round(1), rng.normal(0, 1, 40).round(1)  # rounded: ties happen
    pairs = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert scoring.auroc(pos, neg) == pytest.approx(pairs)
    assert scoring.auroc([1, 2], [0]) == 1.0 and scoring.auroc([0], [1, 2]) == 0.0
    with pytest.raises(ValueError):
        scoring.auroc([], [1.0])


def test_label_reading_drops_layout():
    assert scoring.label_reading('"film", "movie" | context: review | promotes: critics') == \
        "film, movie review critics"


@pytest.mark.parametrize("reader", ["lexical", "embedding"])
def test_right_labels_score_high_wrong_ones_near_chance(store_target, reader):
    if reader == "embedding":
        from featurelens.search.embed import get_embedder

        embedder = get_embedder()
        if embedder is None:
            pytest.skip("embedding model not installed")
    else:
        embedder = None
    store = build_store(store_target())
    n = scoring.score_labels(store, embedder, n_neg=100, progress=False)
    assert n == 5
    got = store.current_label_scores()
    method = scoring.LEXICAL_METHOD if embedder is None else scoring.embedding_method(embedder)
    assert {m for _, m in got.values()} == {method}
    for f in (0, 1, 3):
        assert got[f][0] >= 0.85, (f, got[f])
        assert scoring.is_clear(got[f][0])
    assert got[2][0] < 0.7  # a label naming the wrong topic
    if embedder is None:  # a label of stopwords has nothing a lexical reader can match
        assert got[4][0] == pytest.approx(0.5)
    assert not scoring.is_clear(got[2][0])
    lab = store.labels(0)[0]
    assert lab["score"] == pytest.approx(got[0][0]) and lab["score_method"] == method
    summary = scoring.scores_summary(store)
    assert summary["n"] == 5 and 0 < summary["clear_fraction"] < 1


def test_a_rewritten_label_loses_its_old_score_and_a_users_label_is_scored(store_target):
    store = build_store(store_target())
    scoring.score_labels(store, None, progress=False)
    assert 2 in store.current_label_scores()
    with store.transaction():
        store.write_labels([(2, "auto:v3", '"rain", "storm", "snow", "weather"')])
    assert 2 not in store.current_label_scores()  # the score belonged to the old text
    scoring.score_labels(store, None, features=[2], progress=False)
    assert store.current_label_scores()[2][0] >= 0.85
    store.set_label(3, "weather words")  # a user's label, wrong for feature 3
    assert 3 not in store.current_label_scores()  # the user's label is current and has no score yet
    scoring.score_labels(store, None, provenance="user", progress=False)
    assert store.current_label_scores()[3][0] < 0.7
    assert store.label_scores(3).keys() == {"auto:v3", "user"}  # the automatic label keeps its own score


def test_scores_reach_dashboard_and_search(store_target, monkeypatch):
    monkeypatch.setenv("FEATURELENS_NO_EMBEDDINGS", "1")
    from featurelens.search import embed

    monkeypatch.setattr(embed, "_CACHE", {})
    store = build_store(store_target())
    scoring.score_labels(store, None, progress=False)
    hits = concept_search(store, "dog cat horse pet", k=5, method="lexical")
    assert hits[0].feature == 3 and hits[0].label_clear
    assert hits[0].max_tokens and set(hits[0].max_tokens) <= {"dog", "cat", "horse", "pet"}
    by_f = {h.feature: h for h in hits}
    # feature 2 carries the same words in its (wrong) label, but its unclear score weighs it below feature 3
    if 2 in by_f:
        assert by_f[2].score < by_f[3].score and by_f[2].label_clear is False
        assert "unclear" in str(by_f[2])
    store.close()


def test_old_store_without_the_table_reads_and_gains_it(tmp_path):
    path = tmp_path / "f.sqlite"
    store = build_store(path)
    store.conn.execute("DROP TABLE label_scores")
    store.conn.execute("DROP TABLE schema_version")  # as made before migrations
    store.close()
    with FeatureStore(path, readonly=True) as ro:  # a store from before label scores, read-only: no scores
        assert ro.current_label_scores() == {} and ro.labels(0)[0]["score"] is None
    with FeatureStore(path) as rw:  # opened for writing: the table is added, empty
        assert rw.current_label_scores() == {}
        assert scoring.score_labels(rw, None, progress=False) == 5



def test_what_it_does_scores_are_kept_apart_from_where_it_fires(tmp_path):
    """A what-it-does score (method EFFECT_PREFIX...) sits beside the AUROC: the where-it-fires readers (search
    quality, unclear marks) never take it for the AUROC, and it goes with the label text like any score."""
    from featurelens.store import EFFECT_PREFIX

    store = build_store(tmp_path / "f.sqlite")
    scoring.score_labels(store, None, progress=False)
    fires = store.current_label_scores()
    with store.transaction():
        store.write_label_scores([(0, "auto:v3", EFFECT_PREFIX + "promotes:v1", 7.5, 6, 2)])
    assert store.current_label_scores() == fires  # written later, yet not read as the AUROC
    assert store.current_label_scores(effects=True) == {0: (7.5, EFFECT_PREFIX + "promotes:v1")}
    assert store.label_scores(0)["auto:v3"]["method"] == fires[0][1]
    assert store.label_scores(0, effects=True)["auto:v3"]["score"] == 7.5
    with store.transaction():
        store.write_labels([(0, "auto:v3", '"film" → promotes: critics')])
    assert store.current_label_scores(effects=True) == {}  # it belonged to the old text


def test_peaks_ranking_matches_word_forms_the_lexical_one_misses(tmp_path, monkeypatch):
    """Without the embedding model, "peaks" finds the film feature for "movies" (its max tokens say "movie"),
    where BM25's stemmer does not join the two spellings."""
    monkeypatch.setenv("FEATURELENS_NO_EMBEDDINGS", "1")
    from featurelens.search import embed
    from featurelens.search.lexical import word_forms

    monkeypatch.setattr(embed, "_CACHE", {})
    assert not word_forms("movies").isdisjoint(word_forms("movie"))
    assert not word_forms("filmed").isdisjoint(word_forms("films"))
    assert word_forms("film").isdisjoint(word_forms("fill"))
    store = build_store(tmp_path / "f.sqlite")
    lexical = concept_search(store, "movies", k=5, method="lexical")
    assert 0 not in {h.feature for h in lexical}
    hits = concept_search(store, "movies", k=5, method="peaks")
    assert hits[0].feature == 0 and hits[0].method == "peaks+lexical"
    assert all(h.feature != 0 for h in hits[1:])
    store.close()


class _CountingEmbedder(Embedder):
    """Each text's vector is a hash of it; counts what reaches the model."""

    name = "counting"
    MEMO_TEXTS = 3

    def __init__(self) -> None:
        super().__init__()
        self.encoded: list[str] = []

    @property
    def dim(self) -> int:
        return 4

    def _encode(self, texts, batch_size):
        self.encoded += texts
        v = np.array([[hash((t, i)) % 97 + 1.0 for i in range(4)] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_embedder_encodes_a_text_once_while_it_is_remembered():
    emb = _CountingEmbedder()
    first = emb.encode(["a", "b", "a"])
    assert emb.encoded == ["a", "b"]  # a repeat inside one call is encoded once too
    np.testing.assert_array_equal(first[0], first[2])
    again = emb.encode(["b", "a", "c"])
    assert emb.encoded == ["a", "b", "c"]
    np.testing.assert_array_equal(again[:2], first[[1, 0]])
    emb.encode(["d"])  # the memo holds 3: "b", the least recently used, goes
    emb.encode(["b"])
    assert emb.encoded == ["a", "b", "c", "d", "b"]
    assert emb.encode([]).shape == (0, 4)
    by_text = emb.vectors(iter(["e", "b", "e"]))  # any iterable; each distinct text once
    assert list(by_text) == ["e", "b"] and emb.encoded[-1] == "e"
    np.testing.assert_array_equal(by_text["b"], emb.encode(["b"])[0])


def test_a_remembered_vector_is_the_one_the_model_gives_alone():
    from featurelens.search.embed import get_embedder

    emb = get_embedder()
    if emb is None:
        pytest.skip("embedding model not installed")
    texts = ["the film was shown in cinemas", "he paid ten dollars", "a short one"]
    together = emb.encode(texts)  # padded to the longest in one batch
    for t, v in zip(texts, together):
        alone = emb._encode([t], 64)[0]
        assert float(alone @ v) > 0.999, t
