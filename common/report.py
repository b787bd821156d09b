"""The evaluation report: results.json rendered as report.md (quality and speed tables) and the plots
(recall or overlap at k, quality against latency), each file written atomically."""

import os

from common.runtime import LoadProbe


def render_report(results):
    ks, judged = results["k"], results["judged"]
    k_small, k_large = ks[0], ks[-1]
    index = results["index"]
    lines = [
        "# Retrieval report",
        "",
        f"{results['num_queries']} queries"
        + (
            f" ({results['num_queries_scored']} scored, {results['num_queries_skipped']} skipped for having no "
            "relevant judgment)"
            if judged
            else " (no judgments: overlap with the teacher only)"
        )
        + f", {results['num_ads']} ads; teacher ad index: `{results['teacher']}`, {index}",
        "",
    ]
    level = round(100 * results["confidence_level"])
    if judged:
        header = ["model", "role", f"P@{k_small}", f"MRR@{k_small}"]
        header += [f"{name}@{k}" for k in ks for name in ("nDCG", "R")]
        header += [f"recovery nDCG@{k_small} [{level}% CI]", f"recovery R@{k_large} [{level}% CI]"]
    else:
        header = ["model", "role"]
    header += [f"overlap@{k}" for k in ks]
    lines += ["## Quality", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["models"].items():
        cells = [name, entry["role"]]
        if judged:
            m = entry["metrics"]
            cells += [number(m[f"precision@{k_small}"]), number(m[f"mrr@{k_small}"])]
            cells += [number(m[f"{key}@{k}"]) for k in ks for key in ("ndcg", "recall")]
            for key in (f"ndcg@{k_small}", f"recall@{k_large}"):
                value, interval = entry["recovery"].get(key), entry["recovery_interval"].get(key)
                cells.append(
                    "-"
                    if value is None
                    else f"{value:.1f}%" + (f" [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else "")
                )
        cells += [
            "-" if entry["overlap"].get(f"overlap@{k}") is None else f"{100 * entry['overlap'][f'overlap@{k}']:.1f}%"
            for k in ks
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Speed",
        "",
        "| model | params (M) | GFLOPs/query | p50 ms | p95 ms | p99 ms | "
        f"q/s (batch {results['throughput_batch_size']}) |",
        "|---|---|---|---|---|---|---|",
    ]
    loaded = {}  # model: cores other work kept busy while it was timed, where that was above the flag
    for name, entry in results["models"].items():
        other = entry.get("speed", {}).get("other_load_cores")
        if other is not None and other > LoadProbe.FLAG_CORES:
            loaded[name] = other
    for name, entry in results["models"].items():
        speed, flops = entry.get("speed", {}), entry.get("flops_per_query")
        lines.append(
            f"| {name}{' (loaded)' if name in loaded else ''} | {entry['parameters'] / 1e6:.1f} | "
            f"{number(flops and flops / 1e9, 3)} | "
            f"{number(speed.get('latency_p50_ms'), 2)} | {number(speed.get('latency_p95_ms'), 2)} | "
            f"{number(speed.get('latency_p99_ms'), 2)} | {number(speed.get('throughput_qps'), 0)} |"
        )
    if loaded:
        lines += [
            "",
            "**Warning: measured while the machine was busy with other work** ("
            + ", ".join(f"{name}: {cores:.1f} cores" for name, cores in loaded.items())
            + " busy besides this process, on average): these latencies and throughputs are not the models'; "
            "measure again on an idle machine.",
        ]
    lines += [
        "",
        f"Device: {results['device']}, {results['threads']} CPU threads. Latency: batch 1, tokenisation included. "
        f"Recovery: the model's metric over the teacher's, with a {level}% paired bootstrap interval over queries. "
        "overlap@k: share of the teacher's top-k the model also returns."
        + (
            f" The teacher read each query with its teacher-only context (column `{results['teacher_query_context']}`"
            "); the other models read the queries alone."
            if results.get("teacher_query_context")
            else ""
        ),
    ]
    lines += [""] + [f"![{name[:-4]}]({name})" for name in results.get("plots", [])]
    return "\n".join(lines) + "\n"


def number(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def write_plots(results, curves, output_dir):
    """recall_at_k.png (or overlap_at_k.png without judgments) and quality_vs_latency.png; names returned."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    judged = results["judged"]
    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, (ks, values) in curves.items():
        axes.plot(ks, values, marker=".", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k" if judged else "overlap@k with the teacher")
    axes.set_title("Recall at k" if judged else "Agreement with the teacher at k")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    written.append(("recall_at_k.png" if judged else "overlap_at_k.png", figure))
    quality_key = f"ndcg@{results['k'][0]}" if judged else f"overlap@{results['k'][0]}"
    points = [
        (name, entry["speed"]["latency_p50_ms"], entry["metrics" if judged else "overlap"].get(quality_key))
        for name, entry in results["models"].items()
        if entry.get("speed") and entry["metrics" if judged else "overlap"].get(quality_key) is not None
    ]
    if points:
        figure, axes = plt.subplots(figsize=(6, 4))
        for name, latency, quality in points:
            axes.scatter(latency, quality)
            axes.annotate(name, (latency, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xscale("log")
        axes.set_xlabel("latency p50 at batch 1 (ms, log scale)")
        axes.set_ylabel(quality_key)
        axes.set_title(f"Quality against latency ({results['device']})")
        axes.grid(alpha=0.3)
        written.append(("quality_vs_latency.png", figure))
    names = []
    for name, figure in written:
        figure.tight_layout()
        path = os.path.join(output_dir, name)
        figure.savefig(path + ".partial.png", dpi=120)
        os.replace(path + ".partial.png", path)
        plt.close(figure)
        names.append(name)
    return names


def write_atomic(path, text):
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".partial", path)  # an earlier report is never left half-overwritten
