#!/usr/bin/env python3
"""Turns bench_attention's JSON (--benchmark_out=FILE --benchmark_out_format=json)
into a markdown table (stdout) and a PNG plot of time vs context length per
variant (--plot FILE, needs matplotlib).

    python3 bench/report.py attention.json --plot bench/attention.png > table.md
"""
import argparse
import collections
import json
import re


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = collections.OrderedDict()  # (name, context, batch, G, D) -> {variant: run}
    variants = []
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate":
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
    return data.get("context", {}), rows, variants


def fmt_time(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} us"


def table(ctx, rows, variants):
    out = []
    bw = ctx.get("copy_bw_TBps")
    out.append(f"GPU: {ctx.get('host_name', '?')}; measured copy bandwidth {float(bw):.2f} TB/s" if bw else "")
    out.append("Time per call (all heads of the batch); in brackets the effective bandwidth "
               "(fp16-equivalent K/V bytes / time, TB/s); floor = kvcomp bytes / copy bandwidth.\n")
    head = "| context | batch | q/kv heads | head_dim | " + " | ".join(variants) + " | kvcomp floor |"
    out.append(head)
    out.append("|" + "---:|" * (4 + len(variants) + 1))
    for (name, n, batch, g, d), runs in rows.items():
        cells = []
        floor = ""
        for v in variants:
            r = runs.get(v)
            if r is None:
                cells.append("–")
                continue
            t = r["real_time"] if r.get("time_unit") == "us" else r["real_time"] / 1000.0
            cells.append(f"{fmt_time(t)} ({r.get('eff_TBps', 0):.2f})")
            if v.startswith("kvcomp") and not floor:
                floor = fmt_time(r.get("floor_us", 0))
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
    ap.add_argument("json")
    ap.add_argument("--plot")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    ctx, rows, variants = load(a.json)
    print(table(ctx, rows, variants))
    if a.plot:
        plot(rows, variants, a.plot, batch=a.batch)


if __name__ == "__main__":
    main()
