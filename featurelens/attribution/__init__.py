"""Attribution graphs: how a prompt travels from its tokens through transcoder features to its next token.

>>> import featurelens as fl
>>> g = fl.attribute(model, transcoders, "The capital of France is")
>>> g.scores                                        # replacement and completeness of the unpruned graph
>>> fl.save_graph(g.prune(node_threshold=0.8, edge_threshold=0.98), "graphs/")
>>> fl.feature_intervention(model, transcoders, "The capital of France is", [(12, 5, 3071, 0.0)])

Modules: `replacement` (the frozen local replacement model), `attribute` (edges by batched backward passes),
`graph` (nodes, edges, pruning, scores, paths), `schema` (the graph JSON format: circuit-tracer's models),
`files` (writing and reading graph sets, feature cards), `intervene`
(feature interventions), `check` (faithfulness against the real model).
"""

from .attribute import attribute
from .check import CheckResult, FaithfulnessReport, check_graph, check_prompts
from .files import GraphFileError, load_graph, save_graph
from .graph import AttributionGraph, GraphPath, parse_feature_node_id
from .intervene import InterventionResult, feature_intervention
from .schema import GraphFormatError

__all__ = [
    "AttributionGraph", "CheckResult", "FaithfulnessReport", "GraphFileError", "GraphFormatError", "GraphPath",
    "InterventionResult", "attribute", "check_graph", "check_prompts", "feature_intervention", "load_graph",
    "parse_feature_node_id", "save_graph",
]
