"""Our graph files as circuit-tracer's own readers see them.

circuit-tracer's viewer and Neuronpedia's upload read a graph through the pydantic models of circuit-tracer's
`frontend/graph_models.py` (Model = metadata, qParams, nodes, links) and a feature card through
`frontend/feature_models.py`. CI has no circuit-tracer (it needs transformers<=4.57.3, its own venv), so the checks
here use featurelens's one copy of those models, `featurelens.attribution.schema` (stricter than pydantic's lax
mode: exact JSON types, and links checked as circuit-tracer's `Link` although `Model.links` is only `list[dict]`),
on a graph and its cards made by `fl.attribute` on a tiny random model. Where the benchmark's circuit-tracer venv
exists (benchmarks/attribution.py builds it), a slow test also opens the same files with the real pydantic models,
and checks that the schema accepts what circuit-tracer itself writes and rejects what its models reject.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from featurelens.attribution import attribute, save_graph
from featurelens.attribution.schema import FeatureCard, GraphFormatError, Metadata, schema_errors, validate_graph
from featurelens.dictionaries.sae import DictionaryConfig, SparseDictionary, TranscoderSet
from featurelens.engine.config import ModelConfig
from featurelens.engine.hooked import HookedTransformer


def graph_errors(g: dict[str, Any]) -> list[str]:
    """The schema's verdict on a graph file: circuit-tracer's models, unique node ids, links between existing nodes
    (empty: it validates). Works on a copy: checking fills optional fields."""
    try:
        validate_graph(copy.deepcopy(g))
    except GraphFormatError as e:
        return [str(e)]
    return []


# ----------------------------------------------------------------------------------------------- a tiny graph
N_LAYERS, D, VOCAB = 3, 32, 50


class CharTokenizer:
    """Token i <-> one printable character, so token strings are real strings (with a newline among them)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join("\n" if i == 3 else chr(ord("a") + i % 26) for i in ids)


def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="gemma3", n_layers=N_LAYERS, d_model=D, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48,
                      d_vocab=VOCAB, n_ctx=64, bos_token_id=1, post_attn_norm=True, post_mlp_norm=True, qk_norm=True,
                      embed_scale=D**0.5, act_fn="gelu_tanh", rope_local_base=100.0, sliding_window=4,
                      layer_types=["sliding", "global", "sliding"])
    model = HookedTransformer(cfg, CharTokenizer(), name="tiny-gemma3")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if name.endswith(".w") else p.normal_(0, 0.2)
    return model


def tiny_transcoders(model: HookedTransformer) -> TranscoderSet:
    torch.manual_seed(1)
    out = {}
    for layer in range(N_LAYERS):
        tc = SparseDictionary(DictionaryConfig(d_in=D, d_sae=64, arch="topk", k=6, transcoder=True, skip=True,
                                               hook_name=f"blocks.{layer}.ln2.hook_normalized",
                                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model.name))
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.W_skip.normal_(0, 0.1)
        out[layer] = tc
    return TranscoderSet(out, n_layers_model=N_LAYERS)


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory) -> Path:
    model = tiny_model()
    tcs = tiny_transcoders(model)
    g = attribute(model, tcs, torch.tensor([1, 5, 7, 3, 11, 13, 2, 4, 21, 8]), progress=False)
    out = tmp_path_factory.mktemp("graphs")
    save_graph(g.prune(node_threshold=0.9, edge_threshold=0.99), out, slug="tiny", model=model, transcoders=tcs)
    return out


def _graph(graph_dir: Path) -> dict[str, Any]:
    return json.loads((graph_dir / "tiny.json").read_text())


def _cards(graph_dir: Path) -> list[Path]:
    return sorted((graph_dir / "features").rglob("*.json"))


# ----------------------------------------------------------------------------------------------- in-process checks
def test_graph_file_has_every_field_circuit_tracer_requires(graph_dir):
    g = _graph(graph_dir)
    assert graph_errors(g) == []
    kinds = {n["feature_type"] for n in g["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds  # a real graph, not an empty shell
    assert g["links"], "the pruned graph kept no links"
    for n in g["nodes"]:  # the id conventions the viewer and Neuronpedia share
        if n["feature_type"] == "cross layer transcoder":
            layer, idx, pos = (int(x) for x in n["node_id"].split("_"))
            assert (int(n["layer"]), pos) == (layer, n["ctx_idx"])
            assert n["feature"] == (layer + idx) * (layer + idx + 1) // 2 + idx  # Cantor pairing
        elif n["feature_type"] == "embedding":
            assert n["node_id"].startswith("E_") and n["layer"] == "E"
        elif n["feature_type"] == "logit":
            assert n["layer"] == str(N_LAYERS + 1)
            assert n["clerp"].startswith('Output "') and "(p=" in n["clerp"]


def test_graph_metadata_lists_the_graph(graph_dir):
    listing = json.loads((graph_dir / "graph-metadata.json").read_text())
    entry = next(m for m in listing["graphs"] if m["slug"] == "tiny")
    assert schema_errors(entry, Metadata) == []


def test_feature_cards_have_every_field_circuit_tracer_requires(graph_dir):
    g = _graph(graph_dir)
    cards = _cards(graph_dir)
    n_features = {(n["layer"], n["feature"]) for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert len(cards) >= len(n_features) > 0
    scan = g["metadata"]["scan"]
    assert scan.startswith("./")  # circuit-tracer's viewer reads local cards only for such a scan
    for p in cards:
        card = json.loads(p.read_text())
        assert schema_errors(card, FeatureCard) == [], p
        assert p == graph_dir / scan / f"{card['index']}.json"  # where the viewer fetches it: `${scan}/${index}.json`
        assert len(card["top_logits"]) > 0  # from the decoder: model and transcoders were given


MUTATIONS = {  # each breaks a rule of circuit-tracer's models (pydantic rejects every one of these too)
    "layer as a number": lambda g: g["nodes"][0].__setitem__("layer", 3),
    "feature with a fraction": lambda g: g["nodes"][0].__setitem__("feature", 1.5),
    "missing node_id": lambda g: g["nodes"][0].pop("node_id"),
    "missing feature_type": lambda g: g["nodes"][-1].pop("feature_type"),
    "ctx_idx not a number": lambda g: g["nodes"][0].__setitem__("ctx_idx", "first"),
    "prompt token ids instead of strings": lambda g: g["metadata"].__setitem__("prompt_tokens", [1, 2]),
    "missing scan": lambda g: g["metadata"].pop("scan"),
    "missing qParams.sg_pos": lambda g: g["qParams"].pop("sg_pos"),
    "supernodes flat": lambda g: g["qParams"].__setitem__("supernodes", ["a", "b"]),
    "links not objects": lambda g: g.__setitem__("links", ["a->b"]),
    "no qParams": lambda g: g.pop("qParams"),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_schema_rejects_what_circuit_tracer_rejects(graph_dir, what):
    g = copy.deepcopy(_graph(graph_dir))
    MUTATIONS[what](g)
    assert graph_errors(g), f"the schema accepted a graph with {what}"


def test_schema_rejects_broken_links_and_cards(graph_dir):
    g = copy.deepcopy(_graph(graph_dir))
    g["links"][0]["target"] = "no-such-node"
    assert any("'no-such-node' is not a node" in e for e in graph_errors(g))
    card = json.loads(_cards(graph_dir)[0].read_text())
    card["examples_quantiles"] = [{"quantile_name": "Top", "examples": [{"tokens": ["a"]}]}]
    assert any("tokens_acts_list" in e for e in schema_errors(card, FeatureCard))


# ----------------------------------------------------------------------------------------------- the real models
def _circuit_tracer_env() -> Path | None:
    """The benchmark's venv (benchmarks/attribution.py builds it in <data dir>/bench-envs/circuit-tracer), used
    read-only and only when named: $FEATURELENS_CIRCUIT_TRACER_ENV, or the data directory ($FEATURELENS_HOME) this
    test session was started with. Tests never look into the user's default data directory on their own."""
    candidates = [os.environ.get("FEATURELENS_CIRCUIT_TRACER_ENV")]
    if _STARTING_HOME:
        candidates.append(str(Path(_STARTING_HOME) / "bench-envs" / "circuit-tracer"))
    for c in candidates:
        if c and (Path(c) / ".featurelens-ready.json").is_file() and (Path(c) / "bin" / "python").exists():
            return Path(c)
    return None


_STARTING_HOME = os.environ.get("FEATURELENS_HOME")  # read at import, before the test session isolates the data dir
NO_ENV = ("circuit-tracer's venv is not named: run benchmarks/attribution.py once, then set "
          "FEATURELENS_CIRCUIT_TRACER_ENV=<data dir>/bench-envs/circuit-tracer")

VALIDATE = r'''
import json, sys
from pathlib import Path
from circuit_tracer.frontend import graph_models as gm, feature_models as fm

graph_dir = Path(sys.argv[1])
out = {}
g = gm.Model.model_validate_json((graph_dir / "tiny.json").read_text())
out["nodes"] = len(g.nodes)
out["cards"] = 0
for p in sorted((graph_dir / "features").rglob("*.json")):
    fm.Model.model_validate_json(p.read_text())
    out["cards"] += 1
rejected = {}
for name, text in json.loads((graph_dir / "mutants.json").read_text()).items():
    try:
        gm.Model.model_validate_json(text)
        rejected[name] = False
    except Exception:
        rejected[name] = True
out["rejected"] = rejected
# what circuit-tracer itself writes, through its own node factories
nodes = [gm.Node.feature_node(2, 7, 3, influence=0.5, activation=1.25), gm.Node.error_node(1, 3, influence=0.1),
         gm.Node.token_node(0, 818), gm.Node.logit_node(3, 9079, " Paris", num_layers=18, target_logit=True,
                                                         token_prob=0.4)]
m = gm.Model(metadata=gm.Metadata(slug="s", scan="x", transcoder_list=[], prompt_tokens=["a"], prompt="a"),
             qParams=gm.QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
             nodes=nodes, links=[{"source": nodes[0].node_id, "target": nodes[3].node_id, "weight": 0.5}])
out["theirs"] = json.loads(m.model_dump_json())
print(json.dumps(out))
'''


@pytest.mark.slow
def test_real_circuit_tracer_models_open_our_files(graph_dir):
    venv = _circuit_tracer_env()
    if venv is None:
        pytest.skip(NO_ENV)
    python = venv / "bin" / "python"
    mutants = {}
    for what, mutate in MUTATIONS.items():
        g = copy.deepcopy(_graph(graph_dir))
        mutate(g)
        mutants[what] = json.dumps(g)
    (graph_dir / "mutants.json").write_text(json.dumps(mutants))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([str(python), "-c", VALIDATE, str(graph_dir)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["nodes"] == len(_graph(graph_dir)["nodes"])
    assert out["cards"] == len(_cards(graph_dir)) > 0
    assert out["rejected"] == {w: True for w in MUTATIONS}, "pydantic accepted a mutant the schema rejects"
    assert graph_errors(out["theirs"]) == []  # the schema accepts circuit-tracer's own output


def test_schema_accepts_a_graph_circuit_tracer_wrote():
    """The viewer JSON the benchmark had circuit-tracer write (its create_graph_files), where one exists."""
    venv = _circuit_tracer_env()
    if venv is None:
        pytest.skip(NO_ENV)
    data_dir = venv.parent.parent  # <data dir>/bench-envs/circuit-tracer
    files = [p for p in sorted((data_dir / "bench-graphs" / "circuit-tracer").glob("*.json"))
             if p.name != "graph-metadata.json"]
    if not files:
        pytest.skip(f"no graph written by circuit-tracer in {data_dir}/bench-graphs/circuit-tracer yet "
                    "(benchmarks/attribution.py writes one)")
    g = json.loads(files[0].read_text())
    assert graph_errors(g) == []
    assert any(n["feature_type"] == "mlp reconstruction error" for n in g["nodes"])
