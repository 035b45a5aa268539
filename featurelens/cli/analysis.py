"""`featurelens analyze`, `search`, `feature` and `explain`: dashboards, concept / text / token search, one
feature's page, feature labels (built-in or from a language model)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from typing import Any

from rich.table import Table

from ..errors import FeaturelensError, InputError
from . import common


ANALYZED_PATH = "an analyzed dictionary (its directory), or an analysis in PostgreSQL: postgresql://user@host/db#name"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="build dashboards, labels and the search index for every feature of a dictionary",
                       description="Stream held-out text through the model and the dictionary and store, for every "
                                   "feature, its top and quantile examples, density, histogram, logit lens, similar and "
                                   "co-firing features, an automatic label and a search embedding. Resumable: run it "
                                   "again after an interruption.")
    p.add_argument("path", help="the dictionary directory (SAELens layout: cfg.json + sae_weights.safetensors)")
    common.add_model(p, default="the one the dictionary was trained on", dtype=False)
    common.add(p, "corpus", default="nlp-corpus", note="(default nlp-corpus)")
    common.add(p, "tokens", default=500_000, note="(default 500k)")
    common.add(p, "batch_size", default=16, note="(contexts; default 16)")
    common.add(p, "ctx_len", default=128, note="(default 128)")
    p.add_argument("--split", default="test", choices=["test", "train", "all"], help="corpus split (default test)")
    common.add(p, "out", note="(the analysis directory; default <dictionary>/analysis)")
    common.add(p, "overwrite", note="(rebuilds a finished analysis; your labels are kept)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="keep the finished analysis in a PostgreSQL database, postgresql://user@host/db[#name] "
                        "(default name: from the dictionary's directory); it is built in --out, then copied in; "
                        "`featurelens serve --db URL` serves it")
    p.add_argument("--no-embed", action="store_true", help="skip the search embeddings (search falls back to lexical)")
    p.add_argument("--checkpoint-seconds", type=float, default=120.0, metavar="SECONDS",
                   help="seconds between saves of the partial analysis (default 120)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("search", help="find features by concept, by text they fire on, or by a token they promote",
                       description="search PATH \"legal document\" ranks features by meaning (labels and top snippets); "
                                   "--text shows the features that fire on a text, overall and per token; --promotes "
                                   "shows the features whose logit lens pushes a token up most.")
    p.add_argument("path", help=ANALYZED_PATH)
    p.add_argument("query", nargs="?", default=None, help="what the features should be about")
    p.add_argument("--text", default=None, help="features that fire on this text")
    p.add_argument("--promotes", default=None, metavar="TOKEN", help="features that push this output token up, e.g. "
                                                                    "' Paris' (mind the leading space)")
    common.add(p, "rows", default=10, note="(features; default 10)")
    p.add_argument("--method", default="auto", choices=["auto", "peaks", "fused", "embedding", "lexical"],
                   help="concept search: sentence embeddings (auto when installed) or lexical BM25; peaks: that plus "
                        "the concept's word forms at each feature's max tokens; fused: both rankings fused")
    p.add_argument("--fast", action="store_true",
                   help="concept search: skip the steering check. By default, where the model is known (-m, or the "
                        "model the dictionary records), the best --pool matches are steered on neutral prompts in "
                        "match order and the first that raises the concept's words 4x or more (on the median "
                        "prompt) leads the ranking")
    # the check's old opt-in flag, from before it ran by default: accepted, changes nothing
    p.add_argument("--steerable", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pool", type=int, default=10, help="matches the steering check may steer (default 10)")
    common.add_model(p, default="the one the dictionary was trained on; loaded for the steering check")
    common.add(p, "json")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("feature", help="one feature's dashboard in the terminal (or as an HTML page)")
    p.add_argument("path", help=ANALYZED_PATH)
    p.add_argument("index", help="the feature index")
    p.add_argument("--html", default=None, metavar="FILE", help="write a standalone HTML page to FILE")
    common.add(p, "json")
    p.add_argument("--set-label", default=None, metavar="TEXT", help="replace the feature's label with your own")
    p.add_argument("--clear-label", action="store_true", help="remove your label (the automatic one shows again)")
    p.set_defaults(func=cmd_feature)

    p = sub.add_parser("explain", help="label the features of an analyzed dictionary (built-in, or a language model)",
                       description="Write a short label for every feature (or --features) of an analyzed "
                                   "dictionary. Default: the built-in, model-free explainer. With --llm-url and "
                                   "--llm-model: any OpenAI-compatible chat endpoint (llama.cpp server, vLLM, a "
                                   "hosted API), one request per feature. Labels are stored one transaction per "
                                   "--batch, and features already labelled by the same explainer are skipped, so "
                                   "rerunning after a failure or Ctrl-C resumes (--overwrite labels them again).")
    p.add_argument("path", help=ANALYZED_PATH)
    p.add_argument("--llm-url", default=None, metavar="URL",
                   help="base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1 (requests go to "
                        "URL/chat/completions)")
    p.add_argument("--llm-model", default=None, metavar="NAME", help="the model name the endpoint serves")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY, used when set)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for each reply (default 60)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at once (default 4)")
    p.add_argument("--retries", type=int, default=None,
                   help="retries of a request that timed out, lost its connection or got a 5xx (default 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="features per stored transaction (default 64 with --llm-url, else 512)")
    p.add_argument("--features", default=None, metavar="LIST", help="only these features, e.g. 1,2,3")
    p.add_argument("--effects", action="store_true",
                   help="then score what each label says its feature promotes, by steering the feature (one "
                        "forward pass of the model per feature; stored as method steer-promotes:v1)")
    common.add_model(p, default="the one the dictionary was trained on; loaded for --effects")
    common.add(p, "overwrite", note="(labels again the features that already have a label from this explainer; "
                                   "--redo is its old spelling)", old=("--redo",))
    p.set_defaults(func=cmd_explain)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..analysis import analyze
    from ..dictionaries.compat import resolve_dictionary

    if args.store is not None:
        from ..store.backends import check_reachable

        check_reachable(args.store)  # before the model loads
    distributed.init_from_env(args.device)  # under torchrun: the ranks share the token stream, rank 0 writes
    sae, path = resolve_dictionary(args.path)
    model = common.load_model(args, sae)
    if args.device:
        sae = sae.to(args.device)
    sae.source = path
    result = analyze(model, sae, args.corpus, n_tokens=args.tokens,
                     batch_size=args.batch_size, ctx_len=args.ctx_len, split=args.split, out=args.out,
                     overwrite=args.overwrite, embed=not args.no_embed, checkpoint_every=args.checkpoint_seconds,
                     store=args.store)
    if distributed.is_main():
        print(result)
    return 0


def _short(s: str, n: int = 110) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def cmd_search(args: argparse.Namespace) -> int:
    from ..analysis import open_analysis

    modes = [m for m in (args.query is not None, args.text is not None, args.promotes is not None) if m]
    if len(modes) != 1:
        raise InputError('give exactly one of: a query ("legal document"), --text TEXT, or --promotes TOKEN')
    if args.rows <= 0:
        raise InputError(f"--rows must be positive, got {args.rows}")
    if args.pool <= 0:
        raise InputError(f"--pool must be positive, got {args.pool}")
    fd = open_analysis(args.path)
    if args.model or (args.device and fd.model_name):  # else the analysis loads its own model, on the cpu
        fd._model = common.load_model(args, name=args.model or fd.model_name)
    console = common.console()
    if args.query is not None:
        checked = not args.fast and bool(args.model or fd.model_name)
        if checked:
            from ..interventions import steerable_search

            try:
                hits = steerable_search(fd, args.query, k=args.rows, pool=args.pool, method=args.method,
                                        progress=not args.json)
            except (FeaturelensError, OSError) as e:  # no model to steer: the search still answers
                print(f"featurelens: steering check skipped ({e}); --fast skips it without trying",
                      file=sys.stderr)
                checked = False
        if not checked:
            hits = fd.search(args.query, k=args.rows, method=args.method)
        if args.json:
            print(json.dumps([asdict(h) for h in hits], indent=2))
            return 0
        method = (hits[0].method if hits else args.method) + (", checked by steering" if checked else "")
        t = Table(title=f"features about {args.query!r} ({method} search)", show_lines=True)
        cols = [("#", {"justify": "right"}), ("feature", {"justify": "right"}), ("score", {"justify": "right"}),
                ("label", {}), ("label score", {"justify": "right"}), ("peaks on", {}),
                ("top snippets (near the max token)", {})]
        if checked:
            cols.insert(3, ("steered (strength): concept words; promotes", {}))
        for col, kw in cols:
            t.add_column(col, **kw)
        for r, h in enumerate(hits, 1):
            score = "–" if h.label_score is None else f"{h.label_score:.2f}" + ("" if h.label_clear else " unclear")
            row = [str(r), str(h.feature), f"{h.score:.3f}", h.label or "", score,
                   ", ".join(dict.fromkeys(h.max_tokens[:5])), "\n".join(_short(s, 90) for s in h.near_max[:2])]
            if checked:
                row.insert(3, "not steered" if h.steer_ratio is None else
                           f"({h.steer_strength:g}) {h.steer_ratio:.2g}x; {', '.join(h.steer_promotes)}")
            t.add_row(*row)
        console.print(t)
        if checked and hits:
            words = ", ".join(hits[0].steer_words) or "none found: every ratio is 1"
            console.print(f"concept words (from the matches' own examples): {words}")
        if not hits:
            console.print("no matching features")
        return 0
    if args.text is not None:
        res = fd.search_text(args.text, k=args.rows)
        if args.json:
            print(json.dumps({"tokens": res.tokens, "overall": [asdict(h) for h in res.overall],
                              "per_token": res.per_token}, indent=2))
            return 0
        t = Table(title=f"features firing on {args.text!r}")
        for col in ("feature", "max act", "% of its max", "at token", "label"):
            t.add_column(col, justify="left" if col in ("label", "at token") else "right")
        for h in res.overall:
            t.add_row(str(h.feature), f"{h.max_act:.3g}", f"{h.relative:.0%}", repr(res.tokens[h.token_index]),
                      h.label or "")
        console.print(t)
        pt = Table(title="per token (features nearest their own maximum)")
        pt.add_column("token")
        pt.add_column("features (activation)")
        for tok, row in zip(res.tokens, res.per_token):
            pt.add_row(repr(tok), "  ".join(f"#{f} {a:.3g}" + (f" {_short(l, 40)}" if l else "")
                                            for f, a, _, l in row[:3]))
        console.print(pt)
        return 0
    hits = fd.search_promotes(args.promotes, k=args.rows)
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
        return 0
    t = Table(title=f"features that push {args.promotes!r} up (logit lens)")
    for col in ("feature", "logit", "z", "label"):
        t.add_column(col, justify="left" if col == "label" else "right")
    for h in hits:
        t.add_row(str(h.feature), f"{h.logit:+.3g}", f"{h.zscore:.1f}", h.label or "")
    console.print(t)
    return 0


def cmd_feature(args: argparse.Namespace) -> int:
    from ..analysis import open_analysis

    fd = open_analysis(args.path)
    idx = fd.check_index(args.index)
    if args.set_label is not None and args.clear_label:
        raise InputError("give --set-label or --clear-label, not both")
    if args.set_label is not None:
        fd.set_label(idx, args.set_label)
    elif args.clear_label:
        fd.set_label(idx, None)
    dash = fd.feature(idx)
    if args.html:
        dash.to_html(args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print(dash.to_json(indent=2))
    elif not args.html:
        common.console().print(dash)
    return 0


def _feature_list(text: str, check) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"--features wants a comma-separated list of feature indices, got {text!r}")
    return list(dict.fromkeys(check(t) for t in items))


def cmd_explain(args: argparse.Namespace) -> int:
    import os
    import time

    from ..analysis import AutoExplainer, ChatExplainer, open_analysis
    from ..analysis.explain import labeled_by

    llm_only = [flag for flag, v in (("--api-key-env", args.api_key_env), ("--timeout", args.timeout),
                                     ("--concurrency", args.concurrency), ("--retries", args.retries))
                if v is not None]
    if (args.llm_url is None) != (args.llm_model is None):
        raise InputError("give --llm-url and --llm-model together (the endpoint and the model it serves)")
    if args.llm_url is None and llm_only:
        raise InputError(f"{', '.join(llm_only)} apply only with --llm-url and --llm-model")
    if args.batch is not None and args.batch <= 0:
        raise InputError(f"--batch must be positive, got {args.batch}")
    if args.llm_url is not None:
        var = args.api_key_env or "OPENAI_API_KEY"
        key = os.environ.get(var) or None
        if args.api_key_env is not None and key is None:
            raise InputError(f"--api-key-env {var}: that environment variable is not set")
        explainer = ChatExplainer(args.llm_url, args.llm_model, api_key=key,
                                  timeout=60.0 if args.timeout is None else args.timeout,
                                  concurrency=4 if args.concurrency is None else args.concurrency,
                                  max_retries=1 if args.retries is None else args.retries)
        batch = args.batch or 64
    else:
        explainer = AutoExplainer()
        batch = args.batch or 512
    fd = open_analysis(args.path)
    try:
        if fd.store.readonly:
            raise InputError(f"{fd.store.path} is read-only: labels cannot be written there")
        features = _feature_list(args.features, fd.check_index) if args.features is not None else None
        present = {int(i) for (i,) in fd.store.conn.execute("SELECT idx FROM features")}
        wanted = present if features is None else present & set(features)
        done = len(wanted & labeled_by(fd.store, explainer.provenance)) if not args.overwrite else 0
        if done == len(wanted):
            print(f"nothing to do: all {len(wanted):,} features already have a label from {explainer.provenance} "
                  f"(--overwrite labels them again)")
            return _label_effects(args, fd, features) if args.effects else 0
        started = time.time()
        try:
            n = fd.explain(explainer, features, skip_labeled=not args.overwrite, batch=batch)
        except FeaturelensError:
            stored = fd.store.conn.execute("SELECT COUNT(*) FROM labels WHERE provenance = ? AND created >= ?",
                                           (explainer.provenance, started)).fetchone()[0]
            print(f"stopped: {stored:,} features were labelled before the failure and are kept; run the same "
                  f"command again (without --overwrite) to label the rest", file=sys.stderr)
            raise
        print(f"labelled {n:,} features with {explainer.provenance}"
              + (f"; {done:,} already had a label from it (skipped)" if done else ""))
        return _label_effects(args, fd, features) if args.effects else 0
    finally:
        fd.close()


def _label_effects(args: argparse.Namespace, fd: Any, features: list[int] | None) -> int:
    """`explain --effects`: score what the labels say their features promote, by steering them."""
    from ..interventions import EFFECT_METHOD, score_label_effects

    if args.model:
        fd._model = common.load_model(args, name=args.model)

    scores = score_label_effects(fd, features)
    borne = sum(v > 1 for v in scores.values())
    print(f"{EFFECT_METHOD}: {len(scores):,} labels name words their feature promotes; steering raised those "
          f"words for {borne:,}" + (f" (median {statistics.median(scores.values()):.2f}x)" if scores else ""))
    return 0
