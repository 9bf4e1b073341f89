"""Figures from run directories, in the style of the paper's figures.

    python tools/plot.py runs/byol-all-b0.99-s0 runs/byol-projector-b0.99-s0 --out figures
    python tools/plot.py --kept "byol 2-wide projector" --only weights --out docs/figures/laptop

The second reads no run directory: --kept names rows of the laptop experiment by a part of their label, and
their kept results (docs/results/laptop/<scale>/<row>/seed<S>/: args.json, metrics.jsonl and the
instruments' files) are plotted; Fig. 2 and 3 from Table 2's 2-wide rows, for example.

Writes PNG files into --out (needs matplotlib: pip install matplotlib); --only chooses among them:
  top1.png                   linear-probe top-1 (and kNN top-1) against epoch, one line per run
                             (Fig. 3, C.7, C.8)
  accuracy-per-stage-set.png final linear top-1 of each run, by its EMA stage set (Fig. 4)
  collapse.png               the collapse monitor against epoch: output spread (1 spread out, 0
                             collapsed) and the effective rank of the backbone features
  grad-norms.png             runs with --log-grad-norms: the l-inf norm of the gradient with
                             respect to each stage's output, against step (Fig. 5)
  weights-2d.png             runs with --track-weights: the path of each tracked row (filter) of
                             the projector's last layer in the plane, online solid, target dashed
                             (Fig. 2, Appendix E.2)
  weights-3d.png             the same paths against training step (Fig. 2, Appendix E.1)
and prints the numbers behind the gradient and weight figures as Markdown tables.
"""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from engine.cli import ArgumentParser  # noqa: E402
import experiments  # noqa: E402  (tools/, beside this file)
import report  # noqa: E402

STAGES = common.STAGES
FIGURES = ("top1", "stage-sets", "collapse", "grad-norms", "weights")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", help="run directories (each with args.json and metrics.jsonl)")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--filters", type=common.positive(int), default=8, help="tracked rows to draw in the weight figures")
    p.add_argument(
        "--kept",
        default=None,
        help="comma list: plot the kept results of the laptop experiment's rows whose label contains one of these "
        "texts (case-insensitive), e.g. 'byol 2-wide projector'; no run directory needed",
    )
    p.add_argument("--seed", type=int, default=0, help="with --kept: the seed whose runs are plotted (default 0)")
    p.add_argument("--results", default=str(report.ROOT / "docs" / "results"), help="with --kept: the kept results")
    p.add_argument(
        "--only", default=None, help=f"comma list of figures to write, of: {', '.join(FIGURES)} (default: all)"
    )
    args = p.parse_args(argv)
    if args.filters < 1:
        raise SystemExit(f"error: --filters must be a positive number (got {args.filters}); the default is 8")
    args.only = [f.strip() for f in (args.only or ",".join(FIGURES)).split(",") if f.strip()]
    unknown = [f for f in args.only if f not in FIGURES]
    if unknown:
        raise SystemExit(f"error: --only {','.join(unknown)}: not a figure; choose from {', '.join(FIGURES)}")
    if args.kept:
        args.runs += [str(d) for d in kept_directories(args.kept, args.seed, args.results)]
    if not args.runs:
        raise SystemExit("error: name run directories, or rows of the laptop experiment with --kept")
    return args


def kept_directories(texts, seed, results):
    """The kept results of the laptop rows whose label contains one of `texts` (a comma list), at the laptop's
    own scale (its epochs and batch, no other flag), for one seed, in the experiment's row order."""
    experiment = experiments.EXPERIMENTS["laptop"]
    laptop_scale = SimpleNamespace(
        dataset=None,
        data_dir=None,
        epochs=experiment.epochs,
        max_steps=None,
        batch_size=256,
        nproc=1,
        extra="",
        warmup_epochs=None,
        queue_size=None,
        results=results,
    )
    wanted = [t.strip().lower() for t in texts.split(",") if t.strip()]
    rows = [row for row in experiment.rows if any(w in row.label.lower() for w in wanted)]
    if not rows:
        raise SystemExit(f"error: no row of the laptop experiment has '{texts}' in its label")
    directories = [report.results_dir(laptop_scale, "laptop", experiment, row, seed) for row in rows]
    missing = [str(d) for d in directories if not (d / "metrics.jsonl").exists()]
    if missing:
        raise SystemExit(f"error: no kept results yet in {', '.join(missing)}; run the rows first (docs/claims.md)")
    return directories


def read_jsonl(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise SystemExit(f"error: {path} is not readable JSON lines ({error.__class__.__name__}); was it edited?")


def load_run(directory):
    directory = Path(directory)
    if not (directory / "args.json").exists() or not (directory / "metrics.jsonl").exists():
        raise SystemExit(
            f"error: {directory} is not a run directory (no args.json and metrics.jsonl); pass directories "
            f"written by byol.py, simsiam.py, ..."
        )
    try:
        args = json.loads((directory / "args.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise SystemExit(
            f"error: {directory / 'args.json'} is not readable JSON ({error.__class__.__name__}); was it edited?"
        )
    return {
        "dir": directory,
        "args": args,
        "metrics": read_jsonl(directory / "metrics.jsonl"),
        "grads": read_jsonl(directory / "grad_norms.jsonl"),
        "weights": read_jsonl(directory / "weights.jsonl"),
    }


def label(run):
    a = run["args"]
    shared = a["ema_stages"] == "none" or a["beta"] == 0
    text = f"{a['method']} EMA none (β=0)" if shared else f"{a['method']} EMA {a['ema_stages']} β={a['beta']:g}"
    text += " +BN1" if a.get("bn_block4") else ""
    text += " +BN2" if a.get("bn_proj") else ""
    return text


def unique_labels(runs):
    """A label per run from its flags; the directory name is added where two runs would share one."""
    labels = [label(r) for r in runs]
    return [f"{t} ({r['dir'].name})" if labels.count(t) > 1 else t for t, r in zip(labels, runs)]


def plot_top1(plt, runs, labels, out):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, name in zip(runs, labels):
        epochs = [m["epoch"] for m in run["metrics"]]
        (line,) = ax.plot(epochs, [m["linear_top1"] for m in run["metrics"]], marker="o", ms=3, label=f"{name}: linear")
        knn = [(m["epoch"], m["knn_top1"]) for m in run["metrics"] if m.get("knn_top1") is not None]
        if knn:
            ax.plot(*zip(*knn), ls="--", color=line.get_color(), alpha=0.7, label=f"{name}: kNN")
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="Test accuracy during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, out / "top1.png")


def plot_stage_sets(plt, runs, labels, out):
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(runs) + 2), 4.5))
    finals = [r["metrics"][-1]["linear_top1"] for r in runs]
    ax.bar(range(len(runs)), finals, color="tab:blue")
    for i, value in enumerate(finals):
        ax.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [n.replace(" EMA ", "\nEMA ") for n in labels], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="final linear top-1 (%)", title="Accuracy by EMA stage set")
    return save(fig, out / "accuracy-per-stage-set.png")


def plot_collapse(plt, runs, labels, out):
    """The collapse monitor (common.output_spread, common.effective_rank), one line per run."""
    runs = [(r, n) for r, n in zip(runs, labels) if any("output_spread" in m for m in r["metrics"])]
    fig, (spread_ax, rank_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for run, name in runs:
        monitored = [m for m in run["metrics"] if "output_spread" in m]
        epochs = [m["epoch"] for m in monitored]
        spread_ax.plot(epochs, [m["output_spread"] for m in monitored], marker="o", ms=3, label=name)
        rank_ax.plot(epochs, [m["feature_rank"] for m in monitored], marker="o", ms=3, label=name)
    spread_ax.set(
        xlabel="epoch", ylabel="output spread", ylim=(0, None), title="Projector outputs: 1 spread out, 0 collapsed"
    )
    rank_ax.set(xlabel="epoch", ylabel="effective rank", ylim=(0, None), title="Backbone features: dimensions in use")
    for ax in (spread_ax, rank_ax):
        ax.grid(alpha=0.3)
    rank_ax.legend(fontsize=7)
    return save(fig, out / "collapse.png")


def plot_grad_norms(plt, runs, labels, out):
    runs = [(r, n) for r, n in zip(runs, labels) if r["grads"]]
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 3.2 * len(runs)), squeeze=False)
    for ax, (run, name) in zip(axes[:, 0], runs):
        steps = [g["step"] for g in run["grads"]]
        for stage in STAGES:
            ax.plot(steps, [g[stage] for g in run["grads"]], lw=1, label=stage)
        ax.set(yscale="log", xlabel="step", ylabel="max |dL/d output|", title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    return save(fig, out / "grad-norms.png")


def weight_paths(run, filters):
    """(steps, online, target): online/target[f] is the list of points (w1, w2) of filter f."""
    steps = [w["step"] for w in run["weights"]]
    count = min(filters, len(run["weights"][0]["online"]))
    path = lambda side, f: [w[side][f] for w in run["weights"]]
    return steps, [path("online", f) for f in range(count)], [path("target", f) for f in range(count)]


def plot_weights(plt, runs, labels, out, filters, three_d):
    runs = [(r, n) for r, n in zip(runs, labels) if r["weights"]]
    count = min(filters, min(len(r["weights"][0]["online"]) for r, _ in runs))
    cols = math.ceil(math.sqrt(count))
    rows = (count + cols - 1) // cols
    fig = plt.figure(figsize=(4 * cols, 3.6 * rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = [weight_paths(run, count) for run, _ in runs]  # once per run, not once per filter
    for f in range(count):
        ax = fig.add_subplot(rows, cols, f + 1, **({"projection": "3d"} if three_d else {}))
        for k, ((run, name), (steps, online, target)) in enumerate(zip(runs, paths)):
            shared = run["args"]["beta"] == 0 or "projector" not in common.parse_ema_stages(run["args"]["ema_stages"])
            for side, points, style in (("online", online[f], "-"), ("target", target[f], "--")):
                if side == "target" and shared:
                    continue  # the target's projector is the online one: the same path
                w1, w2 = [p[0] for p in points], [p[1] if len(p) > 1 else 0.0 for p in points]
                kwargs = dict(ls=style, lw=1, color=colors[k % len(colors)], label=f"{name}: {side}")
                ax.plot(steps, w1, w2, **kwargs) if three_d else ax.plot(w1, w2, **kwargs)
                if not three_d:
                    ax.plot(w1[0], w2[0], "o", ms=3, color=colors[k % len(colors)])  # start point
        if three_d:
            ax.set(xlabel="step", ylabel="weight 1", zlabel="weight 2")
        else:
            ax.set(xlabel="weight 1", ylabel="weight 2")
        ax.set_title(f"filter {f:03d}", fontsize=9)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=7)
    fig.subplots_adjust(bottom=0.12 + 0.02 * len(names))
    return save(fig, out / ("weights-3d.png" if three_d else "weights-2d.png"))


def summary(runs, labels):
    """Numbers behind the figures, printed as Markdown: per stage, the median and largest gradient
    norm over steps; per run, how far the tracked rows move in one step (median and largest)."""
    lines = []
    grads = [(r, n) for r, n in zip(runs, labels) if r["grads"]]
    if grads:
        lines += [
            "| run | " + " | ".join(f"{s}: median / max" for s in STAGES) + " |",
            "|---" * (len(STAGES) + 1) + "|",
        ]
        for run, name in grads:
            cells = []
            for stage in STAGES:
                values = sorted(g[stage] for g in run["grads"])
                cells.append(f"{values[len(values) // 2]:.1e} / {values[-1]:.1e}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    tracked = [(r, n) for r, n in zip(runs, labels) if r["weights"]]
    if tracked:
        lines += ["| run | online row, one step: median / max | target row, one step: median / max |", "|---|---|---|"]
        for run, name in tracked:
            cells = []
            for side in ("online", "target"):
                rows = [w[side] for w in run["weights"]]  # steps x K x d
                moves = sorted(math.dist(a, b) for before, after in zip(rows, rows[1:]) for a, b in zip(before, after))
                cells.append(f"{moves[len(moves) // 2]:.2e} / {moves[-1]:.2e}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if lines:
        print("\n".join(lines))


def save(fig, path):
    fig.tight_layout(rect=(0, 0.1, 1, 1)) if fig.legends else fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    print(f"wrote {path}")
    return path


def main(argv=None):
    args = parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    empty = [str(r["dir"]) for r in runs if not r["metrics"]]
    if empty:
        print(
            f"error: {', '.join(empty)} has no finished epoch in metrics.jsonl yet; plot it after one", file=sys.stderr
        )
        return 2
    asked_for = {"grad-norms": ("grads", "--log-grad-norms"), "weights": ("weights", "--track-weights K")}
    for figure, (key, flag) in asked_for.items():
        if args.only != list(FIGURES) and figure in args.only and not any(r[key] for r in runs):
            print(f"error: --only {figure}, but no run recorded it; train with {flag}", file=sys.stderr)
            return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "a file, not a folder" if out.is_file() else error.strerror
        print(f"error: cannot make the folder --out {out} ({reason}); choose another", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: tools/plot.py needs matplotlib; pip install matplotlib", file=sys.stderr)
        return 2
    labels = unique_labels(runs)
    if "top1" in args.only:
        plot_top1(plt, runs, labels, out)
    if "stage-sets" in args.only:
        plot_stage_sets(plt, runs, labels, out)
    monitored = any("output_spread" in m for r in runs for m in r["metrics"])  # runs from before it have none
    if "collapse" in args.only and monitored:
        plot_collapse(plt, runs, labels, out)
    if "grad-norms" in args.only and any(r["grads"] for r in runs):
        plot_grad_norms(plt, runs, labels, out)
    if "weights" in args.only and any(r["weights"] for r in runs):
        plot_weights(plt, runs, labels, out, args.filters, three_d=False)
        plot_weights(plt, runs, labels, out, args.filters, three_d=True)
    summary(runs, labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
