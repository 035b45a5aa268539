"""Does a transcoder respond to a perturbation of its input as the MLP it replaces does? The question behind an
attribution graph's indirect effects: the graph carries an upstream feature's effect through every later
transcoder's linear response (its active features held, as `attribute` linearises it), while the real model carries
it through the MLP.

    python benchmarks/transcoder_response.py --data-dir DIR --transcoders DIR [--transcoders DIR ...]
        [--contexts 48] [--scale 0.05] [--layers 0,1,3,5,9,12,17]

For each set and layer, over held-out contexts of the corpus's test split (BOS left out): a perturbation dx of each
row's MLP input (`scale` times its difference from another row's, the directions activations vary in, as in
training with `response_coefficient`), the MLP's response dy = (mlp(x + dx) - mlp(x - dx)) / 2 (post-MLP norm
included) and the transcoder's, dx @ W_skip.T + ((dx @ W_enc) * active) @ W_dec. Printed per layer, medians over
rows: the relative error of the response |r - dy|^2 / |dy|^2 (0 is exact; 1 is no better than no response at all),
the same for the skip alone, the relative error of the values |tc(x) - y|^2 / |y|^2 with the active features'
mean count; and, once per layer, the response error of the best constant linear map dx -> dy (least squares on
three quarters of the rows, measured on the rest): how much of the MLP's response any fixed linear map, such as a
skip, could carry. Medians, because a few tokens carry MLP outputs hundreds of times the median's norm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--transcoders", action="append", required=True, help="a transcoder set's directory (repeatable)")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--contexts", type=int, default=48)
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--layers", default="0,1,3,5,9,12,17")
    args = ap.parse_args()

    import torch

    import featurelens as fl
    from featurelens import paths

    paths._override = Path(args.data_dir).expanduser()
    model = fl.load_model(args.model)
    layers = [int(v) for v in args.layers.split(",")]
    contexts = fl.load_contexts(model, "nlp-corpus", 128, split="test", progress=False)[: args.contexts]
    hooks = {layer: f"blocks.{layer}.ln2.hook_normalized" for layer in layers}
    _, cache = model.run_with_cache(contexts, names_filter=list(hooks.values()))
    sets = [(d, fl.load_dictionary(d)) for d in args.transcoders]
    print(f"{len(contexts)} contexts, perturbation {args.scale} x (another row - the row); medians over rows")
    print(f"{'layer':>5}  " + "  ".join(f"{Path(d).name[:34]:>34}" for d, _ in sets))
    print(f"{'':>5}  " + "  ".join(f"{'response':>9}{'skip only':>10}{'values':>8}{'L0':>7}" for _ in sets)
          + f"  {'best fixed':>10}")
    means: list[list[float]] = [[] for _ in sets]
    for layer in layers:
        x = cache[hooks[layer]][:, 1:].reshape(-1, model.cfg.d_model).float()
        g = torch.Generator().manual_seed(layer)
        dx = args.scale * (x[torch.randperm(len(x), generator=g)] - x)
        blk = model.blocks[layer]
        dy = (blk.mlp_output(x + dx) - blk.mlp_output(x - dx)) / 2
        y = blk.mlp_output(x)
        moved = dy.pow(2).sum(-1) > 0

        def rel(r: torch.Tensor, t: torch.Tensor, keep: torch.Tensor = moved) -> float:
            return float(((r - t).pow(2).sum(-1)[keep] / t.pow(2).sum(-1)[keep]).median())

        cells = []
        for i, (_, tset) in enumerate(sets):
            tc = tset[layer]
            with torch.no_grad():
                acts = tc.encode(x)
                held = (acts > 0).float()
                skip = dx @ tc.W_skip.T if tc.W_skip is not None else torch.zeros_like(dy)
                response = skip + ((dx @ tc.W_enc) * held) @ tc.W_dec
                values = tc.decode(acts, x)
            r = rel(response, dy)
            means[i].append(r)
            cells.append(f"{r:9.3f}{rel(skip, dy):10.3f}{rel(values, y):8.3f}{float(held.sum(1).mean()):7.1f}")
        fit = len(x) * 3 // 4
        best = torch.linalg.lstsq(dx[:fit], dy[:fit]).solution
        r_best = rel(dx[fit:] @ best, dy[fit:], moved[fit:])
        print(f"{layer:>5}  " + "  ".join(cells) + f"  {r_best:10.3f}", flush=True)
    print(f"{'mean':>5}  " + "  ".join(f"{sum(m) / len(m):9.3f}{'':25}" for m in means))


if __name__ == "__main__":
    main()
