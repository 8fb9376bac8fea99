"""Plots of the recorded benchmark results (bench/results/*.json, the `--json` output of the
`sinklora bench` commands) into bench/plots/*.png. Needs matplotlib.

    python bench/plot_results.py [--results bench/results] [--out bench/plots]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER_RECOVERY = {"sf": 0.92, "s2": 0.39}  # SinkLoRA's LLaMA-2 7B figures


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("plot_results.py needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _device(config: dict) -> str:
    name = config.get("device_name", config.get("device", "?"))
    return f"{name} ({config['threads']} threads)" if name == "cpu" and "threads" in config else name


def _model(name: str) -> str:
    return "SmolLM2-135M" if name == "default" else name


def _same_experiment(config: dict) -> tuple:
    """What makes extension runs repeats of one experiment: everything but the seed."""
    return tuple(sorted((k, json.dumps(v)) for k, v in config.items() if k not in ("seed", "torch")))


def plot_extension(results: list[dict], out: Path, plt) -> Path:
    """Recovery per pattern: the mean over the runs (seeds) as bars, each run as a dot."""
    c = results[0]["config"]
    names = [r["pattern"] for r in results[0]["rows"]]
    runs = [{r["pattern"]: r for r in result["rows"]} for result in results]
    mean = {n: sum(run[n]["recovery"] for run in runs) / len(runs) for n in names}
    mean_ppl = {n: sum(run[n]["ppl"] for run in runs) / len(runs) for n in names}
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    bars = ax.bar(names, [100 * mean[n] for n in names], color=["#777"] + ["#2a7ab9"] * (len(names) - 1))
    if len(runs) > 1:
        for x, n in enumerate(names):
            ax.scatter([x] * len(runs), [100 * run[n]["recovery"] for run in runs], color="black", s=8, zorder=3,
                       label=f"each of {len(runs)} seeds" if x == 0 else None)
    for bar, n in zip(bars, names):
        top = max(100 * run[n]["recovery"] for run in runs)
        ax.annotate(f"{100 * mean[n]:.0f}%\nppl {mean_ppl[n]:.2f}", (bar.get_x() + bar.get_width() / 2, top),
                    ha="center", va="bottom", fontsize=8)
    for pattern, value in PAPER_RECOVERY.items():
        if pattern in names:
            x = names.index(pattern)
            ax.plot([x - 0.4, x + 0.4], [100 * value] * 2, color="#d62728", lw=2,
                    label="SinkLoRA paper (LLaMA-2 7B)" if pattern == "sf" else None)
    ax.set_ylabel("recovery of full fine-tuning's gain (%)")
    ax.set_ylim(0, 130)
    seeds = "seed " + str(c["seed"]) if len(runs) == 1 else f"mean of {len(runs)} seeds"
    ax.set_title(f"{_model(c['model'])}: context {c['original_context']}→{c['context']}, {c['steps']} LoRA+ steps "
                 f"per pattern, {seeds}\n(no fine-tuning: ppl {results[0]['base_ppl']:.2f}; eval with full attention "
                 "on held-out text)", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = out / f"extension_recovery_{c['original_context']}_{c['context']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_rows(result: dict, key: str, label: str, title: str, path: Path, plt) -> Path:
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.6))
    names = [r["method"] for r in rows]
    values = [r[key] for r in rows]
    colors = ["#2a7ab9" if n.startswith(("paged", "sinklora")) else "#999" for n in names]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for bar, v in zip(bars, values[::-1]):
        ax.annotate(f"{v:.1f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8,
                    xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.18)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_msa_conv(result: dict, path: Path, plt) -> Path:
    """Forward and forward+backward ms per problem, one bar per method (log scale); methods not run
    on a problem (not installed, no backward on the device, skipped for memory) have no bar."""
    c, rows = result["config"], result["rows"]
    problems = list(dict.fromkeys((r["batch"], r["size"], r["dilation"]) for r in rows))
    methods = list(dict.fromkeys((r["method"], r["padding"]) for r in rows))
    by_key = {(r["batch"], r["size"], r["dilation"], r["method"], r["padding"]): r for r in rows}
    colors = {"sinklora_ext": "#2a7ab9", "unfold (released layer)": "#999", "FlexAttention (compiled)": "#e0a030",
              "NATTEN na2d": "#6a9f58"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    width = 0.8 / len(methods)
    for ax, key, label in zip(axes, ("fwd_ms", "fwdbwd_ms"), ("forward", "forward + backward")):
        for m, (method, padding) in enumerate(methods):
            xs, ys = [], []
            for x, (batch, size, dilation) in enumerate(problems):
                row = by_key.get((batch, size, dilation, method, padding))
                if row is not None and row[key] is not None:
                    xs.append(x - 0.4 + width * (m + 0.5))
                    ys.append(row[key])
            if not ys:
                continue
            hatch = "//" if padding == "clamp" and method == "sinklora_ext" else None
            ax.bar(xs, ys, width, color=colors.get(method, "#555"), hatch=hatch, edgecolor="white",
                   label=f"{method} ({padding})")
        ax.set_yscale("log")
        ax.set_xticks(range(len(problems)), [f"B={b}\n{s}x{s}, d={d}" for b, s, d in problems], fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("ms (log scale, lower is better)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    cpu_note = " (Flex and NATTEN: forward only on the CPU)" if c["device"] == "cpu" else ""
    fig.suptitle(f"MSA-Conv on {_device(c)}, {c['dtype']}, {c['heads']} heads, D={c['head_dim']}, "
                 f"K={c['kernel_size']}{cpu_note}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tic(result: dict, path: Path, plt) -> Path:
    """Test accuracy against test resolution, one line per variant (mean over the seeds, the spread
    as error bars); the training resolution marked."""
    c = result["config"]
    resolutions = [str(r) for r in c["test_resolutions"]]
    fig, ax = plt.subplots(figsize=(9, 4.4))
    for row in result["rows"]:
        fixed = row.get("windows") == "fixed"
        ax.errorbar([int(r) for r in resolutions], [100 * row["accuracy"][r] for r in resolutions],
                    yerr=[100 * row["accuracy_std"][r] for r in resolutions], marker="o", ms=4, capsize=3,
                    lw=2.4 if row["variant"] == "tic-plain" else 1.3, alpha=0.55 if fixed else 1.0,
                    ls=":" if fixed else "-" if row["variant"].startswith("tic") else "--",
                    label=f"{row['variant']} ({row['params'] / 1000:.0f}k params)")
    ax.axvline(c["resolution"], color="#bbb", lw=1, zorder=0)
    ax.set_xticks([int(r) for r in resolutions])
    ax.set_xlabel("test resolution (px; same weights)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    seeds = c["seeds"]
    device = "" if c.get("device") in (None, "auto") else f" ({_device(c)})"
    ax.set_title(f"Fashion-MNIST, trained at {c['resolution']}px, {c['epochs']} epochs, "
                 f"{'seed ' + str(seeds[0]) if len(seeds) == 1 else f'mean of {len(seeds)} seeds'}{device}\n"
                 "TiC windows scaled with the image (solid) or fixed in pixels (dotted)", fontsize=9)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_vllm(result: dict, path: Path, plt) -> Path:
    """`bench vllm`: per backend the most requests running at once, output tokens/s and ms per
    output token (the same KV memory for all), the perplexity of its continuation written on the
    throughput bar. A backend whose engine failed has no bars."""
    c = result["config"]
    rows = [r for r in result["rows"] if r.get("error") is None]
    names = ["vLLM\ndefault" if r["backend"] == "vllm" else f"SINKLORA\n{r['backend']}" for r in rows]
    colors = ["#999" if r["backend"] == "vllm" else "#2a7ab9" for r in rows]
    panels = (("max_running", "most requests running at once", "{:.0f}"),
              ("output_tokens_per_s", "output tokens/s", "{:.1f}"),
              ("mean_tpot_ms", "ms per output token (lower is better)", "{:.1f}"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (key, label, fmt) in zip(axes, panels):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=colors)
        for bar, r, v in zip(bars, rows, values):
            text = fmt.format(v) + (f"\nppl {r['ppl']:.2f}" if key == "output_tokens_per_s" and r.get("ppl") else "")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(0, max(values, default=1) * 1.3 or 1)
        ax.tick_params(axis="x", labelsize=8)
    failed = [r["backend"] for r in result["rows"] if r.get("error") is not None]
    fig.suptitle(f"vLLM {c['vllm']} on the CPU ({c['cpu_count']} cores), {_model(c['model'])} {c['dtype']}: "
                 f"{c['requests']} requests x {c['prompt_tokens']} + {c['new_tokens']} tokens, block {c['block_size']}, "
                 f"h2o/streaming budget {c['kv_budget']}\nthe same KV memory, {c['kv_pool_bytes'] / 2**20:.0f} MiB: "
                 f"{c['kv_blocks_vllm']} blocks (vLLM), {c['kv_blocks_sinklora']} + score/position tensors (SINKLORA)"
                 + (f"; failed: {', '.join(failed)}" if failed else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _by_policy(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """``rows`` grouped by policy (first seen first), each group in budget order."""
    return [(name, sorted((r for r in rows if r["policy"] == name), key=lambda r: r["budget_share"]))
            for name in dict.fromkeys(r["policy"] for r in rows)]


def plot_kv_quality(result: dict, path: Path, plt, peers: dict | None = None) -> Path:
    """`bench kv-quality`: perplexity over the full cache's against the budget, one line per policy,
    one panel per prompt length (and passkey accuracy when it was measured); ``peers``: kvpress's
    presses on the same windows (bench/kvpress_baseline.py), dashed, the y axis cut where a press is
    far off (its value written at the edge)."""
    c = result["config"]
    prompts = c["prompt_tokens"]
    keyed = any(r["passkey"] is not None for r in result["rows"])
    fig, axes = plt.subplots(1 + keyed, len(prompts), figsize=(5.2 * len(prompts), 5.2 + 3 * keyed), squeeze=False)
    for col, prompt in enumerate(prompts):
        rows = [r for r in result["rows"] if r["prompt_tokens"] == prompt and r["policy"] != "full"]
        full = next(r for r in result["rows"] if r["prompt_tokens"] == prompt and r["policy"] == "full")
        for name, mine in _by_policy(rows):
            shares = [100 * r["budget_share"] for r in mine]
            style = dict(lw=2.4, color="#c0392b") if name == c.get("recommended") else dict(lw=1.2)
            axes[0][col].plot(shares, [r["vs_full"] for r in mine], marker="o", label=name, **style)
            if keyed:
                axes[1][col].plot(shares, [r["passkey"] for r in mine], marker="o", label=name, **style)
        top = max(r["vs_full"] for r in rows) * 1.08
        for name, mine in _by_policy([r for r in (peers or {}).get("rows", [])
                                      if r["prompt_tokens"] == prompt and r["policy"] != "full"]):
            shares = [100 * r["budget_share"] for r in mine]
            ratios = [r["vs_full"] for r in mine]
            if max(ratios) > top:
                name += f" (cut; {max(ratios):.1f}x at worst)"
            axes[0][col].plot(shares, [min(x, top) for x in ratios], marker="x", ls="--", lw=1, label=name)
        axes[0][col].set_ylim(0.98, top)
        axes[0][col].axhline(1.04, color="#999", ls=":", lw=1)
        axes[0][col].set_title(f"P = {prompt} + {c['new_tokens']} teacher-forced (full ppl {full['ppl']:.2f})",
                               fontsize=9)
        axes[0][col].set_xlabel("KV budget, % of the prompt")
        axes[0][col].set_ylabel("ppl / full cache's (lower is better)")
        axes[0][col].legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
        if keyed:
            axes[1][col].set_title(f"passkey accuracy at {prompt} tokens (full {full['passkey']:.2f})", fontsize=9)
            axes[1][col].set_xlabel("KV budget, % of the prompt")
            axes[1][col].set_ylim(-0.05, 1.05)
    fig.suptitle(f"{_model(c['model'])} on {_device(c)}, {len(c['texts']) * c['windows']} windows of\n"
                 f"{', '.join(c['texts'])}; dotted: 4% above full", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "plots")
    args = parser.parse_args(argv)
    plt = _pyplot()
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    extension: dict[tuple, list[dict]] = {}
    for path in sorted(args.results.glob("*.json")):
        result = json.loads(path.read_text())
        c = result["config"]
        if path.stem.startswith("extension"):
            extension.setdefault(_same_experiment(c), []).append(result)
        elif path.stem.startswith("decode"):
            written.append(plot_rows(result, "ms", "ms per decode step (lower is better)",
                                     f"Paged decode, {_device(c)}, {c['dtype']}\nB={c['batch']}, context "
                                     f"{c['context']}, Hq={c['heads_q']}/Hkv={c['heads_kv']}, D={c['head_dim']}",
                                     args.out / f"{path.stem}.png", plt))
        elif path.stem.startswith("generate"):
            written.append(plot_rows(result, "ms_per_step", "ms per decode step, whole model (lower is better)",
                                     f"{_model(c['model'])} on {_device(c)}, {c['dtype']}\nbatch {c['batch']}, "
                                     f"context {c['context']}, h2o/streaming budget {c['kv_budget']} tokens",
                                     args.out / f"{path.stem}.png", plt))
        elif path.stem.startswith("msa_conv"):
            written.append(plot_msa_conv(result, args.out / f"{path.stem}.png", plt))
        elif path.stem.startswith("kv_quality_kvpress"):
            continue  # drawn on the plot of the bench run at the same prompt length
        elif path.stem.startswith("kv_quality"):
            peers = path.with_name(path.name.replace("kv_quality_", "kv_quality_kvpress_", 1))
            peers = json.loads(peers.read_text()) if peers.exists() else None
            written.append(plot_kv_quality(result, args.out / f"{path.stem}.png", plt, peers))
        elif path.stem.startswith("vllm"):
            written.append(plot_vllm(result, args.out / f"{path.stem}.png", plt))
        elif path.stem.startswith("tic"):
            written.append(plot_tic(result, args.out / f"{path.stem}.png", plt))
    written += [plot_extension(runs, args.out, plt) for runs in extension.values()]
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
