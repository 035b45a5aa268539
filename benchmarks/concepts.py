"""Concept benchmark: does concept search find the concept, is the label trusted, does steering steer?

For each of CONCEPTS (a query and a small lexicon of words that signal it), on the demo's SAEs (or the analyzed
dictionaries given with --dict):

- **precision@5**: of the 5 features concept search ranks first (over all the dictionaries together), the fraction
  that are about the concept: most (>= half) of its top 10 activations have the max token, or the token just
  before or after it, in the lexicon;
- **label score**: the mean stored score of those features' labels (what `fl.score_labels` computed), when the
  store has scores;
- **steering**: the top result steered at the library's default strength (`fl.Steer(sae, feature)`, every
  position; `--skip-bos`: every position but BOS) on NEUTRAL_PROMPTS: the lexicon's next-token probability mass
  (every single-token spelling " word", " Word") steered over unsteered, averaged over prompts; a concept counts when the ratio is >= 3;
- with `--steerable`, the ranking is the steering-checked search's: the best --pool matches, each steered on the
  library's own probe prompts (not NEUTRAL_PROMPTS) and re-ranked by how much they raise the concept's words,
  which the search finds in the matches' own examples (the lexicon here is never shown to it);
- **fluency**: the perplexity, under the unsteered model, of 20-token continuations sampled (seed 0, T 0.7)
  with and without the steering; medians over concepts and prompts.

    python benchmarks/concepts.py                       # the demo's SAEs in the data directory
    python benchmarks/concepts.py --steerable           # search checked by steering (fl search --steerable)
    python benchmarks/concepts.py --dict PATH --dict PATH2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import featurelens as fl  # noqa: E402
from featurelens.interventions import rerank_by_steering  # noqa: E402
from featurelens.search import next_token_mass as token_mass, single_token_ids  # noqa: E402

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
CONCEPTS_LEX = {q: set(words.split()) for q, words in CONCEPTS.items()}

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


def next_token_mass(model, prompts: list[str], ids: list[int], interventions=None) -> float:
    return token_mass(model, prompts, ids, [h for it in (interventions or []) for h in it.hooks(model)])


GEN = dict(max_new_tokens=20, temperature=0.7, seed=0, return_new_only=True)


def run(dict_paths: list[Path], model, steer_strength: float | None, k: int = 5, verbose: bool = True,
        steer_bos: bool = True, steerable: bool = False, pool: int = 10) -> dict:
    analyses = [(p, fl.open_analysis(p), fl.load_dictionary(p)) for p in dict_paths]
    strings = {str(p): a.store.token_strings() for p, a, _ in analyses}
    rows = []
    t0 = time.perf_counter()
    ppl_clean = fl.continuation_perplexities(model, NEUTRAL_PROMPTS, model.generate(NEUTRAL_PROMPTS, **GEN))
    for q, lexicon in CONCEPTS_LEX.items():
        hits = []
        for p, a, d in analyses:
            hits += [(h.score, str(p), h, d, a) for h in a.search(q, k=max(k, pool) if steerable else k)]
        hits.sort(key=lambda x: -x[0])
        if steerable:  # the best `pool` matches over all dictionaries, re-ranked by steering them (library code)
            where = {id(d): (p, a) for _, p, _, d, a in hits}
            ranked = rerank_by_steering(model, q, [(d, h) for _, _, h, d, _ in hits[:pool]],
                                        strength=1.0 if steer_strength is None else steer_strength)
            hits = [(h.score, where[id(d)][0], h, d, where[id(d)][1]) for d, h in ranked]
        top = hits[:k]
        about = [is_about(a.store, strings[p], h.feature, lexicon) for _, p, h, _, a in top]
        scores = [getattr(h, "label_score", None) for _, _, h, _, _ in top]
        scores = [s for s in scores if s is not None]
        _, p1, h1, d1, a1 = top[0]
        ids = lexicon_token_ids(model, lexicon)
        steer = [fl.Steer(d1, h1.feature, steer_bos=steer_bos) if steer_strength is None
                 else fl.Steer(d1, h1.feature, steer_strength, steer_bos=steer_bos)]
        clean = next_token_mass(model, NEUTRAL_PROMPTS, ids)
        steered = next_token_mass(model, NEUTRAL_PROMPTS, ids, steer)
        ppl_steered = fl.continuation_perplexities(model, NEUTRAL_PROMPTS,
                                   model.generate(NEUTRAL_PROMPTS, interventions=steer, **GEN))
        row = {"concept": q, "precision_at_5": sum(about) / len(top), "label_score": statistics.mean(scores) if scores
               else None, "top": {"dictionary": Path(p1).name, "feature": h1.feature, "label": h1.label,
                                  "about": about[0]},
               "mass_clean": clean, "mass_steered": steered, "ratio": steered / max(clean, 1e-12),
               "ppl_clean": statistics.median(ppl_clean), "ppl_steered": statistics.median(ppl_steered)}
        rows.append(row)
        if verbose:
            print(f"{q:30s} p@5 {row['precision_at_5']:.1f}  top {row['top']['dictionary'][-6:]}#{h1.feature} "
                  f"{(h1.label or '')[:40]!r:42s} mass x{row['ratio']:.2f}  ppl {row['ppl_steered']:.1f} "
                  f"(clean {row['ppl_clean']:.1f})", flush=True)
    label_scores = [r["label_score"] for r in rows if r["label_score"] is not None]
    summary = {
        "concepts": len(rows),
        "precision_at_5": statistics.mean(r["precision_at_5"] for r in rows),
        "top1_about": statistics.mean(r["top"]["about"] for r in rows),
        "mean_label_score": statistics.mean(label_scores) if label_scores else None,
        "steer_3x_fraction": statistics.mean(r["ratio"] >= 3 for r in rows),
        "median_mass_ratio": statistics.median(r["ratio"] for r in rows),
        "median_ppl_clean": statistics.median(r["ppl_clean"] for r in rows),
        "median_ppl_steered": statistics.median(r["ppl_steered"] for r in rows),
        "seconds": time.perf_counter() - t0,
    }
    return {"summary": summary, "rows": rows, "dictionaries": [str(p) for p in dict_paths],
            "steer_strength": steer_strength, "steer_bos": steer_bos, "steerable": steerable,
            "pool": pool if steerable else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="the data directory (default: featurelens's)")
    ap.add_argument("--dict", action="append", default=[], help="an analyzed dictionary (repeatable; default: "
                    "the demo's SAEs)")
    ap.add_argument("--strength", type=float, default=None, help="steering strength (default: the library's)")
    ap.add_argument("--skip-bos", action="store_true", help="steer every position but BOS (fl.Steer(..., "
                    "steer_bos=False))")
    ap.add_argument("--steerable", action="store_true", help="steering-checked search: the best --pool matches "
                    "re-ranked by steering them on the library's probe prompts (fl search --steerable)")
    ap.add_argument("--pool", type=int, default=10, help="with --steerable: matches steered per concept")
    ap.add_argument("--json", default=None, help="write the rows and summary here")
    args = ap.parse_args(argv)
    if args.data_dir:
        fl.set_data_dir(args.data_dir)
    paths = [Path(p) for p in args.dict] or demo_dictionaries(Path(fl.data_dir()))
    model = fl.load_model("gemma-3-270m")
    out = run(paths, model, args.strength, steer_bos=not args.skip_bos, steerable=args.steerable, pool=args.pool)
    s = out["summary"]
    print(f"\n{s['concepts']} concepts on {', '.join(Path(p).name for p in paths)}")
    ls = f"{s['mean_label_score']:.3f}" if s["mean_label_score"] is not None else "n/a"
    print(f"precision@5 {s['precision_at_5']:.3f}   top-1 about the concept {s['top1_about']:.3f}   "
          f"mean label score {ls}")
    print(f"steering x3 or more: {s['steer_3x_fraction']:.3f} of concepts (median ratio {s['median_mass_ratio']:.2f}); "
          f"median perplexity steered {s['median_ppl_steered']:.1f}, unsteered {s['median_ppl_clean']:.1f}   "
          f"({s['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
