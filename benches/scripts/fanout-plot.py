#!/usr/bin/env python3
"""Fan-out latency vs subscribers, corelay and Nchan (python3 standard library only).

    python3 benches/scripts/fanout-plot.py RESULTS.jsonl OUT.svg

Reads the lines benches/scripts/fanout-nchan.sh writes (server, transport, condition, subscribers, run, loadavg,
result = corelay-load fanout's RESULT) and draws, against subscribers, the last-delivery latency p50 (solid) and
p99 (dashed), each the median over runs, one line per server × transport, in one panel per condition (quiet, with
the noisy neighbour), on a shared log scale, as a hand-made SVG. Prints the table it plotted.
"""

import json
import math
import statistics
import sys

PANEL_W, PANEL_H = 430, 400
L, R, T, B, GAP, LEGEND = 70, 20, 60, 56, 40, 210
COLORS = {("corelay-topic", "ws"): "#1f77b4", ("corelay-topic", "sse"): "#2ca02c",
          ("corelay-conv", "ws"): "#9467bd", ("corelay-conv", "sse"): "#8c564b",
          ("corelay", "ws"): "#1f77b4", ("corelay", "sse"): "#2ca02c",
          ("nchan", "ws"): "#ff7f0e", ("nchan", "sse"): "#d62728"}
NAMES = {"corelay-topic": "corelay topic", "corelay-conv": "corelay conversation", "corelay": "corelay",
         "nchan": "Nchan"}
STATS = [("last_delivery_p50_us", "p50", ""), ("last_delivery_p99_us", "p99", "6 4")]


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if "error" not in r["result"]:
                    rows.append(r)
    return rows


def medians(rows):
    """{(condition, server, transport, stat): [(subscribers, median ms)]}"""
    out = {}
    groups = {}
    for r in rows:
        k = (r["condition"], r["server"], r["transport"], r["subscribers"])
        groups.setdefault(k, []).append(r["result"])
    for (cond, server, transport, n), rs in sorted(groups.items()):
        for stat, _, _ in STATS:
            vals = [x[stat] for x in rs if x.get(stat) is not None]
            if vals:
                out.setdefault((cond, server, transport, stat), []).append((n, statistics.median(vals) / 1000))
    return out


def label(v):
    return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"


def svg(series, conditions, path):
    pts = [p for s in series.values() for p in s if p[1] > 0]
    if not pts:
        raise SystemExit("fanout-plot.py: nothing to plot")
    xs = sorted({x for x, _ in pts})
    xmax = max(xs) * 1.08
    y0 = 10 ** math.floor(math.log10(min(y for _, y in pts)))
    y1 = 10 ** math.ceil(math.log10(max(y for _, y in pts)))
    if y1 <= y0:
        y1 = y0 * 10
    ph = PANEL_H - T - B
    pw = PANEL_W - L - R
    fy = lambda y: T + ph - (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) * ph  # noqa
    W = len(conditions) * PANEL_W + (len(conditions) - 1) * GAP + LEGEND
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{PANEL_H}" viewBox="0 0 {W} {PANEL_H}" '
         f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{PANEL_H}" fill="white"/>',
         f'<text x="{L}" y="22" font-size="15" font-weight="bold">Fan-out: time until the last subscriber has a '
         f'message, corelay and Nchan</text>',
         f'<text x="{L}" y="38" font-size="11" fill="#555">one channel, 10 messages/s; p50 solid, p99 dashed; '
         f'medians over runs; log scale</text>']
    decades = range(int(round(math.log10(y0))), int(round(math.log10(y1))) + 1)
    for i, cond in enumerate(conditions):
        ox = i * (PANEL_W + GAP)
        fx = lambda x: ox + L + x / xmax * pw  # noqa
        title = "quiet" if cond == "quiet" else ("noisy neighbour (one core busy)" if cond == "noisy" else cond)
        o.append(f'<text x="{ox + L + pw / 2}" y="{T - 8}" text-anchor="middle" font-weight="bold">{esc(title)}</text>')
        for k in decades:
            for m in range(1, 10):
                y = m * 10 ** k
                if y < y0 or y > y1 or (m > 1 and k == decades[-1]):
                    continue
                o.append(f'<line x1="{ox + L}" x2="{ox + L + pw}" y1="{fy(y):.1f}" y2="{fy(y):.1f}" '
                         f'stroke="{"#d8d8d8" if m == 1 else "#f0f0f0"}"/>')
                if m == 1 or (m in (2, 5) and len(decades) <= 3):
                    o.append(f'<text x="{ox + L - 6}" y="{fy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        for x in xs:
            o.append(f'<line x1="{fx(x):.1f}" x2="{fx(x):.1f}" y1="{T}" y2="{T + ph}" stroke="#e4e4e4"/>')
            o.append(f'<text x="{fx(x):.1f}" y="{T + ph + 18}" text-anchor="middle">{label(x)}</text>')
        o.append(f'<rect x="{ox + L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        o.append(f'<text x="{ox + L + pw / 2}" y="{PANEL_H - 16}" text-anchor="middle">subscribers</text>')
        o.append(f'<text transform="translate({ox + 18} {T + ph / 2}) rotate(-90)" text-anchor="middle">'
                 f'last delivery, ms</text>')
        for (server, transport), color in COLORS.items():
            for stat, _, dash in STATS:
                p = sorted(pt for pt in series.get((cond, server, transport, stat), []) if pt[1] > 0)
                if not p:
                    continue
                d = " ".join(f"{'M' if j == 0 else 'L'}{fx(x):.1f},{fy(y):.1f}" for j, (x, y) in enumerate(p))
                da = f' stroke-dasharray="{dash}"' if dash else ""
                o.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{da}/>')
                for x, y in p:
                    if dash:
                        o.append(f'<rect x="{fx(x) - 3:.1f}" y="{fy(y) - 3:.1f}" width="6" height="6" fill="{color}"/>')
                    else:
                        o.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.5" fill="{color}"/>')
    lx = len(conditions) * PANEL_W + (len(conditions) - 1) * GAP + 10
    row = 0
    for (server, transport), color in COLORS.items():
        if not any(k[1:3] == (server, transport) for k in series):
            continue
        for stat, name, dash in STATS:
            ly = T + 10 + row * 20
            da = f' stroke-dasharray="{dash}"' if dash else ""
            o.append(f'<line x1="{lx}" x2="{lx + 26}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{da}/>')
            o.append(f'<text x="{lx + 32}" y="{ly + 4}">{esc(f"{NAMES.get(server, server)} {transport.upper()} {name}")}</text>')
            row += 1
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    rows = load(sys.argv[1])
    series = medians(rows)
    order = {"quiet": 0, "noisy": 1}
    conditions = sorted({k[0] for k in series}, key=lambda c: (order.get(c, 9), c))
    print("| condition | server | transport | subscribers | last p50 ms | last p99 ms |")
    print("|---|---|---|---|---|---|")
    for cond in conditions:
        for server, transport in COLORS:
            p50 = dict(series.get((cond, server, transport, "last_delivery_p50_us"), []))
            p99 = dict(series.get((cond, server, transport, "last_delivery_p99_us"), []))
            for n in sorted(set(p50) | set(p99)):
                f = lambda v: "–" if v is None else f"{v:,.1f}"  # noqa
                print(f"| {cond} | {server} | {transport} | {n:,} | {f(p50.get(n))} | {f(p99.get(n))} |")
    svg(series, conditions, sys.argv[2])
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
