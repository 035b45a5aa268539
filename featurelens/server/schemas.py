"""The JSON bodies the API accepts, with their limits (pydantic models: FastAPI checks them and describes them in
the OpenAPI document; an unknown field is refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_PROMPT_CHARS = 2000
MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 200
MAX_STRENGTH = 1000.0
MAX_FEATURES = 16
MAX_K = 100
MAX_DICTS = 16
IdStr = Field(min_length=1, max_length=400, pattern=r"^@?[A-Za-z0-9._~+=-]+$")


def _not_blank(what: str) -> AfterValidator:
    def check(v: str) -> str:
        if not v.strip():
            raise ValueError(f"the {what} is blank")
        return v

    return AfterValidator(check)


Prompt = Annotated[str, _not_blank("prompt")]
Text = Annotated[str, _not_blank("text")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureStrength(_Strict):
    feature: int = Field(ge=0, le=10_000_000, description="feature index")
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, description="steering strength (x its max activation "
                                                                              "in relative mode)")


class SteerRequest(_Strict):
    dictionary: str = IdStr
    features: list[FeatureStrength] = Field(min_length=1, max_length=MAX_FEATURES)
    prompt: Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(30, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(0, ge=0, le=2**31 - 1)
    mode: Literal["relative", "absolute"] = "relative"


class TextRequest(_Strict):
    text: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class TextSearchRequest(TextRequest):
    dictionaries: list[str] = Field(default_factory=list, max_length=MAX_DICTS,
                                    description="dictionary ids (default: every analyzed one)")
    k: int = Field(10, ge=1, le=MAX_K)
    per_token: int = Field(5, ge=1, le=20)


class LabelRequest(_Strict):
    label: str | None = Field(max_length=500, description="the new label; null removes your label")


class Subgraph(_Strict):
    name: str = Field(min_length=1, max_length=200)
    pinnedIds: list[str] = Field(default_factory=list, max_length=5000)
    supernodes: list[list[str]] = Field(default_factory=list, max_length=1000)
    clickedId: str = Field("", max_length=200)
    labels: dict[str, str] = Field(default_factory=dict)


class ScoresRequest(_Strict):
    pinnedIds: list[str] | None = Field(None, max_length=50_000)


class NodeIntervention(_Strict):
    node_id: str = Field(min_length=1, max_length=200, description="a feature node of the graph")
    value: float | None = Field(None, ge=-MAX_STRENGTH, le=MAX_STRENGTH,
                                description="the activation to set; null (or 0) ablates the feature")


class InterveneRequest(_Strict):
    interventions: list[NodeIntervention] = Field(min_length=1, max_length=64)
    transcoders: str | None = Field(None, min_length=1, max_length=400, pattern=r"^@?[A-Za-z0-9._~+=-]+$",
                                    description="dictionary id of the transcoders (default: the graph's own)")
    top_k: int = Field(10, ge=1, le=50)
    max_new_tokens: int = Field(20, ge=0, le=MAX_NEW_TOKENS)


class GraphJobRequest(_Strict):
    transcoders: str = IdStr
    prompt: Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_feature_nodes: int | None = Field(1024, ge=1, le=100_000)
    node_threshold: float = Field(0.8, gt=0.0, le=1.0)
    edge_threshold: float = Field(0.98, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    slug: str | None = Field(None, max_length=80, pattern=r"^[A-Za-z0-9._-]+$")
    target: str | None = Field(None, max_length=200, description='what to trace instead of the most likely tokens: '
                               '" Paris", several \'" Paris", " Rome"\' or a logit difference \'" Paris" - " London"\'')


class AttentionJobRequest(_Strict):
    graph: str = IdStr
    edges: int = Field(20, ge=1, le=200, description="strongest cross-position edges to explain")
    heads: int = Field(5, ge=1, le=50, description="heads kept per edge")
    top: int = Field(10, ge=1, le=100, description="QK pairs and single-side terms kept per edge")
