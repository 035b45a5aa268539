"""Cost of attention circuits on Gemma 3 270M: one QK decomposition, one head split, and both for the strongest
cross-position edges of a demo-sized graph.

    python benchmarks/attention_circuits.py [--transcoders DIR] [--prompt TEXT] [--max-feature-nodes 1000]
    FEATURELENS_HOME=<data dir> python benchmarks/attention_circuits.py --graph <data dir>/graphs/demo/<slug>.json

Without --transcoders it uses random skip transcoders of the demo's shape (width 1024, top-32, every layer): the
cost depends on the shapes (layers, positions, active features, head_dim), not on what the features mean. With
--graph it measures a saved graph (a demo's) with the model and transcoders the graph names. Prints seconds per
step and the process's peak resident memory (above what the model and transcoders hold once their
weights are paged in).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import featurelens as fl  # noqa: E402
from featurelens.attribution.heads import AttentionCircuits  # noqa: E402
from featurelens.attribution.qk import attention_story, qk_decomposition  # noqa: E402
from featurelens.dictionaries.sae import DictionaryConfig, SparseDictionary, TranscoderSet  # noqa: E402


def random_transcoders(model: fl.HookedTransformer, width: int, k: int) -> TranscoderSet:
    torch.manual_seed(0)
    out = {}
    for layer in range(model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=width, arch="topk", k=k, transcoder=True, skip=True,
                               hook_name=f"blocks.{layer}.ln2.hook_normalized",
                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model.name)
        tc = SparseDictionary(cfg)
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.01)
        out[layer] = tc
    return TranscoderSet(out)


def peak_mb() -> float:
    """Peak resident memory since the last `reset_peak` (Linux's VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def gemm_gflops() -> float:
    """float32 matrix-multiply throughput right now (the machine may be shared): to scale the timings."""
    a, b = torch.randn(5120, 640), torch.randn(640, 1024)
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 5120 * 640 * 1024 / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transcoders", default=None)
    ap.add_argument("--graph", default=None, help="a saved graph JSON (its model and transcoders are loaded)")
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--max-feature-nodes", type=int, default=1000)
    ap.add_argument("--edges", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, float32 GEMM {gemm_gflops():.0f} GFLOP/s at the start")
    if args.graph:
        g = fl.load_graph(args.graph)
        model = fl.load_model(g.model_name)
        tcs = fl.load_dictionary(args.transcoders or g.transcoders)
        print(f"graph {args.graph}: {g.n_pos} tokens, {g.n_features} feature nodes, {g.n_nodes} nodes, "
              f"{g.edges.shape[1]} edges")
    else:
        model = fl.load_model("gemma-3-270m")
        tcs = fl.load_dictionary(args.transcoders) if args.transcoders else random_transcoders(model, 1024, 32)
        t = time.perf_counter()
        g = fl.attribute(model, tcs, args.prompt, max_feature_nodes=args.max_feature_nodes, progress=False)
        print(f"graph: {g.n_pos} tokens, {g.info['n_active_features']} active features, {g.n_features} feature "
              f"nodes, {time.perf_counter() - t:.1f} s; peak RSS {peak_mb():.0f} MB")
    P, L = g.n_pos, model.cfg.n_layers
    with torch.no_grad():  # pages the weights in, so that the memory figures below are what the questions add
        model(torch.tensor(g.tokens, dtype=torch.long, device=model.device)[None])
    reset_peak()
    before = rss_mb()
    t = time.perf_counter()
    circuits = AttentionCircuits(g, model, tcs)
    qk_decomposition(circuits, 1, 0, 1, 0)  # first question: records q/k, builds the source columns
    print(f"setup (record, frozen pass, every graph node pushed to every attention input, one small question): "
          f"{time.perf_counter() - t:.2f} s; peak RSS {peak_mb() - before:.0f} MB above before")
    times = []
    questions = [(L - 1, 0, P - 1, 1), (L // 2, 1, P - 1, P - 3), (5, 3, P - 2, 2), (L - 1, 2, P - 1, P - 1)]
    for layer, head, q, k in questions:
        t = time.perf_counter()
        r = qk_decomposition(circuits, layer, head, q, k)
        times.append(time.perf_counter() - t)
        print(f"qk {layer}.{head} ({q}, {k}): {times[-1]:.2f} s, score {r.score:+.4f}, sum {r.total:+.4f}")
    print(f"one QK decomposition: median {sorted(times)[len(times) // 2]:.2f} s; peak RSS {peak_mb():.0f} MB, "
          f"{peak_mb() - before:.0f} MB above the resident memory before the first question; "
          f"GEMM now {gemm_gflops():.0f} GFLOP/s")
    # one question on a fresh frozen model, as a first question about a graph costs: the recording, the frozen pass
    # and the push of every node to every attention input are then part of it
    del circuits
    t = time.perf_counter()
    qk_decomposition(AttentionCircuits(g, model, tcs), *questions[0])
    print(f"one QK decomposition on a fresh frozen model (recording, frozen pass and node push included): "
          f"{time.perf_counter() - t:.2f} s")
    # the story from scratch (a fresh frozen model, as a server job on a saved graph does): nothing reused from above
    reset_peak()
    before = rss_mb()
    t = time.perf_counter()
    circuits = AttentionCircuits(g, model, tcs)
    t_setup = time.perf_counter() - t
    story = attention_story(circuits, n_edges=args.edges)
    print(f"attention story of the {len(story['edges'])} strongest cross-position edges (head split + QK of each "
          f"one's top head): {time.perf_counter() - t:.1f} s including {t_setup:.1f} s of setup; peak RSS "
          f"{peak_mb():.0f} MB ({peak_mb() - before:.0f} MB above before); GEMM now {gemm_gflops():.0f} GFLOP/s")

if __name__ == "__main__":
    main()
