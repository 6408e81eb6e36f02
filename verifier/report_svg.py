"""The report's charts as inline SVG, drawn here from plain figures (no script, no fetch):
the tier mix per zone, compliance over time, the most frequent findings. Every label is
escaped: zone names and finding ids reach the page through here too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

TIER_COLOURS = {
    "affirming": "#2f9e5a",
    "warning": "#e3a008",
    "contraindicated": "#d64545",
    "none": "#9aa0a6",
}
# Lines of compliance over time, one per zone (apart from the tiers' colours).
SERIES = ("#1f6fd1", "#7b3fc4", "#0f9aa8", "#c2410c", "#4b5563", "#be185d", "#65a30d", "#0e7490")
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def zone_label(zone: str) -> str:
    return zone if zone else "(no zone)"


def tier_mix(rows: Sequence[tuple[str, Mapping[str, int]]], *, width: int = 760) -> str:
    """One stacked bar per (label, {tier: count}), with a legend."""
    left, bar_h, gap, top = 170, 22, 10, 28
    inner = width - left - 60
    height = top + len(rows) * (bar_h + gap) + 8
    out = [
        f'<svg class="chart" role="img" aria-label="tier mix per zone" viewBox="0 0 {width} '
        f'{height}" width="100%" {FONT} font-size="12">',
        _legend(TIER_COLOURS, x=left, y=12),
    ]
    for i, (label, tiers) in enumerate(rows):
        y = top + i * (bar_h + gap)
        total = sum(tiers.values())
        out.append(
            f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end" fill="#1f2937">'
            f"{_e(_clip(label, 24))}</text>"
        )
        out.append(
            f'<rect x="{left}" y="{y}" width="{inner}" height="{bar_h}" fill="#f1f3f5" rx="3"/>'
        )
        x = float(left)
        for tier, colour in TIER_COLOURS.items():
            n = tiers.get(tier, 0)
            if not n or not total:
                continue
            w = inner * n / total
            out.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                f"<title>{_e(label)}: {n} {tier}</title></rect>"
            )
            if w > 22:
                out.append(
                    f'<text x="{x + w / 2:.1f}" y="{y + bar_h / 2 + 4}" text-anchor="middle" '
                    f'fill="#fff" font-weight="600">{n}</text>'
                )
            x += w
        out.append(
            f'<text x="{left + inner + 8}" y="{y + bar_h / 2 + 4}" fill="#4b5563">{total}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _legend(colours: Mapping[str, str], *, x: float, y: float) -> str:
    parts = []
    for name, colour in colours.items():
        parts.append(
            f'<rect x="{x:.0f}" y="{y - 9}" width="11" height="11" rx="2" fill="{colour}"/>'
            f'<text x="{x + 15:.0f}" y="{y}" fill="#374151">{_e(_clip(name, 22))}</text>'
        )
        x += 30 + 7 * min(len(name), 22)
    return "".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def compliance_over_time(
    ends: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    width: int = 760,
    height: int = 260,
) -> str:
    """A line per series (0..100 %), x: the buckets' ends (first and last labelled)."""
    left, right, top, bottom = 48, 16, 34, 36
    w, h = width - left - right, height - top - bottom
    n = len(ends)
    colours = {name: SERIES[i % len(SERIES)] for i, name in enumerate(series)}
    out = [
        f'<svg class="chart" role="img" aria-label="compliance over time" viewBox="0 0 {width} '
        f'{height}" width="100%" {FONT} font-size="12">',
        _legend({zone_label(k): v for k, v in colours.items()}, x=left, y=14),
    ]
    for pct in (0, 25, 50, 75, 100):
        y = top + h - h * pct / 100
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7280">{pct}%</text>'
        )

    def x_of(i: int) -> float:
        return left + (w * i / (n - 1) if n > 1 else w / 2)

    for name, values in series.items():
        colour = colours[name]
        run: list[str] = []
        segments: list[list[str]] = [run]
        for i, value in enumerate(values):
            if value is None:
                run = []
                segments.append(run)
                continue
            run.append(f"{x_of(i):.1f},{top + h - h * value:.1f}")
        for points in segments:
            if len(points) > 1:
                out.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2.2" '
                    f'stroke-linejoin="round" points="{" ".join(points)}"/>'
                )
            for point in points if len(points) <= 60 else ():
                px, py = point.split(",")
                out.append(
                    f'<circle cx="{px}" cy="{py}" r="2.6" fill="{colour}">'
                    f"<title>{_e(zone_label(name))}</title></circle>"
                )
    if n:
        out.append(
            f'<text x="{left}" y="{height - 12}" fill="#6b7280">{_e(_short(ends[0]))}</text>'
            f'<text x="{left + w}" y="{height - 12}" text-anchor="end" fill="#6b7280">'
            f"{_e(_short(ends[-1]))}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _short(stamp: str) -> str:
    return stamp[:16].replace("T", " ") + " UTC"


def bars(items: Sequence[tuple[str, int, str]], *, width: int = 760) -> str:
    """Horizontal bars: (label, value, colour)."""
    left, bar_h, gap, top = 260, 18, 8, 6
    inner = width - left - 60
    most = max((v for _, v, _ in items), default=0) or 1
    height = top + len(items) * (bar_h + gap) + 4
    out = [
        f'<svg class="chart" role="img" aria-label="most frequent findings" viewBox="0 0 {width} '
        f'{height}" width="100%" {FONT} font-size="12">'
    ]
    for i, (label, value, colour) in enumerate(items):
        y = top + i * (bar_h + gap)
        bw = max(inner * value / most, 1.5)
        out.append(
            f'<text x="{left - 8}" y="{y + bar_h / 2 + 4}" text-anchor="end" fill="#1f2937">'
            f"{_e(_clip(label, 40))}</text>"
            f'<rect x="{left}" y="{y}" width="{bw:.1f}" height="{bar_h}" rx="3" fill="{colour}">'
            f"<title>{_e(label)}: {value}</title></rect>"
            f'<text x="{left + bw + 6:.1f}" y="{y + bar_h / 2 + 4}" fill="#374151">{value}</text>'
        )
    out.append("</svg>")
    return "".join(out)
