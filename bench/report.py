#!/usr/bin/env python3
"""Turns bench_attention's JSON (--benchmark_out=FILE --benchmark_out_format=json),
and optionally sdpa_anchor.py's from the same session, into a markdown table
(stdout) with kvcomp / SDPA and kvcomp / best-fp16 time ratios (and one of the
multi-token / window benchmarks, BM_attention_queries), and a PNG plot
of time vs context length per variant (--plot FILE, needs matplotlib).

    python3 bench/report.py attention.json sdpa.json --plot bench/attention.png > table.md
"""
import argparse
import collections
import json
import re


def load(paths):
    rows = collections.OrderedDict()  # (name, context, batch, G, D) -> {variant: run}
    queries = collections.OrderedDict()  # (context, batch, G, D, n, window) -> {"kvcomp" | "sdpa": run}
    graphs = collections.OrderedDict()  # (context, batch, capacity, flash) -> run (BM_attention_graph)
    variants = []
    context = {}
    benchmarks = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for k, v in data.get("context", {}).items():
            context.setdefault(k, v)
        benchmarks += data["benchmarks"]
    # With --benchmark_repetitions, each row reads its median (Google Benchmark's aggregate of the same run).
    medians = {b.get("run_name"): b for b in benchmarks
               if b.get("run_type") == "aggregate" and b.get("aggregate_name") == "median"}
    for b in benchmarks:
        if b.get("run_type") == "aggregate":
            continue
        med = medians.get(b.get("run_name"))
        if med:
            b = dict(b, **{k: med[k] for k in ("real_time", "cpu_time", "eff_TBps") if k in med})
        q = re.match(r"BM_attention_queries/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)", b["name"])
        if q:  # n query tokens per sequence, optionally a window (bench_attention / sdpa_anchor.py)
            side = "sdpa" if b.get("label", "").startswith("sdpa") else "kvcomp"
            queries.setdefault(tuple(int(x) for x in q.groups()), {})[side] = b
            continue
        gr = re.match(r"BM_attention_graph/(\d+)/(\d+)/(\d+)/(\d+)/", b["name"])
        if gr:  # a decode step replayed from a CUDA graph (bench_attention)
            graphs[tuple(int(x) for x in gr.groups())] = b
            continue
        m = re.match(r"(BM_attention\w*)/(\d+)/(\d+)/(\d+)/(\d+)/(\d+)", b["name"])
        if not m:
            continue
        name, n, batch, _, g, d = m.groups()
        label = b.get("label", "?")
        key = (name, int(n), int(batch), int(g), int(d))
        rows.setdefault(key, {})[label] = b
        if label not in variants:
            variants.append(label)
    return context, rows, variants, queries, graphs


def graphs_table(graphs, rows):
    """CUDA-graph replays (G 4, head_dim 128) beside the eager calls and SDPA of the same shape."""
    if not graphs:
        return ""
    out = ["\n| context | batch | kvcomp graph (capacity = context) | kvcomp graph (capacity 128k) | kvcomp eager | "
           "flash-fp16 graph | flash-fp16 eager | SDPA |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shapes = list(dict.fromkeys((n, b) for (n, b, _, _) in graphs))
    for n, b in shapes:
        eager = rows.get(("BM_attention", n, b, 4, 128)) or rows.get(("BM_attention_sweep", n, b, 4, 128)) or {}

        def cell(r):
            return fmt_time(us_of(r)) if r else "–"

        own = graphs.get((n, b, 0, 0))
        big = next((r for (gn, gb, cap, fl), r in graphs.items() if (gn, gb, fl) == (n, b, 0) and cap > 0), None)
        out.append(f"| {n} | {b} | {cell(own)} | {cell(big)} | {cell(eager.get('kvcomp eb0.05'))} | "
                   f"{cell(graphs.get((n, b, 0, 1)))} | {cell(eager.get('flash-fp16'))} | {cell(eager.get('sdpa-fp16'))} |")
    return "\n".join(out)


def queries_table(queries):
    """n query tokens per sequence (causal) and windows: kvcomp vs SDPA from the same session."""
    if not queries:
        return ""
    out = ["\n| context | batch | q/kv heads | head_dim | queries | window | kvcomp | SDPA | kvcomp / SDPA |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, batch, g, d, nq, window), runs in queries.items():
        kv, sd = runs.get("kvcomp"), runs.get("sdpa")
        ratio = f"{us_of(kv) / us_of(sd):.2f}x" if kv and sd else "–"
        out.append(f"| {n // 1024}k | {batch} | {g} | {d} | {nq} | {window or '–'} | "
                   f"{fmt_time(us_of(kv)) if kv else '–'} | "
                   f"{fmt_time(us_of(sd)) + ' (' + sd.get('label', '') + ')' if sd else '–'} | {ratio} |")
    return "\n".join(out)


def us_of(r):
    return r["real_time"] if r.get("time_unit") == "us" else r["real_time"] / 1000.0


def fmt_time(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def table(ctx, rows, variants):
    out = []
    bw = ctx.get("copy_bw_TBps")
    out.append(f"GPU: {ctx.get('host_name', '?')}; measured copy bandwidth {float(bw):.2f} TB/s" if bw else "")
    out.append("Time per call (all heads of the batch); in brackets the effective bandwidth "
               "(fp16-equivalent K/V bytes / time, TB/s); floor = kvcomp bytes / copy bandwidth.\n")
    kv = next((v for v in variants if v.startswith("kvcomp")), None)
    fp16 = [v for v in variants if "fp16" in v]
    extra = ["kvcomp / SDPA" if "sdpa-fp16" in variants else None, "kvcomp / best fp16" if fp16 else None]
    extra = [e for e in extra if e]
    head = "| context | batch | q/kv heads | head_dim | " + " | ".join(variants + extra) + " | kvcomp floor |"
    out.append(head)
    out.append("|" + "---:|" * (4 + len(variants) + len(extra) + 1))
    for (name, n, batch, g, d), runs in rows.items():
        cells = []
        floor = ""
        for v in variants:
            r = runs.get(v)
            if r is None:
                cells.append("–")
                continue
            t = us_of(r)
            cells.append(f"{fmt_time(t)} ({r.get('eff_TBps', 0):.2f})")
            if v.startswith("kvcomp") and not floor:
                floor = fmt_time(r.get("floor_us", 0))
        if kv in runs:
            t_kv = us_of(runs[kv])
            if "kvcomp / SDPA" in extra:
                cells.append(f"{t_kv / us_of(runs['sdpa-fp16']):.2f}x" if "sdpa-fp16" in runs else "–")
            present = [us_of(runs[v]) for v in fp16 if v in runs]
            if fp16:
                cells.append(f"{t_kv / min(present):.2f}x" if present else "–")
        else:
            cells += ["–"] * len(extra)
        ctx_s = f"{n // 1024}k" if n >= 1024 else str(n)
        out.append(f"| {ctx_s} | {batch} | {g} | {d} | " + " | ".join(cells) + f" | {floor} |")
    return "\n".join(out)


def plot(rows, variants, path, batch=8, g=4, d=128):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        xs, ys = [], []
        for (name, n, b, gg, dd), runs in rows.items():
            if name == "BM_attention" and b == batch and gg == g and dd == d and v in runs:
                xs.append(n)
                ys.append(runs[v]["real_time"])
        if xs:
            ax.plot(xs, ys, marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per call (us)")
    ax.set_title(f"decode attention, batch {batch}, {8 * g} q / 8 kv heads, head_dim {d}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+", help="bench_attention JSON, then optionally sdpa_anchor.py JSON")
    ap.add_argument("--plot")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    ctx, rows, variants, queries, graphs = load(a.json)
    print(table(ctx, rows, variants))
    print(queries_table(queries))
    print(graphs_table(graphs, rows))
    if a.plot:
        plot(rows, variants, a.plot, batch=a.batch)


if __name__ == "__main__":
    main()
