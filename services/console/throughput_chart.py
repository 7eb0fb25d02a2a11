"""A campaign's throughput over time as an inline SVG, drawn on the server (no JS, no build).

Guarantees: `throughput_series` reads only the given tenant's campaign_throughput rows (one
row per second in which recipients settled: sent, failed or skipped). `throughput_svg` is a
pure function of the series: it puts the seconds into at most MAX_BARS equal time buckets
from the first to the last second, so every settled recipient is in exactly one bar and the
bars' sum is the series' sum; the picture carries a <title> and a <desc> that say in words
what it shows, for screen readers. All text in it is escaped.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

# Bars drawn at most: beyond this the bars get thinner than a few pixels at 390 px.
MAX_BARS = 60
WIDTH, HEIGHT = 640, 200
_LEFT, _BOTTOM, _TOP = 48, 28, 12


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    seconds: int
    settled: int

    @property
    def rate(self) -> float:
        """Recipients settled per second in this bucket."""
        return self.settled / self.seconds


def throughput_series(conn: psycopg.Connection[Any], tenant_id: str,
                      campaign_id: str) -> list[tuple[datetime, int]]:
    """(second, recipients settled in it) of a campaign of the tenant, oldest first."""
    rows = conn.execute(
        "SELECT second, settled FROM campaign_throughput WHERE tenant_id = %s AND campaign_id = %s"
        " ORDER BY second", (tenant_id, campaign_id)).fetchall()
    return [(second, int(settled)) for second, settled in rows]


def buckets(series: list[tuple[datetime, int]], max_bars: int = MAX_BARS) -> list[Bucket]:
    """The series in at most `max_bars` equal buckets from its first to its last second."""
    if not series:
        return []
    first, last = series[0][0], series[-1][0]
    span = int((last - first).total_seconds()) + 1
    width = max(1, math.ceil(span / max_bars))
    count = math.ceil(span / width)
    settled = [0] * count
    for second, n in series:
        settled[int((second - first).total_seconds()) // width] += n
    return [Bucket(first + timedelta(seconds=i * width), width, s) for i, s in enumerate(settled)]


def _axis_label(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def throughput_svg(series: list[tuple[datetime, int]], chart_id: str = "throughput") -> str:
    """The chart's SVG markup ('' when nothing has settled yet)."""
    bars = buckets(series)
    if not bars:
        return ""
    peak = max(b.rate for b in bars)
    total = sum(b.settled for b in bars)
    span = bars[-1].seconds * len(bars)
    plot_w, plot_h = WIDTH - _LEFT - 8, HEIGHT - _BOTTOM - _TOP
    bar_w = plot_w / len(bars)
    start = bars[0].start.strftime("%Y-%m-%d %H:%M:%S UTC")
    desc = (f"{total} recipients settled over {_axis_label(span)} from {start}, in "
            f"{len(bars)} intervals of {bars[0].seconds} s; peak {peak:.2f} per second.")
    parts = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        f' aria-labelledby="{chart_id}-title {chart_id}-desc" data-total="{total}"'
        f' xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-title">Throughput over time (recipients settled per second)</title>',
        f'<desc id="{chart_id}-desc">{html.escape(desc)}</desc>',
        f'<line x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{WIDTH - 8}" y2="{_TOP + plot_h}" class="axis"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + plot_h}" class="axis"/>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 10}" text-anchor="end">{peak:.1f}/s</text>',
        f'<text x="{_LEFT - 4}" y="{_TOP + plot_h}" text-anchor="end">0</text>',
        f'<text x="{_LEFT}" y="{HEIGHT - 8}">0 s</text>',
        f'<text x="{WIDTH - 8}" y="{HEIGHT - 8}" text-anchor="end">{_axis_label(span)}</text>',
    ]
    for i, b in enumerate(bars):
        h = plot_h * b.rate / peak if peak else 0
        parts.append(
            f'<rect x="{_LEFT + i * bar_w + 0.5:.1f}" y="{_TOP + plot_h - h:.1f}"'
            f' width="{max(bar_w - 1, 0.5):.1f}" height="{h:.1f}" class="bar" data-settled="{b.settled}">'
            f'<title>{b.start.strftime("%H:%M:%S")}: {b.settled} in {b.seconds} s</title></rect>')
    parts.append("</svg>")
    return "".join(parts)
