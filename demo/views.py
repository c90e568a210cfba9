"""What the demo draws from a :class:`~demo.report.DocumentReport`: the document
page, the gain per segment, the tokens the memory helped most and the distance
histogram. HTML pieces carry ``data-*`` attributes that the page's JavaScript
(``PAGE_JS`` and friends in ``demo/app.py``) sends back on a click.
"""

import html
from typing import Iterable, List, Optional, Sequence

import numpy as np

from demo.report import DocumentReport

TOKENS_PER_PAGE = 2000
GAIN_SCALE = 2.0  # nats of memory gain for a token's full colour


def escape(text: str) -> str:
    """HTML-escape, and neutralise the template syntax gr.HTML interprets (${...}, {{...}})."""
    return html.escape(text).replace("$", "&#36;").replace("{", "&#123;").replace("}", "&#125;")


def gain_colour(gain: float, scale: float = GAIN_SCALE) -> str:
    """Green where memory lowered the loss, red where it raised it; ``scale`` nats = full colour."""
    if not np.isfinite(gain):
        return "transparent"
    alpha = min(abs(gain) / scale, 1.0) * 0.85
    return f"rgba(34,160,70,{alpha:.2f})" if gain > 0 else f"rgba(220,50,40,{alpha:.2f})"


def page_count(num_tokens: int) -> int:
    return (num_tokens - 1) // TOKENS_PER_PAGE + 1


def page_of(index: int) -> int:
    """The page (0-based) that shows token ``index``."""
    return index // TOKENS_PER_PAGE


def render_page(report: DocumentReport, token_texts: Sequence[str], page: int, selected: Optional[int] = None,
                sources: Iterable[int] = (), target: Optional[int] = None) -> str:
    """Page ``page`` (0-based) of the document: every token a span coloured by its memory gain.

    ``selected``: the clicked token (outlined); ``sources``: tokens highlighted as the
    source of a retrieval or a search hit; ``target``: the token the view scrolls to."""
    start = page * TOKENS_PER_PAGE
    end = min(start + TOKENS_PER_PAGE, report.num_tokens)
    gain = report.memory_gain
    sources = set(sources)
    spans = []
    for index, text in zip(range(start, end), token_texts[start:end]):
        title = f"token {index}: memory gain {gain[index]:+.2f} nats" if np.isfinite(gain[index]) else f"token {index}"
        classes = "tok" + " selected" * (index == selected) + " source" * (index in sources) + " target" * (
            index == target)
        spans.append(f'<span class="{classes}" data-token="{index}" title="{title}" '
                     f'style="background:{gain_colour(gain[index])}">{escape(text)}</span>')
    return f'<div class="doc" data-page="{page}">{"".join(spans)}</div>'


def segment_gain_chart(report: DocumentReport, width: int = 640, height: int = 180) -> str:
    """An SVG bar per segment: its mean memory gain (nats/token), green above zero, red
    below. A bar is clickable (``data-segment``): the app opens the segment's page."""
    gains = np.nan_to_num(report.segment_gains())
    count = len(gains)
    top = max(float(np.abs(gains).max()), 1e-3)
    plot_height, left = height - 30, 44
    zero = 8 + plot_height / 2 if gains.min() < 0 else 8 + plot_height
    scale = (zero - 8) / top
    bar = (width - left - 4) / count
    bars = []
    for segment, gain in enumerate(gains):
        h = abs(gain) * scale
        y = zero - h if gain >= 0 else zero
        start = int(report.segment_starts[segment])
        bars.append(
            f'<rect class="seg" data-segment="{segment}" x="{left + segment * bar:.1f}" y="{y:.1f}" '
            f'width="{max(bar - 0.5, 0.8):.1f}" height="{max(h, 0.8):.1f}" '
            f'fill="{"#22a046" if gain >= 0 else "#dc3228"}"><title>segment {segment} (tokens {start:,}-): '
            f'memory gain {gain:+.3f} nats/token; click to open its page</title></rect>')
    axis = (f'<line x1="{left}" y1="{zero:.1f}" x2="{width - 4}" y2="{zero:.1f}" stroke="#666" stroke-width="0.6"/>'
            f'<text x="{left - 4}" y="14" text-anchor="end" font-size="10">{top:+.2f}</text>'
            f'<text x="{left - 4}" y="{zero + 3:.1f}" text-anchor="end" font-size="10">0</text>'
            f'<text x="{left}" y="{height - 6}" font-size="11">segment 0</text>'
            f'<text x="{width - 4}" y="{height - 6}" text-anchor="end" font-size="11">segment {count - 1}</text>')
    return (f'<div class="chart"><div class="chart-title">Memory gain per segment (loss without − with memory, '
            f'nats/token); click a bar to open its page</div>'
            f'<svg viewBox="0 0 {width} {height}" width="100%" role="img">{axis}{"".join(bars)}</svg></div>')


def token_links(report: DocumentReport, token_text, top: int = 20) -> str:
    """The token types the memory helped most, each a link (``data-type``) to its best occurrence."""
    ranked = report.token_types_helped_most(top)
    if not ranked:
        return ""
    items = [f'<li><a href="#" class="type-link" data-type="{g.token}"><code>{escape(repr(token_text(g.token)))}'
             f'</code></a> {g.total:+.1f} nats over {g.count} occurrences ({g.mean:+.2f} each)</li>' for g in ranked]
    return f'<div class="links"><b>Tokens the memory helped most</b> (click: its best occurrence)<ol>{"".join(items)}</ol></div>'


def distance_histogram(report: DocumentReport):
    """Matplotlib figure: retrieval distances, weighted by attention weight and normalised
    per log-bin width (share of the weight per decade of distance), so bins of different
    widths compare; None when nothing was retrieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distances, weights = report.retrieval_distances()
    if not distances.size or weights.sum() <= 0:
        return None
    edges = np.unique(np.geomspace(1, max(distances.max() + 1, 2), 40).astype(int))
    counts, edges = np.histogram(np.maximum(distances, 1), bins=edges, weights=weights)
    density = counts / weights.sum() / np.diff(np.log10(edges))
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.stairs(density, edges, fill=True)
    axis.set_xscale("log")
    axis.set_xlabel("distance (tokens back, log scale)")
    axis.set_ylabel("share of attention weight\nper decade of distance")
    figure.tight_layout()
    plt.close(figure)
    return figure


def prediction_rows(details) -> List[list]:
    """Rows of the clicked token's top predictions: rank, with memory (token, p), without (token, p)."""
    rows = []
    for rank, (with_memory, without) in enumerate(zip(details.predictions_with_memory,
                                                       details.predictions_without_memory)):
        rows.append([rank + 1, repr(with_memory.token), round(with_memory.probability, 4), repr(without.token),
                     round(without.probability, 4)])
    return rows
