"""`FeatureDashboard`: everything known about one feature, with an HTML view (Jupyter and standalone pages) and a
terminal view (rich).

Tokens are shaded by the feature's activation relative to its maximum over the analyzed corpus, so examples from
low quantiles look pale next to the top ones; hovering a token shows its activation.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QUANTILE_NAMES = {0: "lowest quarter", 1: "second quarter", 2: "third quarter", 3: "top quarter"}


@dataclass
class TokenExample:
    """A window of tokens with the feature's activation on each; `index` is the example's token in the window."""

    tokens: list[str]
    acts: list[float]
    index: int
    act: float
    ctx: int
    pos: int
    bin: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def token(self) -> str:
        return self.tokens[self.index]


@dataclass
class FeatureDashboard:
    index: int
    d_sae: int
    model: str
    hook_name: str
    label: str | None
    label_provenance: str | None
    labels: list[dict[str, Any]]
    density: float
    n_fires: int
    n_tokens: int
    max_act: float
    mean_act: float
    hist_edges: list[float]
    hist_counts: list[int]
    logit_up: list[tuple[str, int, float]]
    logit_down: list[tuple[str, int, float]]
    similar: list[tuple[int, float, str | None]]
    cofiring: list[tuple[int, float, float, int, str | None]]
    top_examples: list[TokenExample] = field(default_factory=list)
    quantile_examples: list[TokenExample] = field(default_factory=list)
    label_score: float | None = None  # how well the current label predicts where it fires (AUROC); None: unscored
    label_score_method: str | None = None

    # ----------------------------------------------------------------- plain data
    @property
    def dead(self) -> bool:
        return self.n_fires == 0

    @property
    def label_clear(self) -> bool | None:
        """Whether the label scores well enough to be trusted (None when it has no score)."""
        from .scoring import is_clear

        return is_clear(self.label_score)

    def label_score_text(self) -> str:
        if self.label_score is None:
            return "label not scored"
        return (f"label score {self.label_score:.2f}" + ("" if self.label_clear else " (unclear)")
                + f" · {self.label_score_method}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_clear"] = self.label_clear
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __repr__(self) -> str:
        return (f"FeatureDashboard({self.index} of {self.d_sae}, {self.label!r}, density={self.density:.3g}, "
                f"max_act={self.max_act:.3g}, {len(self.top_examples)} top examples)")

    def histogram(self) -> list[tuple[float, float, int]]:
        """(low edge, high edge, count) of the nonzero activations, over the non-empty range."""
        c = self.hist_counts
        nz = [i for i, v in enumerate(c) if v]
        if not nz:
            return []
        return [(self.hist_edges[i], self.hist_edges[i + 1], int(c[i])) for i in range(nz[0], nz[-1] + 1)]

    # ----------------------------------------------------------------- HTML
    def _repr_html_(self) -> str:
        return f"<style>{_CSS}</style>" + self._html_body()

    def to_html(self, path: str | Path | None = None) -> str:
        """A standalone page (plain HTML and CSS, no scripts); written to `path` when given."""
        page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>feature {self.index} · {html.escape(self.label or '')}</title>"
                f"<style>{_CSS}</style></head><body>{self._html_body()}</body></html>\n")
        if path is not None:
            Path(path).expanduser().write_text(page, encoding="utf-8")
        return page

    def _html_body(self) -> str:
        e = html.escape
        out = ['<div class="fl-dash">']
        out.append(f'<h2>Feature {self.index} <span class="fl-muted">of {self.d_sae} · {e(self.model)} · '
                   f'{e(self.hook_name)}</span></h2>')
        lab = e(self.label) if self.label else "<i>no label</i>"
        prov = f' <span class="fl-muted">({e(self.label_provenance)})</span>' if self.label_provenance else ""
        out.append(f'<div class="fl-label">{lab}{prov}</div>')
        out.append(f'<div class="fl-muted">{e(self.label_score_text())}</div>')
        out.append('<div class="fl-stats">'
                   f'<span><b>density</b> {self.density:.4%}</span>'
                   f'<span><b>fires</b> {self.n_fires:,} of {self.n_tokens:,} tokens</span>'
                   f'<span><b>max</b> {self.max_act:.3g}</span><span><b>mean (when firing)</b> {self.mean_act:.3g}</span>'
                   '</div>')
        out.append('<div class="fl-row">')
        out.append('<div class="fl-box"><h3>Activation histogram</h3>' + self._html_hist() + '</div>')
        out.append('<div class="fl-box"><h3>Logit lens</h3>' + self._html_lens() + '</div>')
        out.append('<div class="fl-box"><h3>Similar features <span class="fl-muted">(decoder cosine)</span></h3>'
                   + _html_table(["feature", "cosine", "label"],
                                 [(str(i), f"{c:.3f}", e(l or "")) for i, c, l in self.similar]) + "</div>")
        out.append('<div class="fl-box"><h3>Fires with <span class="fl-muted">(Jaccard, P(other | this))</span></h3>'
                   + _html_table(["feature", "jaccard", "P", "label"],
                                 [(str(i), f"{j:.3f}", f"{p:.2f}", e(l or "")) for i, j, p, _, l in self.cofiring])
                   + "</div>")
        out.append("</div>")
        out.append(f"<h3>Top activations <span class=\"fl-muted\">({len(self.top_examples)} contexts)</span></h3>")
        out.append(self._html_examples(self.top_examples))
        if self.quantile_examples:
            out.append("<h3>Across activation quantiles <span class=\"fl-muted\">(uniform sample of firing tokens, "
                       "split by activation)</span></h3>")
            for b in sorted({x.bin for x in self.quantile_examples}, reverse=True):
                exs = [x for x in self.quantile_examples if x.bin == b]
                lo, hi = min(x.act for x in exs), max(x.act for x in exs)
                out.append(f'<h4>{QUANTILE_NAMES.get(b, f"bin {b}")} <span class="fl-muted">'
                           f'(activations {lo:.3g} – {hi:.3g})</span></h4>')
                out.append(self._html_examples(exs))
        out.append("</div>")
        return "".join(out)

    def _html_examples(self, exs: list[TokenExample]) -> str:
        if not exs:
            return '<p class="fl-muted">none: this feature never fired on the analyzed text</p>'
        top = self.max_act if self.max_act > 0 else 1.0
        rows = []
        for x in exs:
            spans = []
            for i, (t, a) in enumerate(zip(x.tokens, x.acts)):
                alpha = max(0.0, min(1.0, a / top))
                style = f"background:rgba(255,110,20,{alpha:.2f})" if a > 0 else ""
                cls = "fl-tok fl-key" if i == x.index else "fl-tok"
                shown = html.escape(t).replace("\n", "↵")
                spans.append(f'<span class="{cls}" style="{style}" title="{html.escape(repr(t))}: {a:.3g}">'
                             f'{shown}</span>')
            rows.append(f'<div class="fl-ex"><span class="fl-act">{x.act:.3g}</span>'
                        f'<span class="fl-text">{"".join(spans)}</span></div>')
        return "".join(rows)

    def _html_hist(self) -> str:
        bins = self.histogram()
        if not bins:
            return '<p class="fl-muted">never fired</p>'
        w, h, pad = 320, 110, 16
        peak = max(c for _, _, c in bins)
        bw = w / len(bins)
        bars = []
        for i, (lo, hi, c) in enumerate(bins):
            bh = (h - pad) * (c / peak)
            bars.append(f'<rect x="{i * bw:.1f}" y="{h - pad - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                        f'height="{bh:.1f}"><title>{lo:.3g} – {hi:.3g}: {c:,}</title></rect>')
        lo, hi = bins[0][0], bins[-1][1]
        return (f'<svg class="fl-hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}">{"".join(bars)}'
                f'<text x="0" y="{h - 2}">{lo:.3g}</text><text x="{w}" y="{h - 2}" text-anchor="end">{hi:.3g}</text>'
                f'</svg><div class="fl-muted">nonzero activations, log-spaced bins</div>')

    def _html_lens(self) -> str:
        if not self.logit_up:
            return '<p class="fl-muted">not available (the dictionary does not write to the residual stream)</p>'
        e = html.escape
        rows = []
        for i in range(max(len(self.logit_up), len(self.logit_down))):
            u = self.logit_up[i] if i < len(self.logit_up) else ("", 0, 0.0)
            d = self.logit_down[i] if i < len(self.logit_down) else ("", 0, 0.0)
            rows.append((f'<span class="fl-pos">{e(repr(u[0]))}</span>', f"{u[2]:+.3g}",
                         f'<span class="fl-neg">{e(repr(d[0]))}</span>', f"{d[2]:+.3g}"))
        return _html_table(["promotes", "", "suppresses", ""], rows)

    # ----------------------------------------------------------------- terminal
    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        head = Text()
        head.append(f"Feature {self.index}", style="bold")
        head.append(f"  of {self.d_sae} · {self.model} · {self.hook_name}\n", style="dim")
        head.append(self.label or "no label", style="bold cyan")
        if self.label_provenance:
            head.append(f"  ({self.label_provenance})", style="dim")
        head.append(f"\n{self.label_score_text()}", style="dim" if self.label_clear else "yellow")
        head.append(f"\ndensity {self.density:.4%} ({self.n_fires:,} of {self.n_tokens:,} tokens) · max "
                    f"{self.max_act:.3g} · mean when firing {self.mean_act:.3g}")
        parts: list[Any] = [head, Text(self._spark(), style="yellow")]

        side = Table.grid(padding=(0, 3))
        lens = Table(title="logit lens", show_edge=False, box=None)
        lens.add_column("promotes", style="green")
        lens.add_column("", justify="right")
        lens.add_column("suppresses", style="red")
        lens.add_column("", justify="right")
        for i in range(max(len(self.logit_up), len(self.logit_down))):
            u = self.logit_up[i] if i < len(self.logit_up) else ("", 0, 0.0)
            d = self.logit_down[i] if i < len(self.logit_down) else ("", 0, 0.0)
            lens.add_row(repr(u[0]), f"{u[2]:+.3g}", repr(d[0]), f"{d[2]:+.3g}")
        near = Table(title="similar (decoder cos) · fires with (jaccard)", show_edge=False, box=None)
        near.add_column("feat", justify="right")
        near.add_column("cos", justify="right")
        near.add_column("feat", justify="right")
        near.add_column("jacc", justify="right")
        for i in range(max(len(self.similar), len(self.cofiring))):
            s = self.similar[i] if i < len(self.similar) else None
            c = self.cofiring[i] if i < len(self.cofiring) else None
            near.add_row(str(s[0]) if s else "", f"{s[1]:.2f}" if s else "", str(c[0]) if c else "",
                         f"{c[1]:.2f}" if c else "")
        side.add_row(lens, near)
        parts.append(side)
        parts.append(Text(f"\nTop activations ({len(self.top_examples)})", style="bold"))
        parts.extend(self._rich_example(x) for x in self.top_examples)
        if self.quantile_examples:
            for b in sorted({x.bin for x in self.quantile_examples}, reverse=True):
                parts.append(Text(f"\nQuantile: {QUANTILE_NAMES.get(b, b)}", style="bold"))
                parts.extend(self._rich_example(x) for x in self.quantile_examples if x.bin == b)
        return Panel(Group(*parts), title=f"featurelens · feature {self.index}", expand=True)

    def _rich_example(self, x: TokenExample) -> Any:
        from rich.text import Text

        top = self.max_act if self.max_act > 0 else 1.0
        t = Text(f"{x.act:7.3g}  ", style="dim")
        for i, (tok, a) in enumerate(zip(x.tokens, x.acts)):
            shown = tok.replace("\n", "↵")
            alpha = max(0.0, min(1.0, a / top))
            style = ""
            if a > 0:
                r, g, b = 255, int(255 - 145 * alpha), int(255 - 235 * alpha)
                style = f"black on rgb({r},{g},{b})"
            if i == x.index:
                style = (style + " bold underline").strip()
            t.append(shown, style=style or None)
        return t

    def _spark(self) -> str:
        bins = self.histogram()
        if not bins:
            return "histogram: never fired"
        blocks = " ▁▂▃▄▅▆▇█"
        peak = max(c for _, _, c in bins)
        s = "".join(blocks[min(8, int(math.ceil(8 * c / peak)))] for _, _, c in bins)
        return f"histogram {bins[0][0]:.3g} {s} {bins[-1][1]:.3g} (log bins)"


def _html_table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    if not rows:
        return '<p class="fl-muted">none</p>'
    h = "".join(f"<th>{c}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="fl-table"><tr>{h}</tr>{body}</table>'


_CSS = """
.fl-dash{font-family:system-ui,-apple-system,Segoe UI,sans-serif;font-size:14px;color:#1d1d1f;max-width:1100px}
.fl-dash h2{margin:.2em 0;font-size:1.4em}.fl-dash h3{margin:.8em 0 .3em;font-size:1.05em}
.fl-dash h4{margin:.6em 0 .2em;font-size:.95em}
.fl-muted{color:#777;font-weight:normal;font-size:.9em}
.fl-label{font-size:1.1em;color:#0b5cad;margin:.2em 0 .5em}
.fl-stats span{margin-right:1.5em}
.fl-row{display:flex;flex-wrap:wrap;gap:18px;margin-top:.6em}
.fl-box{border:1px solid #e3e3e3;border-radius:6px;padding:6px 10px;min-width:230px}
.fl-table{border-collapse:collapse;font-size:.9em}.fl-table td,.fl-table th{padding:1px 6px;text-align:left}
.fl-pos{color:#1a7f37;font-family:ui-monospace,monospace}.fl-neg{color:#cf222e;font-family:ui-monospace,monospace}
.fl-hist rect{fill:#ff8a3d}.fl-hist text{font-size:10px;fill:#555}
.fl-ex{display:flex;gap:10px;padding:2px 0;border-bottom:1px solid #f2f2f2;align-items:baseline}
.fl-act{font-family:ui-monospace,monospace;color:#555;min-width:4.5em;text-align:right;font-size:.85em}
.fl-text{font-family:ui-monospace,monospace;font-size:.88em;white-space:pre-wrap;word-break:break-word}
.fl-tok{border-radius:2px}.fl-key{outline:1.5px solid #c2410c}
"""
