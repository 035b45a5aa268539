"""Attribution-graph files for the circuit explorer, on top of the library's one graph schema
(`featurelens.attribution.schema`) and graph-set writer (`featurelens.attribution.files`).

A graph file is {"metadata", "qParams", "nodes", "links"} as circuit-tracer's `frontend/graph_models.py` describes it.
Subgraphs the user saves are kept in the same file under "subgraphs" (clients that do not know the key ignore it),
and the last one saved also becomes the file's qParams, which is where circuit-tracer's and Neuronpedia's viewers
read a pinned view. What is left here is the server's own policy: how big an upload may be.
"""

from __future__ import annotations

from typing import Any

from ..attribution.schema import MAX_LINKS, MAX_NODES, check_graph


def validate_graph(g: Any) -> dict[str, Any]:
    """An uploaded (or stored) graph checked against circuit-tracer's models, with the fields older writers omit
    filled in, and at most MAX_NODES nodes and MAX_LINKS links. Raises GraphFormatError naming the first problem."""
    return check_graph(g, fill_defaults=True, max_nodes=MAX_NODES, max_links=MAX_LINKS)
