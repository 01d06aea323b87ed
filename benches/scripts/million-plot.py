#!/usr/bin/env python3
"""Memory vs connections for the million-connection runs (python3 standard library only).

    python3 benches/scripts/million-plot.py [RESULTS.jsonl ...] [--out docs/plots/million.svg]

Reads the RESULT lines `benches/scripts/million.sh` appends to target/million/results.jsonl (several files may be
given; for each connection count the last line wins) and draws, against connections held: the gateway's user-space
RSS growth (all processes), the kernel's slab growth (both ends of every loopback connection), and the load
generator's RSS growth, in GiB, as a hand-made SVG. Prints the table it plotted.
"""

import argparse
import json

W, H, L, R, T, B = 720, 420, 70, 170, 30, 50


def load(paths):
    rows = {}
    for p in paths:
        try:
            lines = open(p).read().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                d = json.loads(line)
            except ValueError:
                continue
            n = d.get("connections")
            if n:
                rows[n] = d
    return [rows[n] for n in sorted(rows)]


def gib(kib):
    return None if kib is None else kib / (1024 * 1024)


def series(rows):
    out = {"gateway RSS": [], "kernel slab": [], "load generator RSS": []}
    for d in rows:
        held = d.get("tcp_inuse_delta")
        conns = held // 2 if held else d.get("connected") or d["connections"]
        rss = None
        if d.get("rss_after_kib") is not None and d.get("rss_before_kib") is not None:
            rss = d["rss_after_kib"] - d["rss_before_kib"]
        out["gateway RSS"].append((conns, gib(rss)))
        out["kernel slab"].append((conns, gib(d.get("slab_delta_kib"))))
        cl = d.get("client_rss_kib")
        out["load generator RSS"].append((conns, gib(cl) if cl else None))
    return out


def svg(ser, path):
    pts = [(x, y) for s in ser.values() for x, y in s if y is not None]
    if not pts:
        raise SystemExit("nothing to plot")
    xmax = max(x for x, _ in pts) * 1.05
    ymax = max(y for _, y in pts) * 1.1
    sx = lambda x: L + (W - L - R) * x / xmax
    sy = lambda y: H - B - (H - T - B) * y / ymax
    colors = ["#1f77b4", "#d62728", "#2ca02c"]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="18" font-size="14">Memory growth vs connections held (corelay --processes, one 2-core host)</text>',
         f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
         f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>']
    for k in range(6):
        x = xmax * k / 5
        o.append(f'<text x="{sx(x):.0f}" y="{H-B+16}" text-anchor="middle">{x/1000:.0f}k</text>')
        y = ymax * k / 5
        o.append(f'<text x="{L-6}" y="{sy(y)+4:.0f}" text-anchor="end">{y:.1f}</text>')
        o.append(f'<line x1="{L}" y1="{sy(y):.0f}" x2="{W-R}" y2="{sy(y):.0f}" stroke="#eee"/>')
    o.append(f'<text x="{(L+W-R)/2:.0f}" y="{H-12}" text-anchor="middle">connections held</text>')
    o.append(f'<text x="16" y="{(T+H-B)/2:.0f}" transform="rotate(-90 16 {(T+H-B)/2:.0f})" text-anchor="middle">GiB</text>')
    for i, (name, s) in enumerate(ser.items()):
        c = colors[i % len(colors)]
        p = [(sx(x), sy(y)) for x, y in s if y is not None]
        if len(p) > 1:
            o.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                     % (c, " ".join(f"{a:.1f},{b:.1f}" for a, b in p)))
        for a, b in p:
            o.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>')
        o.append(f'<rect x="{W-R+12}" y="{T+20*i}" width="12" height="12" fill="{c}"/>')
        o.append(f'<text x="{W-R+30}" y="{T+20*i+10}">{name}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="*", default=["target/million/results.jsonl"])
    ap.add_argument("--out", default="docs/plots/million.svg")
    a = ap.parse_args()
    rows = load(a.results)
    ser = series(rows)
    print("| connections held | gateway RSS GiB | kernel slab GiB | load generator RSS GiB |")
    print("|---|---|---|---|")
    for i in range(len(rows)):
        vals = [ser[k][i][1] for k in ser]
        print(f"| {ser['gateway RSS'][i][0]:,} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    svg(ser, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
