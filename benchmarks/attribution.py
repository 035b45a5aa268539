"""Attribution-graph speed and agreement: featurelens vs circuit-tracer on the same weights, prompt and transcoders.

    python benchmarks/attribution.py [--prompt "The capital of France is"] [--transcoders DIR] [--max-feature-nodes N]
                                     [--runs 3] [--batch-size 256] [--threads N] [--long-tokens 1000] [--no-long]

What it does, in order:

1. Loads the embedded Gemma 3 270M in featurelens, and the transcoders: `--transcoders DIR` (any directory
   `fl.load_dictionary` reads as a per-layer set covering every layer), or else 18 TopK-16 width-2048 transcoders
   trained once with `fl.train_transcoders` into <data dir>/bench-transcoders/ (`--train-tokens`, cached).
2. Builds (once) circuit-tracer's own virtual environment under <data dir>/bench-envs/circuit-tracer from PyPI
   (circuit-tracer needs transformers<=4.57.3, which featurelens's environment does not have), writes the model as a
   Hugging Face directory (the tensors featurelens's GGUF reader produces, so both sides run identical weights) and
   the transcoders in circuit-tracer's layout with `fl.save_circuit_tracer` (TopK: its loader knows ReLU and JumpReLU
   only, so the driver puts circuit-tracer's own TopK module, followed by a ReLU as ours has, on each loaded
   transcoder, with the k that config.yaml records).
3. Runs circuit-tracer (TransformerLens backend, offline) in that venv on the prompt's token ids, `--runs` times, and
   saves its graph: the dense adjacency for comparison and, via circuit-tracer's `create_graph_files`, its viewer
   JSON at a stable path (<data dir>/bench-graphs/circuit-tracer/<slug>.json) for the web app's tests.
   One fix is applied to circuit-tracer 0.5 in its process: its TransformerLens replacement model shares the last
   layer's rotary tables with every layer, so Gemma 3's local layers (RoPE base 10k) would rotate with the global
   base (1M) and it would trace another model (logits off by ~2); the driver shares them per attention type instead.
4. Checks that the two libraries compute the same model: max |logit difference| on the prompt (TransformerLens vs
   featurelens), which must be below 1e-3 or the comparison is void.
5. Runs `fl.attribute` with the same settings `--runs` times, and compares the graphs: nodes are matched by
   (layer, position, feature) / (layer, position) errors / position embeddings / logit token; on the rows both
   computed (logits and admitted features) and the columns of nodes in both graphs, the Pearson correlation of the
   edge weights over every entry that either graph has non-zero.
6. Times one 1,000-token prompt in featurelens in a child process and reports its peak RSS (the child's
   ru_maxrss, model and transcoders included) and how much the attribution itself added.

Times are medians over the runs (each run a full `attribute` call, the first one included). On a machine shared with
other work, compare the ratio from one run of this script, not absolute times across runs. Results are also written
to <data dir>/bench-results/attribution.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _circuit_tracer_env as ctenv  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "nlp-corpus" / "sentences.jsonl.gz"
# Fallback text for the long prompt when the corpus copy is not beside the repository (written for this benchmark).
LONG_TEXT = (
    "The river town woke slowly. Bakers lit their ovens before dawn, and the smell of bread drifted over the water "
    "while fishing boats slipped out past the old stone bridge. By seven the market square was full: farmers sold "
    "apples, cheese and honey, a violinist played near the fountain, and children chased pigeons between the stalls. "
    "The mayor, who had promised a new library three years earlier, walked through the crowd shaking hands and "
    "answering questions about the budget. Some residents complained that the roads needed repair; others wanted "
    "more buses to the city, forty kilometres to the north. In the afternoon a storm rolled in from the hills, "
    "thunder echoed off the cliffs, and the square emptied in minutes. When the rain stopped, the streets shone "
    "under the lamps and the cafés filled again with people talking about the weather, the harvest and the election "
    "coming in the spring. "
)


# ----------------------------------------------------------------------------------------------- inputs
def load_or_train_transcoders(model: Any, args: argparse.Namespace) -> tuple[Any, Path]:
    import featurelens as fl
    from featurelens.paths import sub_dir

    if args.transcoders:
        path = Path(args.transcoders).expanduser()
        return fl.load_dictionary(path), path
    out = sub_dir("bench-transcoders") / f"{model.name}-topk16-w2048-{args.train_tokens}"
    if (out / "featurelens.json").is_file():  # trained by an earlier run
        return fl.load_dictionary(out), out
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*.pt"))
    print(f"benchmark: training 18 TopK-16 width-2048 transcoders on {args.train_tokens:,} tokens into {out} "
          f"(once{', resuming' if resume else ''})", flush=True)
    tset = fl.train_transcoders(model, layers="all", arch="topk", k=16, width=2048, tokens=args.train_tokens,
                                out=out, resume=resume)
    return tset, out


def circuit_tracer_transcoders(tset: Any, source: Path) -> Path:
    """The transcoders in circuit-tracer's layout (`fl.save_circuit_tracer`, which circuit-tracer's loader reads: see
    tests/dictionaries/test_transcoders.py) under <data dir>/bench-transcoders/<name>-circuit-tracer."""
    import featurelens as fl
    from featurelens.paths import sub_dir

    out = sub_dir("bench-transcoders") / f"{source.name}-circuit-tracer"
    fl.save_circuit_tracer(tset, out, model_name=ctenv.TL_NAMES.get(tset.cfg.model_name, tset.cfg.model_name))
    print(f"transcoders for circuit-tracer: {out}", flush=True)
    return out


def long_prompt_tokens(model: Any, n_tokens: int) -> list[int]:
    texts: list[str] = []
    if CORPUS.is_file():
        with gzip.open(CORPUS, "rt") as f:
            for line in f:
                texts.append(json.loads(line).get("text", ""))
                if sum(len(t) for t in texts) > n_tokens * 8:
                    break
    text = " ".join(texts) if texts else LONG_TEXT * (n_tokens // 150 + 2)
    ids = model.to_tokens(text)[0].tolist()
    if len(ids) < n_tokens:
        ids = model.to_tokens((text + " ") * (n_tokens // len(ids) + 1))[0].tolist()
    return ids[:n_tokens]


# ----------------------------------------------------------------------------------------------- graphs
def _keys_featurelens(g: Any) -> tuple[list[tuple], list[int]]:
    """Node keys in g's node order, and the indices of the nodes whose incoming edges were computed (rows)."""
    keys: list[tuple] = [("f", *map(int, f)) for f in g.features.tolist()]
    keys += [("e", l, p) for l in range(g.n_layers) for p in range(g.n_pos)]
    keys += [("t", p) for p in range(g.n_pos)]
    keys += [("l", int(t)) for t in g.logit_tokens.tolist()]
    rows = list(range(g.n_features)) + list(range(len(keys) - g.n_logits, len(keys)))
    return keys, rows


def _keys_circuit_tracer(ct: dict[str, torch.Tensor], n_layers: int) -> tuple[list[tuple], list[int]]:
    sel = ct["active_features"][ct["selected_features"]]
    n_pos = int(ct["input_tokens"].numel())
    keys: list[tuple] = [("f", *map(int, f)) for f in sel.tolist()]
    keys += [("e", l, p) for l in range(n_layers) for p in range(n_pos)]
    keys += [("t", p) for p in range(n_pos)]
    keys += [("l", int(t)) for t in ct["logit_tokens"].tolist()]
    n_logits = int(ct["logit_tokens"].numel())
    rows = list(range(len(sel))) + list(range(len(keys) - n_logits, len(keys)))
    return keys, rows


def compare_graphs(g: Any, ct: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Correlation of edge weights on the nodes both graphs have (rows: targets both computed)."""
    fl_keys, fl_rows = _keys_featurelens(g)
    ct_keys, ct_rows = _keys_circuit_tracer(ct, g.n_layers)
    fl_index = {k: i for i, k in enumerate(fl_keys)}
    ct_index = {k: i for i, k in enumerate(ct_keys)}
    common = [k for k in ct_keys if k in fl_index]
    fl_row_set = set(fl_rows)
    rows = [k for k in (ct_keys[i] for i in ct_rows) if k in fl_index and fl_index[k] in fl_row_set]
    ci = torch.tensor([ct_index[k] for k in common])
    cr = torch.tensor([ct_index[k] for k in rows])
    fi = torch.tensor([fl_index[k] for k in common])
    fr = torch.tensor([fl_index[k] for k in rows])
    A_ct = ct["adjacency"][cr][:, ci].double()  # [rows, common]
    n = len(fl_keys)
    A_fl_full = torch.zeros(n, n, dtype=torch.float64)
    A_fl_full[g.edges[0], g.edges[1]] = g.weights.double()
    A_fl = A_fl_full[fr][:, fi]
    mask = (A_ct != 0) | (A_fl != 0)
    x, y = A_ct[mask], A_fl[mask]
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if x.numel() > 1 else float("nan")
    rel = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)) if x.numel() else float("nan")
    feats_ct = sum(1 for k in ct_keys if k[0] == "f")
    feats_fl = sum(1 for k in fl_keys if k[0] == "f")
    feats_common = sum(1 for k in common if k[0] == "f")
    # how much of circuit-tracer's total |edge weight| lies on the compared block
    total_ct = float(ct["adjacency"].abs().sum())
    return {"pearson": corr, "max_abs_diff_rel": rel, "entries": int(mask.sum()), "rows": len(rows),
            "common_nodes": len(common), "features_circuit_tracer": feats_ct, "features_featurelens": feats_fl,
            "features_common": feats_common,
            "circuit_tracer_weight_covered": float(A_ct.abs().sum()) / total_ct if total_ct else float("nan")}


# ----------------------------------------------------------------------------------------------- the long prompt
def long_child(args: argparse.Namespace) -> None:
    """Child process: attribute one long prompt, print one JSON line with time and memory."""
    import featurelens as fl

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = fl.load_model(args.model)
    tset, _ = load_or_train_transcoders(model, args)
    ids = long_prompt_tokens(model, args.long_tokens)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    g = fl.attribute(model, tset, ids, max_feature_nodes=args.long_max_feature_nodes, batch_size=args.batch_size,
                     progress=True)
    seconds = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("LONG-RESULT " + json.dumps({"seconds": seconds, "tokens": len(ids), "rss_before_kib": rss_before,
                                       "rss_peak_kib": rss_after, "features_active": g.info.get("n_active_features"),
                                       "feature_rows": g.n_features, "edges": int(g.weights.numel())}), flush=True)


def run_long(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--long-child", "--model", args.model, "--long-tokens", str(args.long_tokens),
           "--batch-size", str(args.batch_size), "--train-tokens", str(args.train_tokens)]
    if args.long_max_feature_nodes is not None:
        cmd += ["--long-max-feature-nodes", str(args.long_max_feature_nodes)]
    if args.transcoders:
        cmd += ["--transcoders", args.transcoders]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    line = next((l for l in p.stdout.splitlines() if l.startswith("LONG-RESULT ")), None)
    if p.returncode != 0 or line is None:
        return {"error": f"the long-prompt run failed (exit {p.returncode}); output: {p.stdout[-2000:]}"}
    res = json.loads(line[len("LONG-RESULT "):])
    res["child_peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["child_wall_s"] = wall
    return res


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--transcoders", default=None, help="a per-layer transcoder set directory (default: train one)")
    ap.add_argument("--max-feature-nodes", type=int, default=None, help="default: every active feature")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--train-tokens", type=int, default=200_000,
                    help="tokens to train the default transcoders on (once, cached; about 100 tokens/s on 2 cores)")
    ap.add_argument("--long-tokens", type=int, default=1000)
    ap.add_argument("--long-max-feature-nodes", type=int, default=1024)
    ap.add_argument("--no-long", action="store_true", help="skip the 1,000-token prompt")
    ap.add_argument("--no-circuit-tracer", action="store_true", help="featurelens only (no venv, no comparison)")
    ap.add_argument("--long-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.long_child:
        long_child(args)
        return

    import featurelens as fl
    from featurelens.paths import sub_dir

    model = fl.load_model(args.model)
    tset, tc_path = load_or_train_transcoders(model, args)
    tokens = model.to_tokens(args.prompt)[0].tolist()
    first = tset[tset.layers[0]]
    print(f"prompt: {args.prompt!r} ({len(tokens)} tokens, BOS included); model {model.name}; threads "
          f"{torch.get_num_threads()}", flush=True)
    print(f"transcoders: {tc_path} ({len(tset.layers)} layers, {first.cfg.arch}"
          f"{f' k={first.cfg.k}' if first.cfg.k else ''}, width {first.d_sae}"
          f"{', skip' if first.W_skip is not None else ''})", flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in args.prompt.lower()).strip("-")[:60] or "prompt"
    results: dict[str, Any] = {"prompt": args.prompt, "tokens": len(tokens), "transcoders": str(tc_path),
                               "max_feature_nodes": args.max_feature_nodes, "batch_size": args.batch_size,
                               "threads": torch.get_num_threads()}

    ct = None
    if not args.no_circuit_tracer:
        if model.name not in ctenv.TL_NAMES:
            raise SystemExit(f"no TransformerLens name known for {model.name}; known: {', '.join(ctenv.TL_NAMES)}")
        env = ctenv.ensure_env()
        versions = ctenv.env_versions(env)
        hf_dir = ctenv.export_hf_model(model.name)
        ct_tc = circuit_tracer_transcoders(tset, tc_path)
        json_dir = sub_dir("bench-graphs") / "circuit-tracer"
        work = sub_dir("bench-runs") / "attribution-circuit-tracer"
        job = {"hf_dir": str(hf_dir), "tl_name": ctenv.TL_NAMES[model.name], "transcoders": str(ct_tc),
               "tokens": tokens, "runs": args.runs, "batch_size": args.batch_size,
               "max_feature_nodes": args.max_feature_nodes, "max_n_logits": 10, "desired_logit_prob": 0.95,
               "json_dir": str(json_dir), "slug": slug, "scan": f"featurelens/{tc_path.name}",
               "node_threshold": 0.8, "edge_threshold": 0.98, "threads": args.threads}
        print(f"circuit-tracer {versions['circuit_tracer']} (TransformerLens {versions['transformer_lens']}, torch "
              f"{versions['torch']}) in {env}", flush=True)
        ct_res = ctenv.run_driver(env, job, work, threads=args.threads)
        from safetensors.torch import load_file

        ct = load_file(str(work / "graph.safetensors"))
        with torch.no_grad():
            ours = model(torch.tensor([tokens]))[0, -1].float()
        logit_diff = float((ours - ct["last_logits"]).abs().max())
        print(f"same weights: max |logit difference| TransformerLens vs featurelens on the prompt = {logit_diff:.2e}",
              flush=True)
        if logit_diff > 1e-3:
            raise SystemExit("the two libraries do not compute the same model (logit difference above 1e-3): "
                             "comparison void")
        results["circuit_tracer"] = {**ct_res, "versions": versions, "logit_max_abs_diff": logit_diff}
        print(f"circuit-tracer graph JSON (its create_graph_files): {ct_res['graph_json']}", flush=True)

    fl_times, g = [], None
    for i in range(args.runs):
        t = time.perf_counter()
        g = fl.attribute(model, tset, tokens, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                         progress=False)
        fl_times.append(time.perf_counter() - t)
        print(f"featurelens run {i + 1}/{args.runs}: {fl_times[-1]:.2f}s", flush=True)
    assert g is not None
    fl_med = statistics.median(fl_times)
    results["featurelens"] = {"times": fl_times, "median_s": fl_med, "n_active": g.info.get("n_active_features"),
                              "n_selected": g.n_features, "edges": int(g.weights.numel())}
    fl_dir = sub_dir("bench-graphs") / "featurelens"
    try:
        results["featurelens"]["graph_json"] = str(fl.save_graph(g.prune(), fl_dir, slug=slug))
    except Exception as e:  # the comparison does not depend on it
        print(f"(featurelens graph not saved: {type(e).__name__}: {e})", flush=True)

    print()
    print(f"active features: featurelens {g.info.get('n_active_features')}, admitted {g.n_features}"
          + (f"; circuit-tracer {ct_res['n_active']}, admitted {ct_res['n_selected']}" if ct is not None else ""))
    if ct is not None:
        cmp = compare_graphs(g, ct)
        results["comparison"] = cmp
        ct_med = results["circuit_tracer"]["median_s"]
        results["speedup"] = ct_med / fl_med
        print(f"circuit-tracer: median {ct_med:.2f}s  (runs {', '.join(f'{t:.2f}' for t in ct_res['times'])}; "
              f"model+transcoders load {ct_res['load_s']:.1f}s, not counted)")
        print(f"featurelens:    median {fl_med:.2f}s  (runs {', '.join(f'{t:.2f}' for t in fl_times)})")
        print(f"speed-up: {ct_med / fl_med:.2f}x  (goal: at least 2x)")
        print(f"edge correlation: {cmp['pearson']:.6f}  (goal: above 0.99) over {cmp['entries']:,} non-zero entries, "
              f"{cmp['rows']} target rows x {cmp['common_nodes']} common nodes; max |diff| / max |w| = "
              f"{cmp['max_abs_diff_rel']:.2e}")
        print(f"feature nodes: circuit-tracer {cmp['features_circuit_tracer']}, featurelens "
              f"{cmp['features_featurelens']}, common {cmp['features_common']}; compared block holds "
              f"{cmp['circuit_tracer_weight_covered']:.1%} of circuit-tracer's total |edge weight|")
    else:
        print(f"featurelens: median {fl_med:.2f}s  (runs {', '.join(f'{t:.2f}' for t in fl_times)})")

    if not args.no_long:
        print(f"\n{args.long_tokens}-token prompt (featurelens, max_feature_nodes={args.long_max_feature_nodes}), "
              f"in a child process...", flush=True)
        long = run_long(args)
        results["long_prompt"] = long
        if "error" in long:
            print(long["error"])
        else:
            gib = 1024 ** 2
            print(f"{long['tokens']}-token prompt: attribute {long['seconds']:.1f}s; peak RSS "
                  f"{long['rss_peak_kib'] / gib:.2f} GiB (before attribute {long['rss_before_kib'] / gib:.2f} GiB: "
                  f"model + transcoders); {long['features_active']:,} active features, {long['feature_rows']} rows, "
                  f"{long['edges']:,} edges")
    out = sub_dir("bench-results") / "attribution.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
