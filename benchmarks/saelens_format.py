"""Format oracle: SAELens reads the dictionaries featurelens writes, and featurelens reads what SAELens writes.

    python benchmarks/saelens_format.py [--saelens-venv DIR]

Writes one featurelens dictionary of every kind (relu / topk / jumprelu / batchtopk SAEs; relu, relu+skip, jumprelu,
jumprelu+skip and topk transcoders) with random weights, loads each with SAELens's `SAE.load_from_disk` in a
separate virtual environment (created on first use, as in benchmarks/train.py), and compares feature activations
and outputs on the same inputs. Then SAELens saves its own TopK, JumpReLU, standard, JumpReLU-transcoder and
skip-transcoder SAEs and featurelens loads and compares them. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import saelens_python  # noqa: E402  (the same virtual environment helper)

KINDS = {
    "relu": dict(arch="relu"), "topk": dict(arch="topk", k=8), "jumprelu": dict(arch="jumprelu"),
    "batchtopk": dict(arch="batchtopk", k=8),
    "tc_relu": dict(arch="relu", transcoder=True, d_out=24),
    "tc_relu_skip": dict(arch="relu", transcoder=True, d_out=24, skip=True),
    "tc_jumprelu": dict(arch="jumprelu", transcoder=True, d_out=24),
    "tc_jumprelu_skip": dict(arch="jumprelu", transcoder=True, d_out=24, skip=True),
    "tc_topk": dict(arch="topk", k=8, transcoder=True),
}

SAELENS_SIDE = r'''
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig
from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig, SkipTranscoder, SkipTranscoderConfig
from sae_lens.saes.sae import SAEMetadata
root = sys.argv[1]
io = load_file(f"{root}/ours.safetensors")
x = io["x"]
report = {"sae_lens": sae_lens.__version__, "read": {}}
for key in sorted(k[:-4] for k in io if k.endswith(".out")):
    sae = SAE.load_from_disk(f"{root}/{key}")
    with torch.no_grad():
        f, y = sae.encode(x), sae(x)
    report["read"][key] = [type(sae).__name__, (f - io[key + ".feats"]).abs().max().item(),
                           (y - io[key + ".out"]).abs().max().item()]
torch.manual_seed(1)
md = lambda h, o=None: SAEMetadata(hook_name=h, hook_name_out=o, model_name="gemma-3-270m")
made = {
  "sl_topk": TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=8, metadata=md("blocks.2.hook_resid_post"))),
  "sl_jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=32, d_sae=64, metadata=md("blocks.2.hook_resid_post"))),
  "sl_standard": StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=md("blocks.2.hook_resid_post"))),
  "sl_jumprelu_tc": JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=32, d_sae=64, d_out=24, apply_b_dec_to_input=False,
                                       metadata=md("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"))),
  "sl_skip_tc": SkipTranscoder(SkipTranscoderConfig(d_in=32, d_sae=64, d_out=24, apply_b_dec_to_input=False,
                               metadata=md("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"))),
}
out = {"x": x}
for name, sae in made.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(64) * 0.5)
        out[name + ".out"], out[name + ".feats"] = sae(x), sae.encode(x)
    sae.save_model(f"{root}/{name}")
save_file(out, f"{root}/theirs.safetensors")
print(json.dumps(report))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saelens-venv", default=None, help="an existing virtual environment with sae-lens installed")
    args = ap.parse_args()
    from safetensors.torch import load_file, save_file

    import featurelens as fl
    from featurelens.dictionaries import DictionaryConfig, SparseDictionary, save_dictionary

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    torch.manual_seed(0)
    x = torch.randn(50, 32)
    io = {"x": x}
    for name, kw in KINDS.items():
        hooks = (dict(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
                 if kw.get("transcoder") else dict(hook_name="blocks.1.hook_resid_post"))
        sae = SparseDictionary(DictionaryConfig(d_in=32, d_sae=64, model_name="gemma-3-270m", **hooks, **kw))
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if sae.threshold is not None:
                sae.threshold.copy_(torch.rand(64) * 0.5)
            io[f"{name}.out"], io[f"{name}.feats"] = sae(x), sae.encode(x)
        save_dictionary(sae, root / name)
    save_file(io, str(root / "ours.safetensors"))

    py = saelens_python(args)
    run = subprocess.run([str(py), "-c", SAELENS_SIDE, str(root)], capture_output=True, text=True)
    if run.returncode:
        print(run.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(run.stdout.strip().splitlines()[-1])
    ok = True
    print(f"SAELens {report['sae_lens']} reading featurelens files (max |difference| of features, outputs):")
    for name, (cls, df, dy) in report["read"].items():
        good = max(df, dy) < 1e-5
        ok &= good
        print(f"  {name:18s} -> {cls:24s} {df:.1e} {dy:.1e}  {'ok' if good else 'MISMATCH'}")
    print("featurelens reading SAELens files:")
    theirs = load_file(str(root / "theirs.safetensors"))
    for name in sorted(k[:-4] for k in theirs if k.endswith(".out")):
        sae = fl.load_dictionary(root / name)
        with torch.no_grad():
            y, f = sae.forward_with_features(theirs["x"])
        df, dy = (f - theirs[f"{name}.feats"]).abs().max().item(), (y - theirs[f"{name}.out"]).abs().max().item()
        good = max(df, dy) < 1e-5
        ok &= good
        print(f"  {name:18s} -> {sae.cfg.arch:9s}{' transcoder' if sae.cfg.transcoder else ''} {df:.1e} {dy:.1e}  "
              f"{'ok' if good else 'MISMATCH'}")
    print("all match" if ok else "MISMATCHES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
