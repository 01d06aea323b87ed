#!/usr/bin/env python3
"""Tables and plots for the benchmark report (python3 standard library only).

    python3 benches/scripts/plot.py [--results docs/plots/results.jsonl] [--out-dir docs/plots] [--tables FILE]

Reads the lines benches/scripts/report.sh writes (one JSON object per line: server, scenario, run, server_cmd, cmd,
loadavg, result = the load generator's RESULT object), prints markdown tables of medians (or writes them to --tables),
and writes two hand-made SVG plots into --out-dir:

* memory.svg:  server RSS growth vs idle connections (log scale), corelay ws/sse/long-poll and both baselines
* latency.svg: open-loop echo latency p50/p99/p99.9 vs offered rate, corelay and the tuned baseline

If OUT_DIR/criterion.json exists (written by report.sh from target/criterion), its medians become a table too.
"""

import argparse
import json
import math
import os
import statistics
import sys

K_KERNEL = 3.7 * 1024  # kernel bytes per idle TCP socket, measured in tuning/README.md section 4
GIB = 1024**3

SERVERS = ["corelay", "baseline-default", "baseline-tuned"]
BASELINES = ["baseline-default", "baseline-tuned"]


def load(path):
    rows, meta = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("server") == "meta":
                meta = r["result"]
            else:
                rows.append(r)
    return rows, meta


def ok(r):
    """A usable measurement: no error, and at least one connection (an idle run whose connections were all
    refused has no error field but measures nothing)."""
    res = r["result"]
    if "error" in res:
        return False
    for k in ("connected", "subscribers_connected"):
        if k in res and not res[k]:
            return False
    return True


def why(r):
    res = r["result"]
    return res.get("error") or f"nothing connected: failures {json.dumps(res.get('failures'))}"


def select(rows, server, scenario, **params):
    out = []
    for r in rows:
        if r["server"] != server or r["scenario"] != scenario or not ok(r):
            continue
        if all(r["result"].get(k) == v for k, v in params.items()):
            out.append(r)
    return out


def errors(rows):
    return [r for r in rows if not ok(r)]


def med(rs, key):
    vals = [r["result"].get(key) for r in rs]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def rng(rs, key):
    vals = [r["result"].get(key) for r in rs if r["result"].get(key) is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def main_param(rows, scenario, key):
    """The parameter value with the most runs (the side-by-side one; the others are single-run curve points)."""
    counts = {}
    for r in rows:
        if r["scenario"] == scenario and r["server"] == "corelay" and ok(r):
            v = r["result"].get(key)
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda v: (counts[v], v if v is not None else 0))


def fmt(v, digits=0, unit=""):
    if v is None:
        return "n/a"
    if isinstance(v, float) and digits == 0 and abs(v) >= 100:
        v = round(v)
    if digits == 0:
        s = f"{v:,.0f}"
    else:
        s = f"{v:,.{digits}f}"
    return s + unit


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}x"


def per_run_ratios(ca, bs, key, invert=False):
    """Ratios corelay/baseline (or baseline/corelay) paired by run number: the same-run ratios."""
    by_run = {r["run"]: r["result"].get(key) for r in bs}
    out = []
    for r in sorted(ca, key=lambda r: r["run"]):
        a, b = r["result"].get(key), by_run.get(r["run"])
        if a is None or b is None or (b if not invert else a) == 0:
            continue
        out.append(b / a if invert else a / b)
    return out


def ratio_cell(ca, bs, key, invert=False):
    """'median ratio (per-run: r1, r2, r3)'; the ratio of the medians is what the tables quote."""
    a, b = med(ca, key), med(bs, key)
    main = ratio(b, a) if invert else ratio(a, b)
    runs = per_run_ratios(ca, bs, key, invert)
    if len(runs) > 1:
        main += " (runs " + ", ".join(f"{x:.2f}" for x in runs) + ")"
    return main


def cpu_s_per_msg(r):
    res = r["result"]
    if res.get("server_cpu_ms") and res.get("received_in_window"):
        return res["received_in_window"] / (res["server_cpu_ms"] / 1000.0)
    return None


def with_derived(rs):
    for r in rs:
        r["result"]["msgs_per_cpu_s"] = cpu_s_per_msg(r)
    return rs


# --------------------------------------------------------------------------------------------------------------
# tables


def tables(rows, meta, crit):
    md = []
    p = md.append
    if meta:
        p(f"Run: {meta.get('date')}, git {meta.get('git')} (+{meta.get('git_dirty_files')} modified/untracked files), "
          f"kernel {meta.get('kernel')}, {meta.get('nproc')} CPUs ({meta.get('cpu')}), "
          f"{meta.get('mem_total_kib', 0) // 1024 // 1024} GiB, nofile {meta.get('nofile')}, somaxconn "
          f"{meta.get('somaxconn')}, load average at start {meta.get('loadavg')}"
          f"{', QUICK smoke run' if meta.get('quick') else ''}.")
        p("")
    summary = {}

    # idle memory --------------------------------------------------------------------------------------------
    n = main_param(rows, "idle_ws", "connections")
    p(f"### Idle connections: server memory at {fmt(n)} connections")
    p("")
    p("| server | transport | runs | held | RSS growth | **bytes / conn** (median) | min – max | server CPU ms/s |")
    p("|---|---|---|---|---|---|---|---|")
    idle = {}
    for server, sc in [("corelay", "idle_ws"), ("corelay", "idle_sse"), ("corelay", "idle_longpoll"),
                       ("baseline-default", "idle_ws"), ("baseline-tuned", "idle_ws")]:
        rs = select(rows, server, sc, connections=n)
        if not rs:
            continue
        idle[(server, sc)] = rs
        lo, hi = rng(rs, "bytes_per_conn")
        growth = [(r["result"]["rss_after_kib"] - r["result"]["rss_before_kib"]) / 1024 for r in rs]
        p(f"| {server} | {sc[5:]} | {len(rs)} | {fmt(med(rs, 'held_connections'))} | "
          f"{fmt(statistics.median(growth), 1)} MiB | **{fmt(med(rs, 'bytes_per_conn'))} B** | "
          f"{fmt(lo)} – {fmt(hi)} | {fmt(med(rs, 'server_cpu_ms_per_s'), 1)} |")
    c = idle.get(("corelay", "idle_ws"))
    if c:
        p("")
        for b in BASELINES:
            bs = idle.get((b, "idle_ws"))
            if bs:
                p(f"* {b} ÷ corelay, WebSocket bytes per connection: **{ratio_cell(c, bs, 'bytes_per_conn', True)}**")
        summary["U_ws"] = med(c, "bytes_per_conn")
    for sc in ("idle_sse", "idle_longpoll"):
        if ("corelay", sc) in idle:
            summary["U_" + sc[5:]] = med(idle[("corelay", sc)], "bytes_per_conn")
    for b in BASELINES:
        if (b, "idle_ws") in idle:
            summary["U_" + b] = med(idle[(b, "idle_ws")], "bytes_per_conn")
    summary["n_idle"] = n
    p("")

    # memory curve -------------------------------------------------------------------------------------------
    ns = sorted({r["result"]["connections"] for r in rows if r["scenario"].startswith("idle_") and ok(r)})
    if len(ns) > 1:
        p("### Memory vs connections (bytes per connection; the largest N is the median above, the others single runs)")
        p("")
        series = [("corelay", "idle_ws"), ("corelay", "idle_sse"), ("corelay", "idle_longpoll"),
                  ("baseline-tuned", "idle_ws"), ("baseline-default", "idle_ws")]
        p("| connections | " + " | ".join(f"{s} {sc[5:]}" for s, sc in series) + " |")
        p("|---" * (len(series) + 1) + "|")
        for k in ns:
            cells = []
            for s, sc in series:
                rs = select(rows, s, sc, connections=k)
                cells.append(fmt(med(rs, "bytes_per_conn")) + " B" if rs else "")
            p(f"| {fmt(k)} | " + " | ".join(cells) + " |")
        p("")

    # heartbeat ----------------------------------------------------------------------------------------------
    hb = select(rows, "corelay", "heartbeat")
    if hb:
        r0 = hb[0]
        summary["hb_interval"] = r0["server_cmd"].split("--heartbeat-interval ")[-1].split()[0]
        p(f"### Heartbeat CPU: {fmt(r0['result']['connections'])} idle WebSockets ({summary['hb_interval']} "
          f"heartbeat interval, held {fmt(r0['result']['hold_s'])} s), corelay only")
        p("")
        p("| runs | held | hold s | pings answered | closed | bytes / conn | server CPU ms/s | % of one core |")
        p("|---|---|---|---|---|---|---|---|")
        cpu = med(hb, "server_cpu_ms_per_s")
        p(f"| {len(hb)} | {fmt(med(hb, 'held_connections'))} | {fmt(med(hb, 'held_s'), 1)} | "
          f"{fmt(med(hb, 'pings_answered'))} | {fmt(med(hb, 'closed_during_run'))} | "
          f"{fmt(med(hb, 'bytes_per_conn'))} B | {fmt(cpu, 2)} | {fmt(cpu / 10 if cpu is not None else None, 2)} % |")
        p("")
        p("The baseline sends no pings (tungstenite only answers them), so it has no heartbeat cost to compare.")
        p("")
        summary["hb_cpu_ms_per_s"] = cpu
        summary["hb_n"] = med(hb, "held_connections")
        summary["U_hb"] = med(hb, "bytes_per_conn")

    # echo ---------------------------------------------------------------------------------------------------
    def echo_table(title, scenario, **params):
        p(title)
        p("")
        p("| server | runs | msgs/s | server CPU µs/msg | msgs per server CPU-s | p50 µs | p99 µs | p99.9 µs | lost |"
          + (" send lag p99 µs |" if scenario == "echo_open" else ""))
        p("|---|---|---|---|---|---|---|---|---|" + ("---|" if scenario == "echo_open" else ""))
        got = {}
        for s in SERVERS:
            rs = with_derived(select(rows, s, scenario, **params))
            if not rs:
                continue
            got[s] = rs
            p(f"| {s} | {len(rs)} | {fmt(med(rs, 'msgs_per_s'))} | {fmt(med(rs, 'server_cpu_us_per_msg'), 2)} | "
              f"{fmt(med(rs, 'msgs_per_cpu_s'))} | {fmt(med(rs, 'latency_p50_us'))} | {fmt(med(rs, 'latency_p99_us'))} | "
              f"{fmt(med(rs, 'latency_p999_us'))} | {fmt(med(rs, 'lost'))} |"
              + (f" {fmt(med(rs, 'send_lag_p99_us'))} |" if scenario == "echo_open" else ""))
        c = got.get("corelay")
        if c:
            p("")
            p("| corelay vs | msgs/s | msgs per server CPU-s | p99 (baseline ÷ corelay: > 1 = corelay lower) |")
            p("|---|---|---|---|")
            for b in BASELINES:
                if b in got:
                    p(f"| {b} | {ratio_cell(c, got[b], 'msgs_per_s')} | {ratio_cell(c, got[b], 'msgs_per_cpu_s')} | "
                      f"{ratio_cell(c, got[b], 'latency_p99_us', True)} |")
        p("")
        return got

    e = echo_table(f"### Echo, closed loop ({fmt(main_param(rows, 'echo_closed', 'connections'))} connections, "
                   f"{fmt(main_param(rows, 'echo_closed', 'size_bytes'))} B)", "echo_closed")
    summary["echo_closed"] = e
    rate = main_param(rows, "echo_open", "rate_target")
    e = echo_table(f"### Echo, open loop at {fmt(rate)} msgs/s", "echo_open", rate_target=rate)
    summary["echo_open"] = e

    rates = sorted({r["result"]["rate_target"] for r in rows if r["scenario"] == "echo_open" and ok(r)})
    if len(rates) > 1:
        p(f"### Open-loop latency vs offered rate (µs; {fmt(rate)} msgs/s is the median above, the others single runs)")
        p("")
        p("| offered msgs/s | server | achieved msgs/s | CPU µs/msg | p50 | p99 | p99.9 | send lag p99 |")
        p("|---|---|---|---|---|---|---|---|")
        for k in rates:
            for s in ("corelay", "baseline-tuned"):
                rs = select(rows, s, "echo_open", rate_target=k)
                if rs:
                    p(f"| {fmt(k)} | {s} | {fmt(med(rs, 'msgs_per_s'))} | {fmt(med(rs, 'server_cpu_us_per_msg'), 2)} | "
                      f"{fmt(med(rs, 'latency_p50_us'))} | {fmt(med(rs, 'latency_p99_us'))} | "
                      f"{fmt(med(rs, 'latency_p999_us'))} | {fmt(med(rs, 'send_lag_p99_us'))} |")
        p("")

    # fanout -------------------------------------------------------------------------------------------------
    fo = select(rows, "corelay", "fanout")
    if fo:
        fn = main_param(rows, "fanout", "subscribers")
        fo = select(rows, "corelay", "fanout", subscribers=fn)
        p(f"### Fan-out: one chat message to {fmt(fn)} subscribers")
        p("")
        p("| server | runs | connected | messages complete | last delivery p50 ms | last delivery p99 ms | "
          "first delivery p50 ms | deliveries/s | pacing |")
        p("|---|---|---|---|---|---|---|---|---|")
        ms = lambda v: None if v is None else v / 1000.0  # noqa: E731
        p(f"| corelay | {len(fo)} | {fmt(med(fo, 'subscribers_connected'))} | "
          f"{fmt(med(fo, 'messages_complete'))} / {fmt(med(fo, 'sent'))} | {fmt(ms(med(fo, 'last_delivery_p50_us')), 1)} | "
          f"{fmt(ms(med(fo, 'last_delivery_p99_us')), 1)} | {fmt(ms(med(fo, 'first_delivery_p50_us')), 1)} | "
          f"{fmt(med(fo, 'deliveries_per_s'))} | {fo[0]['result'].get('pacing')} |")
        summary["fanout"] = fo
        be = [r for r in rows if r["scenario"] == "fanout" and r["server"] != "corelay"]
        if be:
            msg = be[0]["result"].get("error", "ran")
            p("")
            p(f"Baseline (broadcast mode): not measured. The load generator's fan-out scenario first creates the "
              f"conversation through `POST /api/conversations` and subscribes with corelay's chat protocol; the "
              f"baseline has neither, and the attempt ends with `{msg}`.")
        p("")

    # connect storm ------------------------------------------------------------------------------------------
    sn = main_param(rows, "connect_storm", "connections")
    if sn:
        p(f"### Connect storm: {fmt(sn)} WebSocket handshakes at once")
        p("")
        p("| server | runs | connected | failed | handshakes/s | per run | handshake p50 ms | p99 ms | span s |"
          " listen-queue overflows |")
        p("|---|---|---|---|---|---|---|---|---|---|")
        got = {}
        for s in SERVERS:
            rs = select(rows, s, "connect_storm", connections=sn)
            if not rs:
                continue
            got[s] = rs
            p(f"| {s} | {len(rs)} | {fmt(med(rs, 'connected'))} | {fmt(med(rs, 'failed'))} | "
              f"{fmt(med(rs, 'handshakes_per_s'))} | "
              + ", ".join(fmt(r["result"]["handshakes_per_s"]) for r in sorted(rs, key=lambda r: r["run"]))
              + f" | {fmt(med(rs, 'handshake_p50_us') / 1000, 1)} | "
              f"{fmt(med(rs, 'handshake_p99_us') / 1000, 1)} | {fmt(med(rs, 'span_s'), 2)} | "
              + (", ".join(str(r.get("listen_overflows")) for r in sorted(rs, key=lambda r: r["run"]))
                 if all("listen_overflows" in r for r in rs) else "not recorded") + " |")
        if "corelay" in got:
            p("")
            for b in BASELINES:
                if b in got:
                    p(f"* corelay ÷ {b}, handshakes/s: **{ratio_cell(got['corelay'], got[b], 'handshakes_per_s')}**")
        summary["storm"] = got
        p("")

    # criterion ----------------------------------------------------------------------------------------------
    if crit and crit.get("benches"):
        p("### criterion micro benches (one run each; median of criterion's samples)")
        p("")
        p(f"`{crit['cmd']}`" + ("" if crit.get("ok") else " (cargo bench did not finish cleanly: partial)"))
        p("")
        p("| benchmark | median | 95% CI of the median | throughput |")
        p("|---|---|---|---|")
        for b in crit["benches"]:
            tp = ""
            t = b.get("throughput") or {}
            if "Bytes" in t:
                tp = f"{t['Bytes'] / b['median_ns'] * 1e9 / GIB:.2f} GiB/s"
            elif "BytesDecimal" in t:
                tp = f"{t['BytesDecimal'] / b['median_ns']:.2f} GB/s"
            elif "Elements" in t:
                per_s = t["Elements"] / b["median_ns"] * 1e9
                tp = f"{per_s / 1e6:,.1f} M elem/s" if per_s >= 1e6 else f"{per_s / 1e3:,.1f} k elem/s"
            p(f"| `{b['id']}` | {dur(b['median_ns'])} | {dur(b['median_lo_ns'])} – {dur(b['median_hi_ns'])} | {tp} |")
        p("")

    # targets ------------------------------------------------------------------------------------------------
    p("### Targets")
    p("")
    p("| target | measured (median) | met? |")
    p("|---|---|---|")

    def row(name, val, met):
        p(f"| {name} | {val} | {'n/a' if met is None else ('**met**' if met else '**not met**')} |")

    u = summary.get("U_ws")
    row(f"idle WebSocket ≤ 1 KiB per connection at {fmt(n)} (aim 512 B)",
        f"{fmt(u)} B" if u else "n/a", None if u is None else u <= 1024)
    if u is not None:
        row("… aim: ≤ 512 B", f"{fmt(u)} B", u <= 512)
    for t in ("sse", "longpoll"):
        v = summary.get("U_idle_" + t) or summary.get("U_" + t)
        row(f"idle {'SSE' if t == 'sse' else 'held long poll'} ≤ 2 KiB per connection", f"{fmt(v)} B" if v else "n/a",
            None if v is None else v <= 2048)
    cpu = summary.get("hb_cpu_ms_per_s")
    row(f"heartbeat CPU < 1% of one core ({fmt(summary.get('hb_n'))} idle, {summary.get('hb_interval')} interval)",
        f"{fmt(cpu, 2)} ms/s = {fmt(cpu / 10, 2)} %" if cpu is not None else "n/a", None if cpu is None else cpu < 10)
    for sc, label in (("echo_closed", "closed loop"), ("echo_open", f"open loop {fmt(rate)}/s")):
        g = summary.get(sc) or {}
        c = g.get("corelay")
        t = g.get("baseline-tuned")
        if c:
            us = med(c, "server_cpu_us_per_msg")
            row(f"echo ≤ 2 µs server CPU per message ({label})", f"{fmt(us, 2)} µs", us <= 2)
        if c and t:
            a, b = med(c, "msgs_per_cpu_s"), med(t, "msgs_per_cpu_s")
            row(f"echo ≥ 2x the tuned baseline's msgs per server CPU-s ({label})",
                f"{fmt(a)} vs {fmt(b)} = {ratio(a, b)}", a >= 2 * b)
            a, b = med(c, "latency_p99_us"), med(t, "latency_p99_us")
            row(f"echo p99 lower than the tuned baseline's ({label})", f"{fmt(a)} µs vs {fmt(b)} µs", a < b)
    st = (summary.get("storm") or {}).get("corelay")
    if st:
        v = med(st, "handshakes_per_s")
        row(f"connect storm ≥ 20,000 handshakes/s (N = {fmt(sn)})", f"{fmt(v)} /s", v >= 20000)
    p("")

    # C1M ----------------------------------------------------------------------------------------------------
    if u is not None:
        p("### C1M on paper: 1,000,000 connections on 16 cores / 64 GiB")
        p("")
        p(f"Memory = N × (K + U) + B + R with K ≈ 3.7 KiB kernel per idle socket (tuning/README.md §4), U the user-space "
          f"bytes per connection measured above at {fmt(n)} connections, B ≤ 8 GiB burst buffers (`tcp_mem` pressure), "
          "R ≈ 2 GiB OS and the rest.")
        p("")
        p("| server | U (measured) | N × (K + U) | + B + R | fits 64 GiB? | connections that fit (64 − 10 GiB) |")
        p("|---|---|---|---|---|---|")
        for label, key in (("corelay, WebSocket", "U_ws"), ("corelay, SSE", "U_sse"),
                           ("corelay, held long poll", "U_longpoll"),
                           ("baseline `--read-buffer 4096`", "U_baseline-tuned"),
                           ("baseline, defaults", "U_baseline-default")):
            uu = summary.get(key)
            if uu is None:
                continue
            base = 1e6 * (K_KERNEL + uu) / GIB
            total = base + 10
            fit = 54 * GIB / (K_KERNEL + uu)
            p(f"| {label} | {fmt(uu)} B | {base:.1f} GiB | {total:.1f} GiB | {'yes' if total <= 64 else '**no**'} | "
              f"{fmt(min(fit, 1e9))} |")
        p("")
        if cpu is not None and summary.get("hb_n"):
            per_conn_ms = cpu / summary["hb_n"]
            cores = per_conn_ms * 1e6 / 1000
            p(f"CPU, heartbeats: {fmt(cpu, 2)} ms/s for {fmt(summary['hb_n'])} connections at a "
              f"{summary.get('hb_interval')} interval = "
              f"{per_conn_ms * 1000:.3f} µs/s per connection → 1,000,000 connections: **{cores:.2f} cores** "
              f"({cores / 16 * 100:.1f} % of 16 cores). The 10 ms tick resolution of `/proc/PID/stat` makes this a "
              f"coarse figure.")
            p("")
        g = (summary.get("echo_closed") or {}).get("corelay")
        if g:
            us = med(g, "server_cpu_us_per_msg")
            p(f"CPU, traffic: {fmt(us, 2)} µs of server CPU per echoed 64 B message (closed loop) → 16 cores sustain "
              f"about **{fmt(16e6 / us)} echoed messages/s** (≈ {fmt(16e6 / us / 1e6 * 60, 1)} messages per connection "
              f"per minute at 1M connections), before the kernel's share of a real NIC.")
            p("")
    return "\n".join(md) + "\n", summary


def dur(ns):
    if ns is None:
        return "n/a"
    if ns < 1e3:
        return f"{ns:.1f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.2f} µs"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


# --------------------------------------------------------------------------------------------------------------
# SVG


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_step(span, target=6):
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def num_label(v):
    if v >= 1000:
        return f"{v / 1000:g}k"
    if v >= 1:
        return f"{v:g}"
    return f"{v:g}"


def chart(series, title, xlabel, ylabel, ylog=True, xmax=None, yfmt=num_label, note=None):
    """series: [{name, color, dash, points: [(x, y)], marker}] -> SVG text. x linear from 0, y log10 or linear."""
    W, H = 940, 480
    L, R, T, B = 80, 330, 50, 62
    pw, ph = W - L - R, H - T - B
    pts = [pt for s in series for pt in s["points"] if pt[1] is not None and pt[1] > 0]
    if not pts:
        return None
    xm = xmax or max(x for x, _ in pts)
    xstep = nice_step(xm)
    xm = math.ceil(xm / xstep) * xstep
    ys = [y for _, y in pts]
    if ylog:
        y0 = 10 ** math.floor(math.log10(min(ys)))
        y1 = 10 ** math.ceil(math.log10(max(ys)))
        if y1 == y0:
            y1 *= 10
        fy = lambda y: T + ph - (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) * ph  # noqa
        yticks = [10 ** k for k in range(int(round(math.log10(y0))), int(round(math.log10(y1))) + 1)]
        minor = [m * t for t in yticks[:-1] for m in range(2, 10)]
    else:
        y0, ystep = 0, nice_step(max(ys))
        y1 = math.ceil(max(ys) / ystep) * ystep
        fy = lambda y: T + ph - (y - y0) / (y1 - y0) * ph  # noqa
        yticks = [i * ystep for i in range(int(y1 / ystep) + 1)]
        minor = []
    fx = lambda x: L + x / xm * pw  # noqa
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="24" font-size="15" font-weight="bold">{esc(title)}</text>']
    if note:
        o.append(f'<text x="{L}" y="40" font-size="11" fill="#555">{esc(note)}</text>')
    for y in minor:
        o.append(f'<line x1="{L}" x2="{L + pw}" y1="{fy(y):.1f}" y2="{fy(y):.1f}" stroke="#f0f0f0"/>')
    for y in yticks:
        o.append(f'<line x1="{L}" x2="{L + pw}" y1="{fy(y):.1f}" y2="{fy(y):.1f}" stroke="#d8d8d8"/>')
        o.append(f'<text x="{L - 6}" y="{fy(y) + 4:.1f}" text-anchor="end">{esc(yfmt(y))}</text>')
    x = 0.0
    while x <= xm + 1e-9:
        o.append(f'<line x1="{fx(x):.1f}" x2="{fx(x):.1f}" y1="{T}" y2="{T + ph}" stroke="#e4e4e4"/>')
        o.append(f'<text x="{fx(x):.1f}" y="{T + ph + 18}" text-anchor="middle">{esc(num_label(x))}</text>')
        x += xstep
    o.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    o.append(f'<text x="{L + pw / 2}" y="{H - 16}" text-anchor="middle">{esc(xlabel)}</text>')
    o.append(f'<text transform="translate(18 {T + ph / 2}) rotate(-90)" text-anchor="middle">{esc(ylabel)}</text>')
    for i, s in enumerate(series):
        ptsv = sorted(pt for pt in s["points"] if pt[1] is not None and pt[1] > 0)
        if not ptsv:
            continue
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        path = " ".join(f"{'M' if j == 0 else 'L'}{fx(px):.1f},{fy(py):.1f}" for j, (px, py) in enumerate(ptsv))
        o.append(f'<path d="{path}" fill="none" stroke="{s["color"]}" stroke-width="2"{dash}/>')
        for px, py in ptsv:
            if s.get("marker", "circle") == "square":
                o.append(f'<rect x="{fx(px) - 3.5:.1f}" y="{fy(py) - 3.5:.1f}" width="7" height="7" fill="{s["color"]}"/>')
            else:
                o.append(f'<circle cx="{fx(px):.1f}" cy="{fy(py):.1f}" r="3.5" fill="{s["color"]}"/>')
        ly = T + 10 + i * 20
        lx = L + pw + 16
        o.append(f'<line x1="{lx}" x2="{lx + 26}" y1="{ly}" y2="{ly}" stroke="{s["color"]}" stroke-width="2"{dash}/>')
        o.append(f'<text x="{lx + 32}" y="{ly + 4}">{esc(s["name"])}</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def memory_svg(rows):
    specs = [("corelay", "idle_ws", "corelay WebSocket", "#1f77b4", "", "circle"),
             ("corelay", "idle_sse", "corelay SSE", "#2ca02c", "6 3", "circle"),
             ("corelay", "idle_longpoll", "corelay long poll", "#9467bd", "2 3", "circle"),
             ("baseline-tuned", "idle_ws", "baseline --read-buffer 4096", "#ff7f0e", "", "square"),
             ("baseline-default", "idle_ws", "baseline defaults", "#d62728", "", "square")]
    series = []
    for server, sc, name, color, dash, marker in specs:
        ns = sorted({r["result"]["connections"] for r in select(rows, server, sc)})
        pts = []
        per = None
        for k in ns:
            rs = select(rows, server, sc, connections=k)
            g = [(r["result"]["rss_after_kib"] - r["result"]["rss_before_kib"]) / 1024 for r in rs]
            pts.append((k, statistics.median(g)))
            per = med(rs, "bytes_per_conn")
        if pts:
            series.append({"name": f"{name} ({fmt(per)} B/conn)", "color": color, "dash": dash, "marker": marker,
                           "points": pts})
    return chart(series, "Server RSS growth vs idle connections", "idle connections",
                 "RSS growth (MiB, log scale)", ylog=True,
                 note="median of the runs at the largest N, single runs below it; B/conn at the largest N")


def latency_svg(rows):
    series = []
    for server, color, marker in (("corelay", "#1f77b4", "circle"), ("baseline-tuned", "#ff7f0e", "square")):
        rates = sorted({r["result"]["rate_target"] for r in select(rows, server, "echo_open")})
        for key, lab, dash in (("latency_p50_us", "p50", ""), ("latency_p99_us", "p99", "7 3"),
                               ("latency_p999_us", "p99.9", "2 3")):
            pts = [(k, med(select(rows, server, "echo_open", rate_target=k), key)) for k in rates]
            if pts:
                name = "corelay" if server == "corelay" else "baseline tuned"
                series.append({"name": f"{name} {lab}", "color": color, "dash": dash, "marker": marker, "points": pts})

    def us(v):
        return f"{v / 1000:g} ms" if v >= 1000 else f"{v:g} µs"

    return chart(series, "Open-loop echo latency vs offered rate (100 conns, 64 B)", "offered rate (msgs/s)",
                 "latency from intended send (log scale)", ylog=True, yfmt=us,
                 note="2 shared cores: the load generator runs on the same cores as the server")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/plots/results.jsonl")
    ap.add_argument("--out-dir", default=None, help="where the SVGs go (default: next to --results)")
    ap.add_argument("--tables", default=None, help="write the markdown tables here instead of stdout")
    a = ap.parse_args()
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.results))
    rows, meta = load(a.results)
    crit_path = os.path.join(out_dir, "criterion.json")
    crit = json.load(open(crit_path)) if os.path.exists(crit_path) else None
    text, _ = tables(rows, meta, crit)
    # the baseline fan-out attempt is expected to fail; the fan-out table explains it
    bad = [r for r in errors(rows) if not (r["scenario"] == "fanout" and r["server"] != "corelay")]
    if bad:
        text += "### Failed or skipped measurements\n\n"
        for r in bad:
            text += f"* {r['server']} {r['scenario']} run {r['run']}: `{why(r)}`\n"
        text += "\n"
    if a.tables:
        with open(a.tables, "w") as f:
            f.write(text)
        print(f"tables -> {a.tables}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for name, svg in (("memory.svg", memory_svg(rows)), ("latency.svg", latency_svg(rows))):
        if svg:
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(svg)
            print(f"plot -> {os.path.join(out_dir, name)}", file=sys.stderr)


if __name__ == "__main__":
    main()
