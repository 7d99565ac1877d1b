"""Bar charts of the benchmark results, drawn from the tables of benchmarks/RESULTS.md.

    python benchmarks/plot_results.py [--results benchmarks/RESULTS.md] [--out benchmarks/plots]
        [--dense-fwd-json F] [--dense-fwd-bwd-json F] [--decode-json F] [--cpu-json F]

Needs matplotlib (``pip install matplotlib``); no JAX, no GPU. Writes PNGs (100 dpi) to --out:

  dense_fwd.png      dense forward TFLOP/s by shape (head dim D, sequence length S, causal or not)
                     per implementation, from the section "Mosaic GPU backend against cuDNN, Triton
                     and torch FA2"
  dense_fwd_bwd.png  the same for forward + backward; shapes that section lacks are taken from the
                     section "All 16 shapes ..." (same device and day, another run) and drawn hatched
  decode.png         decode bandwidth (TB/s of K and V read) by batch and cache length per
                     implementation, from the section "Decode: ..."
  cpu.png            CPU time per call as a ratio to jax.nn's XLA attention, from the section
                     "CPU: ..."

The numbers are parsed from RESULTS.md's markdown tables (the first number of each cell; "-" or
"fails ..." draws no bar); the device, date and versions in each plot's title come from the same
section. A ``--*-json`` option draws that plot from a file a benchmark wrote with ``--json`` instead
(``bench_dense.py --phase fwd`` / ``--phase fwd_bwd``, ``bench_decode.py``, ``bench_cpu.py``), e.g.
to look at a fresh run before its table goes into RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DPI = 100

# Column names (RESULTS.md headers and the benchmarks' JSON keys, lowercased) -> plot labels.
DENSE_LABELS = {
    "flash_attn_jax (triton)": "flash_attn_jax pallas-triton",
    "flash_attn_jax pallas-triton": "flash_attn_jax pallas-triton",
    "mosaic-gpu": "flash_attn_jax mosaic-gpu",
    "flash_attn_jax mosaic-gpu": "flash_attn_jax mosaic-gpu",
    "cudnn (jax.nn)": "cuDNN (jax.nn)",
    "cudnn": "cuDNN (jax.nn)",
    "torch fa2": "torch FA2",
    "jax pallas ops mha": "JAX Pallas mha",
    "jax pallas mha": "JAX Pallas mha",
    "xla (jax.nn)": "XLA (jax.nn)",
    "xla": "XLA (jax.nn)",
}
DECODE_LABELS = {
    "flash_attn_jax": "flash_attn_jax contiguous",
    "paged 64": "flash_attn_jax paged 64",
    "flash_attn_jax paged 64": "flash_attn_jax paged 64",
    "paged 256": "flash_attn_jax paged 256",
    "flash_attn_jax paged 256": "flash_attn_jax paged 256",
    "jax pallas gqa": "JAX Pallas gqa",
    "jax pallas paged 64": "JAX Pallas paged 64",
    "xla einsum": "XLA einsum",
}
CPU_BASELINE = "jax.nn (xla)"

# Bar order and colours: this package's implementations in blues, then the peers.
STYLE = {
    "flash_attn_jax mosaic-gpu": "#0b3c8c",
    "flash_attn_jax pallas-triton": "#4a90d9",
    "flash_attn_jax (automatic)": "#1f5fbf",
    "flash_attn_jax contiguous": "#0b3c8c",
    "flash_attn_jax paged 64": "#4a90d9",
    "flash_attn_jax paged 256": "#9cc3ee",
    "flash_attn_jax xla": "#0b3c8c",
    "flash_attn_jax pallas-interpret": "#9cc3ee",
    "cuDNN (jax.nn)": "#3b3b3b",
    "torch FA2": "#f28e2b",
    "JAX Pallas mha": "#59a14f",
    "JAX Pallas gqa": "#59a14f",
    "JAX Pallas paged 64": "#a5d68f",
    "XLA (jax.nn)": "#b9b2ab",
    "XLA einsum": "#b9b2ab",
}
EXTRA_COLOURS = ["#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f"]


@dataclasses.dataclass
class Results:
    """One plot's numbers: rows of {"key": ..., "values": {label: number}, "failed": {label:
    text}, "other_run": bool}, the labels in bar order, and where they come from."""
    rows: list
    labels: list
    meta: dict
    source: str


# ---------------------------------------------------------------- RESULTS.md


def sections(text):
    """[(heading, body)] of the file's level-2 sections (their ### subsections included)."""
    found, heading, body = [], None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if heading is not None:
                found.append((heading, "\n".join(body)))
            heading, body = line[3:].strip(), []
        elif heading is not None:
            body.append(line)
    if heading is not None:
        found.append((heading, "\n".join(body)))
    return found


def find_section(text, words):
    """The first section whose heading contains ``words`` (case-insensitive)."""
    for heading, body in sections(text):
        if words.lower() in heading.lower():
            return heading, body
    raise SystemExit(f"no section with {words!r} in its heading")


def tables(body):
    """[(paragraph before it, header cells, rows of cells)] of the markdown tables in ``body``."""
    lines = body.splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$",
                                                                         lines[i + 1].strip()):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            paragraph = []
            while j >= 0 and lines[j].strip() and not lines[j].startswith("|"):
                paragraph.insert(0, lines[j].strip())
                j -= 1
            header = cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((" ".join(paragraph), header, rows))
        else:
            i += 1
    return found


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def number(cell):
    """The first number of a cell ("382 (0.77)", "**3.05**", "0.066"), or None."""
    match = re.match(r"\s*\**\s*([-+]?\d+(?:\.\d+)?)", cell)
    return float(match.group(1)) if match else None


def section_meta(heading, body):
    """Device, date, jax and torch versions as the section states them."""
    meta = {}
    for key in ("Device", "Date", "Software"):
        match = re.search(rf"^- {key}: (.+)$", body, re.M)
        if match:
            meta[key.lower()] = match.group(1).strip()
    if "device" in meta:
        meta["device"] = re.split(r"[;]", meta["device"])[0].rstrip(". ")
    else:
        match = re.search(r"(\d+ x )?NVIDIA [A-Z0-9][\w ]*|CPU \([^)]*\)", body)
        meta["device"] = match.group(0).strip() if match else "device not stated"
    match = re.search(r"\d{4}-\d{2}-\d{2}", meta.get("date", "") or body)
    meta["date"] = match.group(0) if match else "date not stated"
    text = meta.get("software", body)
    for package in ("jax", "torch"):
        match = re.search(rf"\b{package} (\d+(?:\.\d+)+)", text)
        if match:
            meta[package] = match.group(1)
    meta["section"] = heading
    return meta


def dense_label(name, body):
    """The plot label of a dense table's column; a bare "flash_attn_jax" takes the backend the
    section names for it."""
    key = name.lower().strip()
    if key == "flash_attn_jax":
        match = re.search(r'"flash_attn_jax" is the\s+`([\w-]+)`\s+backend', body)
        return f"flash_attn_jax {match.group(1)}" if match else "flash_attn_jax"
    return DENSE_LABELS.get(key, name)


def parse_cells(labels, row_cells):
    """({label: number}, {label: text}) of a table row's cells: the measured numbers, and the
    cells that name a failure ("-" and empty cells are neither)."""
    values, failed = {}, {}
    for label, cell in zip(labels, row_cells):
        value = number(cell)
        if value is not None:
            values[label] = value
        elif cell not in ("-", ""):
            failed[label] = cell
    return values, failed


def implementations_only(header, body):
    """Whether a dense table's columns after D, S, causal are implementations (with ratios to
    one another): an A/B table of code variants ("... (before)") is not drawn."""
    known = set(DENSE_LABELS.values())
    return all("/" in name or dense_label(name, body) in known for name in header[3:])


def dense_from_markdown(text, phase):
    """Dense TFLOP/s for ``phase`` ("fwd" or "fwd_bwd") from the Mosaic section's one-run table,
    completed by the "All 16 shapes" section for the shapes it lacks."""
    results = []
    for words in ("Mosaic GPU backend against cuDNN", "all 16 shapes"):
        heading, body = find_section(text, words)
        dense = [t for t in tables(body) if t[1][:3] == ["D", "S", "causal"]]
        chosen = [t for t in dense if t[0].lower().startswith("forward +") == (phase == "fwd_bwd")
                  and implementations_only(t[1], body)]
        if not chosen:
            raise SystemExit(f"no {phase} table in the section {heading!r}")
        paragraph, header, rows = chosen[0]
        # ratio columns ("x / cuDNN") are not rates: leave them out of the bars
        rates = [i for i, name in enumerate(header) if i >= 3 and "/" not in name]
        labels = [dense_label(header[i], body) for i in rates]
        parsed = []
        for row in rows:
            if not row[0].isdigit():
                continue  # the geomean row
            values, failed = parse_cells(labels, [row[i] for i in rates])
            key = (int(row[0]), int(row[1]), row[2] == "y")
            parsed.append({"key": key, "values": values, "failed": failed, "other_run": False})
        results.append((heading, body, labels, parsed, paragraph))
    ((heading, body, labels, rows, paragraph),
     (other_heading, other_body, other_labels, other_rows, _)) = results
    have = {row["key"] for row in rows}
    extra = [dict(row, other_run=True) for row in other_rows if row["key"] not in have]
    meta = section_meta(heading, body)
    dated = re.search(r"\d{4}-\d{2}-\d{2}", paragraph)
    if dated:  # a table run on another day than the section's "Date:" says its own
        meta["date"] = dated.group(0)
    source = f'benchmarks/RESULTS.md, section "{heading}"'
    if extra:
        other = section_meta(other_heading, other_body)
        missing = [label for label in labels if label not in other_labels]
        meta["other_run"] = (f'hatched: shapes the section lacks, from section "{other_heading}" '
                             f"({other['device']}, {other['date']}, another run"
                             + (f"; no {', '.join(missing)} there" if missing else "") + ")")
    if extra:
        labels += [label for label in other_labels if label not in labels]
    labels = order(labels)
    return Results(sorted(rows + extra, key=lambda r: r["key"]), labels, meta, source)


def decode_from_markdown(text):
    heading, body = find_section(text, "Decode")
    _, header, rows = next(t for t in tables(body) if t[1][:2] == ["B", "cache"])
    labels = [DECODE_LABELS.get(name.lower(), name) for name in header[2:]]
    parsed = []
    for row in rows:
        values, failed = parse_cells(labels, row[2:])
        parsed.append({"key": (int(row[0]), int(row[1])), "values": values, "failed": failed,
                       "other_run": False})
    return Results(parsed, labels, section_meta(heading, body),
                   f'benchmarks/RESULTS.md, section "{heading}"')


def cpu_from_markdown(text):
    heading, body = find_section(text, "CPU:")
    _, header, rows = next(t for t in tables(body) if t[1][:3] == ["phase", "S", "causal"])
    parsed = []
    for row in rows:
        values = {name: number(cell) for name, cell in zip(header[3:], row[3:])
                  if number(cell) is not None}
        parsed.append({"key": (row[0], int(row[1]), row[2] == "y"), "values": values,
                       "failed": {}, "other_run": False})
    return Results(parsed, header[3:], section_meta(heading, body),
                   f'benchmarks/RESULTS.md, section "{heading}"')


# ---------------------------------------------------------------- the benchmarks' JSON


def json_meta(data):
    meta = {key: data[key] for key in ("device", "date", "jax", "torch") if data.get(key)}
    return meta, data.get("command", "a benchmark's --json output")


def dense_from_json(path):
    data = json.load(open(path))
    rows, labels = [], []
    for row in data["rows"]:
        values = {}
        for name, value in row["tflops"].items():
            # The benchmark's plain "flash_attn_jax" is the package's automatic backend choice.
            label = ("flash_attn_jax (automatic)" if name == "flash_attn_jax"
                     else DENSE_LABELS.get(name.lower(), name))
            values[label] = value
            labels += [label] if label not in labels else []
        rows.append({"key": (row["D"], row["S"], row["causal"]), "values": values, "failed": {},
                     "other_run": False})
    meta, source = json_meta(data)
    return Results(sorted(rows, key=lambda r: r["key"]), order(labels), meta, source)


def decode_from_json(path):
    data = json.load(open(path))
    rows, labels = [], []
    for row in data["rows"]:
        names = list(row["tb_per_s"]) + list(row.get("errors", {}))
        for name in names:
            label = DECODE_LABELS.get(name.lower(), name)
            labels += [label] if label not in labels else []
        rows.append({"key": (row["B"], row["cache"]),
                     "values": {DECODE_LABELS.get(n.lower(), n): v
                                for n, v in row["tb_per_s"].items()},
                     "failed": {DECODE_LABELS.get(n.lower(), n): v
                                for n, v in row.get("errors", {}).items()},
                     "other_run": False})
    meta, source = json_meta(data)
    order_ = [label for label in DECODE_LABELS.values() if label in labels]
    return Results(rows, list(dict.fromkeys(order_ + labels)), meta, source)


def cpu_from_json(path):
    data = json.load(open(path))
    rows = [{"key": (row["phase"], row["S"], row["causal"]), "values": row["ms"], "failed": {},
             "other_run": False} for row in data["rows"]]
    meta, source = json_meta(data)
    return Results(rows, list(data["rows"][0]["ms"]), meta, source)


# ---------------------------------------------------------------- drawing


def order(labels):
    known = [label for label in STYLE if label in labels]
    return known + [label for label in labels if label not in STYLE]


def colours(labels):
    extra = iter(EXTRA_COLOURS * 4)
    return {label: STYLE.get(label) or next(extra) for label in labels}


def subtitle(meta, source):
    versions = ", ".join(f"{package} {meta[package]}" for package in ("jax", "torch")
                         if meta.get(package))
    return f"{meta.get('device', '?')}, {meta.get('date', '?')}, {versions}\nsource: {source}"


def seqlen_label(seqlen):
    return f"{seqlen // 1024}k" if seqlen % 1024 == 0 else str(seqlen)


def new_figure(plt, width, height, panels, ratios=None):
    fig, axes = plt.subplots(1, panels, figsize=(width, height), sharey=True, squeeze=False,
                             gridspec_kw={"width_ratios": ratios} if ratios else None)
    return fig, list(axes[0])


def finish(fig, axes, labels, colour, title, caption, path, hatched_note=None, extra_handles=(),
           panel_titles=True):
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour[label], label=label) for label in labels]
    handles += list(extra_handles)
    if hatched_note:
        handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="///",
                             label="another run (see note)"))
    height = fig.get_size_inches()[1]
    at = lambda inches: 1 - inches / height  # a height measured from the figure's top edge
    fig.suptitle(title, fontsize=13, fontweight="bold", y=at(0.08), va="top")
    fig.text(0.5, at(0.42), caption, ha="center", va="top", fontsize=9, color="#333333")
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), frameon=False,
               bbox_to_anchor=(0.5, at(0.88)), fontsize=9)
    fig.subplots_adjust(top=at(1.85 if panel_titles else 1.5))
    if hatched_note:
        fig.text(0.01, 0.01, hatched_note, ha="left", va="bottom", fontsize=8, color="#333333")
    for ax in axes:
        ax.grid(axis="y", alpha=0.35)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KiB)")


def grouped_bars(ax, groups, labels, colour, rows, value=lambda row, label: row["values"].get(label),
                 annotate=None):
    """One group of bars per row: a bar per label with a value; failures written at the base."""
    width = 0.84 / len(labels)
    for i, label in enumerate(labels):
        offset = (i - (len(labels) - 1) / 2) * width
        for j, row in enumerate(rows):
            x = j + offset
            v = value(row, label)
            if v is None:
                if label in row["failed"]:
                    ax.text(x, ax.get_ylim()[0], " fails", rotation=90, ha="center",
                            va="bottom", fontsize=8, color="#444444")
                continue
            ax.bar(x, v, width, color=colour[label], edgecolor="white" if row["other_run"] else None,
                   hatch="///" if row["other_run"] else None, linewidth=0)
            if annotate:
                ax.text(x, v, annotate(v), rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)


def plot_dense(results, phase, path):
    import matplotlib.pyplot as plt

    dims = sorted({row["key"][0] for row in results.rows})
    by_dim = {d: [row for row in results.rows if row["key"][0] == d] for d in dims}
    fig, axes = new_figure(plt, 16, 6.2, len(dims), [len(by_dim[d]) for d in dims])
    colour = colours(results.labels)
    for ax, d in zip(axes, dims):
        rows = by_dim[d]
        groups = [f"S {seqlen_label(row['key'][1])}\n{'causal' if row['key'][2] else 'non-causal'}"
                  for row in rows]
        grouped_bars(ax, groups, results.labels, colour, rows)
        ax.set_title(f"head dim {d}", fontsize=11)
        ax.tick_params(axis="x", labelsize=9)
    axes[0].set_ylabel("TFLOP/s (higher is better)")
    name = "forward" if phase == "fwd" else "forward + backward"
    title = f"Dense attention {name}, bf16, B x S = 16384 tokens, H x D = 2048"
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.14 if results.meta.get(
        "other_run") else 0.11, wspace=0.05)
    finish(fig, axes, results.labels, colour, title, subtitle(results.meta, results.source), path,
           results.meta.get("other_run"))
    plt.close(fig)


def plot_decode(results, path):
    import matplotlib.pyplot as plt

    fig, axes = new_figure(plt, 11, 5.6, 1)
    colour = colours(results.labels)
    groups = [f"batch {b}, cache {seqlen_label(n)}" for b, n in (row["key"] for row in results.rows)]
    grouped_bars(axes[0], groups, results.labels, colour, results.rows,
                 annotate=lambda v: f" {v:.2f}")
    axes[0].set_ylabel("TB/s of K and V read (higher is better)")
    top = max(v for row in results.rows for v in row["values"].values())
    axes[0].set_ylim(0, top * 1.18)
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.08)
    title = "Decode: 1 query token, 32 query heads, 8 kv heads, head dim 128, bf16"
    finish(fig, axes, results.labels, colour, title, subtitle(results.meta, results.source), path,
           panel_titles=False)
    plt.close(fig)


def plot_cpu(results, path):
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    labels = [label for label in results.labels if label != CPU_BASELINE]
    phases = list(dict.fromkeys(row["key"][0] for row in results.rows))
    fig, axes = new_figure(plt, 12, 5.4, len(phases))
    colour = colours(labels)

    def ratio(row, label):
        base, value = row["values"].get(CPU_BASELINE), row["values"].get(label)
        return value / base if value is not None and base else None

    for ax, phase in zip(axes, phases):
        rows = [row for row in results.rows if row["key"][0] == phase]
        groups = [f"S {seqlen_label(row['key'][1])}\n{'causal' if row['key'][2] else 'non-causal'}"
                  for row in rows]
        grouped_bars(ax, groups, labels, colour, rows, value=ratio,
                     annotate=lambda v: f" {v:.2f}x")
        ax.axhline(1.0, color="#3b3b3b", linewidth=1, linestyle="--")
        ax.set_yscale("log")
        ax.set_title("forward" if phase == "fwd" else "forward + backward", fontsize=11)
        ax.tick_params(axis="x", labelsize=9)
    axes[0].set_ylabel(f"time / {CPU_BASELINE}'s time (log scale; lower is faster)")
    top = max(ratio(row, label) or 0 for row in results.rows for label in labels)
    bottom = min(ratio(row, label) or 1 for row in results.rows for label in labels)
    axes[0].set_ylim(min(0.25, bottom / 1.5), max(4, top * 2.2))
    axes[0].yaxis.set_major_locator(FixedLocator([0.25, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    axes[0].yaxis.set_minor_locator(NullLocator())
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    baseline = Line2D([], [], color="#3b3b3b", linewidth=1, linestyle="--",
                      label=f"{CPU_BASELINE} = 1x")
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.11, wspace=0.05)
    title = "CPU: float32, B 1, H 8, D 64, time per call relative to jax.nn"
    finish(fig, axes, labels, colour, title, subtitle(results.meta, results.source), path,
           extra_handles=[baseline])
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--out", default=os.path.join(HERE, "plots"))
    parser.add_argument("--dense-fwd-json", help="bench_dense.py --phase fwd --json output")
    parser.add_argument("--dense-fwd-bwd-json", help="bench_dense.py --phase fwd_bwd --json output")
    parser.add_argument("--decode-json", help="bench_decode.py --json output")
    parser.add_argument("--cpu-json", help="bench_cpu.py --json output")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    text = open(args.results).read()
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)
    for phase, path in (("fwd", args.dense_fwd_json), ("fwd_bwd", args.dense_fwd_bwd_json)):
        results = dense_from_json(path) if path else dense_from_markdown(text, phase)
        plot_dense(results, phase, out(f"dense_{phase}.png"))
    plot_decode(decode_from_json(args.decode_json) if args.decode_json else
                decode_from_markdown(text), out("decode.png"))
    plot_cpu(cpu_from_json(args.cpu_json) if args.cpu_json else cpu_from_markdown(text),
             out("cpu.png"))


if __name__ == "__main__":
    main()
