"""Where an analysis run spends its time, per part (shown at the end of `analyze` and stored with the analysis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AnalysisTimings:
    """Seconds spent per part of an analysis run (this run only; resumed work is not counted twice)."""

    model_forward: float = 0.0
    encoding: float = 0.0
    bookkeeping: float = 0.0
    checkpointing: float = 0.0
    logit_lens: float = 0.0
    similarity: float = 0.0
    writing: float = 0.0
    labels: float = 0.0
    embedding: float = 0.0
    tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def summary(self) -> str:
        stream = self.model_forward + self.encoding + self.bookkeeping
        parts = [f"{self.tokens:,} tokens streamed"]
        if stream:
            # a forward that another analysis ran (`SharedForward`) costs this one next to nothing: a share of it
            # would read "75749%"
            share = (f" (dictionary work {(self.encoding + self.bookkeeping) / self.model_forward:.0%} of the forward)"
                     if self.model_forward >= 0.05 * stream else "")
            parts.append(f"model forward {self.model_forward:.1f}s, encoding {self.encoding:.1f}s, "
                         f"top-k bookkeeping {self.bookkeeping:.1f}s{share}")
        parts.append(f"checkpoints {self.checkpointing:.1f}s, logit lens {self.logit_lens:.1f}s, decoder similarity "
                     f"{self.similarity:.1f}s, writing {self.writing:.1f}s, labels {self.labels:.1f}s, "
                     f"embeddings {self.embedding:.1f}s")
        return "; ".join(parts)


def merge_timings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: round(a.get(k, 0) + b.get(k, 0), 3) for k in set(a) | set(b)}
