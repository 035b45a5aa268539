"""Which steering strength steers? A sweep over many features of the demo's SAEs.

For each of N features that fire on recognisable words (at least 3 of its top 20 activations' max tokens are the
same whole word), its "concept" is those words. Steering it (fl.Steer, every position) at each strength of the
sweep, on the neutral prompts of benchmarks/concepts.py, we measure

- the concept's next-token probability mass, steered over unsteered (mean over prompts; success: >= 3x);
- the perplexity, under the unsteered model, of 20-token continuations sampled with the steering (fluency).

Strengths are relative to each feature's typical maximum activation (mode="relative", the library's default
scale). The table printed is what the default strength in `featurelens.interventions.types` was chosen from.

    python benchmarks/steering_strength.py --features 40 --strengths 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import featurelens as fl  # noqa: E402
from concepts import GEN, NEUTRAL_PROMPTS, demo_dictionaries, lexicon_token_ids, prompt_masses  # noqa: E402


def word_features(analysis, min_count: int = 3, seed: int = 0) -> list[tuple[int, set[str]]]:
    """(feature, its max-token words) for features whose top examples keep peaking on the same whole word."""
    strings = analysis.store.token_strings()
    out = []
    for f, exs in analysis.store.top_examples_all(20):
        words = Counter()
        for e in exs:
            s = strings.get(e["tokens"][e["pos"] - e["start"]], "")
            if s.startswith(" ") and s.strip().isalpha() and len(s.strip()) >= 3:
                words[s.strip().lower()] += 1
        lex = {w for w, c in words.items() if c >= min_count}
        if lex:
            out.append((f, lex))
    rng = np.random.default_rng(seed)
    return [out[i] for i in rng.permutation(len(out))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dict", action="append", default=[], help="analyzed dictionaries (default: the demo's SAEs)")
    ap.add_argument("--features", type=int, default=40, help="features in all, split over the dictionaries")
    ap.add_argument("--strengths", default="1,2,4,8,16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.data_dir:
        fl.set_data_dir(args.data_dir)
    paths = [Path(p) for p in args.dict] or demo_dictionaries(Path(fl.data_dir()))
    strengths = [float(s) for s in args.strengths.split(",")]
    model = fl.load_model("gemma-3-270m")
    ppl_clean = statistics.median(fl.continuation_perplexities(model, NEUTRAL_PROMPTS, model.generate(NEUTRAL_PROMPTS, **GEN)))
    per = args.features // len(paths)
    results: dict[float, list[tuple[float, float]]] = {s: [] for s in strengths}
    for p in paths:
        a, d = fl.open_analysis(p), fl.load_dictionary(p)
        for f, lex in word_features(a)[:per]:
            ids = lexicon_token_ids(model, lex)
            if not ids:
                continue
            clean = statistics.mean(prompt_masses(model, NEUTRAL_PROMPTS, ids))
            line = []
            for s in strengths:
                steer = [fl.Steer(d, f, s)]
                ratio = statistics.mean(prompt_masses(model, NEUTRAL_PROMPTS, ids, steer)) / max(clean, 1e-12)
                ppl = statistics.median(fl.continuation_perplexities(model, NEUTRAL_PROMPTS,
                                                     model.generate(NEUTRAL_PROMPTS, interventions=steer, **GEN)))
                results[s].append((ratio, ppl))
                line.append(f"{s:g}: x{ratio:.1f} ppl {ppl:.0f}")
            print(f"{p.name[-6:]}#{f:<5d} {','.join(sorted(lex))[:28]:28s} " + "  ".join(line), flush=True)
    print(f"\n{len(results[strengths[0]])} features; unsteered continuations' median perplexity {ppl_clean:.1f}")
    print("strength  x3 or more   median ratio   median ppl   x3 and ppl < 2x unsteered")
    table = []
    for s in strengths:
        r = results[s]
        ok = statistics.mean(x >= 3 for x, _ in r)
        both = statistics.mean(x >= 3 and q < 2 * ppl_clean for x, q in r)
        med_r, med_p = statistics.median(x for x, _ in r), statistics.median(q for _, q in r)
        table.append({"strength": s, "x3": ok, "x3_fluent": both, "median_ratio": med_r, "median_ppl": med_p})
        print(f"{s:8g}  {ok:10.2f}   {med_r:12.2f}   {med_p:10.1f}   {both:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl_clean": ppl_clean, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
