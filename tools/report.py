"""The report side of tools/reproduce.py: statistics over seeds, the tables, the claims and their figure.

Everything here reads the small files each finished run keeps, under
--results/<experiment>/<scale>/<row>/seed<S>/ (args.json, metrics.jsonl, provenance.json and the
instruments' files), or the run directory of a run still going. It imports no torch and starts no
run, so `python tools/reproduce.py claims --table` rewrites docs/claims.md in seconds anywhere.

    summarise, paired            a mean over seeds with its 95 % interval (Student's t, computed here)
    test_claim, holm             a claim's p-value, its verdict, and the verdict after Holm's correction
    write_table, write_laptop_table, write_claims, write_provenance, write_forest_plot
"""

import functools
import hashlib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from experiments import (
    ACCURACY_CLAIMS,
    BETA_AGGRESSIVE,
    BETA_GENTLE,
    BETA_PAPER,
    CLOSE_FRACTION,
    EXPERIMENTS,
    FIXED_MARGINS,
    GRADIENT_ROWS,
    MEASURED_CLAIMS,
    METRIC_NAMES,
    PAPER_BYOL_FULL_EMA,
    PAPER_BYOL_PROJECTOR_EMA,
    PAPER_EPOCHS,
    PAPER_RANDOM_ENCODER,
    PAPER_STEPS_PER_EPOCH,
    RANDOM,
    STABILITY_ROWS,
    STAGES,
    TWO_WIDE_ROWS,
)

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------
# Where runs and their kept results live (the runner writes there, the tables read there)
# ----------------------------------------------------------------------------------------


def scale_name(args, experiment):
    """The directory of one scale of reproduction: dataset, epochs, steps, batch, and a digest of
    the other flags that change results, so different scales never share a run directory. --device is
    left out: where a run ran is recorded with its results (provenance.json), and shown in the tables.
    A --data-dir other than the experiment's own folder adds that folder's name (two folders of one name are
    taken for the same data: kept results travel between machines, whose paths differ)."""
    dataset = args.dataset or experiment.dataset
    name = f"{dataset}-e{args.epochs}" + (f"-s{args.max_steps}" if args.max_steps else "") + f"-b{args.batch_size}"
    folder = os.path.basename(os.path.abspath(data_dir(args, experiment)))
    if folder != os.path.basename(os.path.abspath(default_data_dir(args, experiment))):
        name += "-" + re.sub(r"[^A-Za-z0-9.,=+-]+", "_", folder)
    name += f"-p{args.nproc}" if args.nproc > 1 else ""
    extra = re.sub(r"--device\s+\S+", "", args.extra).split()
    other = f"{args.warmup_epochs} {args.queue_size} {' '.join(extra)}"
    return name + ("" if other == "None None " else "-" + hashlib.sha1(other.encode()).hexdigest()[:6])


def slug(experiment, row):
    """A row's directory name: its script and flags, e.g. byol_preset_laptop_ema_stages_all."""
    return re.sub(
        r"[^A-Za-z0-9.,=+]+", "_", f"{row.script[:-3]} {experiment.flags} {row.flags}".replace("--", "")
    ).strip("_")


def run_dir(args, experiment, row, seed=0):
    """Where one run of a row trains: --out-root/<scale>/<row>/seed<S>."""
    return Path(args.out_root) / scale_name(args, experiment) / slug(experiment, row) / f"seed{seed}"


def results_dir(args, name, experiment, row, seed=0):
    """Where a finished run's small files are kept (and committed): --results/<experiment>/<scale>/<row>/seed<S>."""
    return Path(args.results) / name / scale_name(args, experiment) / slug(experiment, row) / f"seed{seed}"


def data_dir(args, experiment):
    """--data-dir, or else default_data_dir."""
    return args.data_dir or default_data_dir(args, experiment)


def default_data_dir(args, experiment):
    """The experiment's own folder when it runs on the experiment's dataset (./data otherwise)."""
    return experiment.data_dir if (args.dataset or experiment.dataset) == experiment.dataset else "./data"


# ----------------------------------------------------------------------------------------
# Student's t distribution, computed here (no scipy): its distribution function and quantiles
# ----------------------------------------------------------------------------------------

# Reference values of t(0.975; df), the two-sided 95 % quantile, for df = 1..30, from any statistics table:
# the tests check student_t_quantile against them (and against the closed forms of df 1 and 2). With 3 seeds
# (df 2) the interval is mean +- 4.30 sd / sqrt(3) = mean +- 2.48 sd: wide.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T_975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def regularized_incomplete_beta(x, a, b):
    """I_x(a, b) = B(x; a, b) / B(a, b), the regularized incomplete beta function, for 0 <= x <= 1.

    Student's t's distribution function is one of these (student_t_cdf). Computed from its continued
    fraction (Numerical Recipes, section 6.4), which converges fast for x < (a + 1) / (a + b + 2); above
    that, the symmetry I_x(a, b) = 1 - I_(1-x)(b, a) brings x below it."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    # x^a (1 - x)^b / (a B(a, b)), in logarithms so that no power overflows
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a
    return front * beta_continued_fraction(x, a, b)


def beta_continued_fraction(x, a, b, steps=300, tolerance=1e-15):
    """The continued fraction 1 / (1 + d_1 / (1 + d_2 / (1 + ...))) of I_x(a, b), evaluated from the front by
    Lentz's method: each step multiplies the value so far by a factor c * d that tends to 1.
    Its terms: d_2m = m (b - m) x / ((a + 2m - 1)(a + 2m)), d_2m+1 = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))."""
    tiny = 1e-300  # stands in for a zero denominator

    def guarded(value):
        return value if abs(value) > tiny else tiny

    c = 1.0
    d = 1.0 / guarded(1.0 - (a + b) * x / (a + 1))
    value = d
    for m in range(1, steps):
        for term in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 / guarded(1.0 + term * d)
            c = guarded(1.0 + term / c)
            factor = c * d
            value *= factor
        if abs(factor - 1.0) < tolerance:
            break
    return value


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom. With x = df / (df + t^2), the probability beyond
    |t| on one side is I_x(df / 2, 1 / 2) / 2 (Abramowitz and Stegun 26.7.1); the distribution is symmetric."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    one_tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - one_tail if t > 0 else one_tail


@functools.lru_cache(maxsize=None)
def student_t_quantile(p, df):
    """The t with P(T <= t) = p: bisection on student_t_cdf, which rises with t (100 halvings of the bracket
    leave it far below any digit we print). Cached: a table asks for the same few quantiles many times."""
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


# ----------------------------------------------------------------------------------------
# Statistics over seeds: mean, standard deviation, 95 % confidence intervals, tests, Holm
# ----------------------------------------------------------------------------------------


@dataclass
class Summary:
    n: int
    mean: float
    sd: float = None  # sample standard deviation (n - 1); None for one value
    low: float = None  # the 95 % confidence interval of the mean; None for one value
    high: float = None


def summarise(values):
    """Mean, standard deviation and 95 % confidence interval of the mean of a few numbers; None for none.
    The interval is mean +- t(0.975; n - 1) sd / sqrt(n): Student's t, since the sd is itself estimated."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired(a, b):
    """The summary of a - b over the seeds both have (dicts seed -> value): a paired comparison, since the two
    runs of one seed share the data order and the initialisation."""
    return summarise([a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None])


def t_statistic(summary, threshold):
    """(mean - threshold) / (sd / sqrt(n)); +-inf when the seeds agree exactly (sd 0) and the mean is off it."""
    if summary.sd == 0:
        return 0.0 if summary.mean == threshold else math.copysign(math.inf, summary.mean - threshold)
    return (summary.mean - threshold) / (summary.sd / math.sqrt(summary.n))


def p_above(summary, threshold):
    """One-sided p-value of "the mean is above `threshold`": the chance of a t statistic this large or larger
    if the mean were `threshold`, P(T >= t) = P(T <= -t)."""
    return student_t_cdf(-t_statistic(summary, threshold), summary.n - 1)


def p_below(summary, threshold):
    """One-sided p-value of "the mean is below `threshold`"."""
    return student_t_cdf(t_statistic(summary, threshold), summary.n - 1)


# The level each verdict is taken at. higher / lower: a one-sided p below 0.025 is the same as a two-sided 95 %
# interval that leaves 0 out on that side (the rule of the earlier tables). close: the paper's "comparable or
# preferable" is one-sided by its words, so a one-sided 95 % bound, p below 0.05.
LEVEL = {"higher": 0.025, "lower": 0.025, "close": 0.05}
# Holm's column takes every verdict at 2.5 % per side, the close ones too: a claim can be wrong either way, so its
# chance of a wrong verdict is twice its level per side, and the column's promise (any wrong verdict at or below
# 5 %) holds only when that is 5 % for every claim.
HOLM_LEVEL = 0.025
NOT_YET = "not yet measured"


@dataclass
class Test:
    """One claim tested in one measure (a metric, or an instrument's ratio)."""

    summary: Summary  # of the per-seed values: a - b in points, or the logarithm of a ratio
    direction: str  # higher, lower, close
    margin: float = 0.0  # close only: how far a may fall below b and still be comparable
    p: float = None  # one-sided p-value in the paper's direction; None below 2 seeds
    p_other: float = None  # the one-sided p-value in the other direction: what a refutation rests on
    verdict: str = NOT_YET
    holm: str = NOT_YET  # the verdict after Holm's correction over its column (apply_holm)
    holm_p: float = None

    @property
    def level(self):
        return LEVEL[self.direction]


def test_claim(summary, direction, margin=0.0):
    """A claim's test from the per-seed values' summary.

    higher / lower: confirmed when the one-sided p in the paper's direction is below 0.025 (the two-sided 95 %
    interval leaves 0 out on the paper's side), refuted when the p in the other direction is.
    close: H0 "a - b <= -margin" against "a - b > -margin": confirmed when the one-sided 95 % lower bound of a - b
    is above -margin, refuted when the one-sided 95 % upper bound is below -margin; "and better" when the
    two-sided 95 % interval lies above 0 (projector-only EMA is then "preferable", the paper's other word).
    Otherwise: not seen at this scale."""
    test = Test(summary, direction, margin)
    if summary is None or summary.sd is None:
        test.verdict = test.holm = f"{NOT_YET} (fewer than 2 seeds)"
        return test
    threshold = -margin if direction == "close" else 0.0
    above, below = p_above(summary, threshold), p_below(summary, threshold)
    test.p, test.p_other = (below, above) if direction == "lower" else (above, below)
    if test.p < test.level:
        better = direction == "close" and summary.low > 0
        test.verdict = "confirmed and better" if better else "confirmed"
    elif test.p_other < test.level:
        test.verdict = "refuted"
    else:
        test.verdict = "not seen at this scale"
    return test


def verdict(summary, direction, margin=0.0):
    """confirmed / refuted / not seen at this scale / not yet measured: test_claim's verdict."""
    return test_claim(summary, direction, margin).verdict


def holm(p_values):
    """Holm's step-down adjustment of m p-values (Holm 1979): the i-th smallest is multiplied by m - i + 1, each
    adjusted value is at least the one before it in that order, and none is above 1. A verdict whose adjusted p
    is below a level keeps the chance that one or more of the family's verdicts is wrong, when their null
    hypotheses hold, at or below that level; the unadjusted p keeps it for each verdict alone."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, largest_so_far = [None] * m, 0.0
    for rank, i in enumerate(order):
        largest_so_far = max(largest_so_far, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = largest_so_far
    return adjusted


def apply_holm(tests):
    """Holm's correction over one column of verdicts (one metric over every claim, or the instruments' claims).
    Each claim enters with the p-value of the verdict it reached or was nearest to (the smaller of its two
    one-sided p-values); a claim not yet measured enters with 1, so that the family is the whole column, fixed
    in advance, and does not grow as results arrive. Sets each test's holm and holm_p."""
    decisive = [1.0 if t.p is None else min(t.p, t.p_other) for t in tests]
    for test, adjusted in zip(tests, holm(decisive)):
        test.holm_p = adjusted
        if test.p is None:
            continue
        if adjusted < HOLM_LEVEL and test.verdict.startswith("confirmed"):
            test.holm = "confirmed"
        elif adjusted < HOLM_LEVEL and test.verdict == "refuted":
            test.holm = "refuted"
        else:
            test.holm = "not seen"


# ----------------------------------------------------------------------------------------
# Showing numbers
# ----------------------------------------------------------------------------------------


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def show_mean(summary, sign=False):
    """'34.80 ± 0.41' (mean and standard deviation), '34.80' for one seed, '-' for none."""
    if summary is None:
        return "-"
    mean = f"{summary.mean:+.2f}" if sign else f"{summary.mean:.2f}"
    return mean if summary.sd is None else f"{mean} ± {summary.sd:.2f}"


def show_interval(summary, sign=False):
    if summary is None or summary.low is None:
        return "-"
    f = "{:+.2f}" if sign else "{:.2f}"
    return f"[{f.format(summary.low)}, {f.format(summary.high)}]"


def show_both(summary, sign=True):
    """A mean, signed by default (a difference), with its interval: '+1.20 ± 0.30 [+0.45, +1.95]'; the mean
    alone for one seed; '-' for none."""
    if summary is None:
        return "-"
    interval = show_interval(summary, sign=sign)
    return show_mean(summary, sign=sign) + ("" if interval == "-" else f" {interval}")


def show_difference(summary):
    """'+1.20 [+0.45, +1.95]': a paired mean difference with its 95 % interval; '-' for none."""
    if summary is None:
        return "-"
    interval = show_interval(summary, sign=True)
    return f"{summary.mean:+.2f}" + ("" if interval == "-" else f" {interval}")


def show_ratio(summary):
    """A summary of log ratios shown as ratios: the geometric mean over the seeds and its 95 % interval,
    '2.90 [1.63, 5.14]'; '-' for none."""
    if summary is None:
        return "-"
    ratio = f"{math.exp(summary.mean):.2f}"
    return ratio if summary.low is None else f"{ratio} [{math.exp(summary.low):.2f}, {math.exp(summary.high):.2f}]"


def show_p(p):
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def cell(text):
    """Text for a Markdown table cell: a '|' inside it would end the cell in GitHub's renderer, so it is escaped."""
    return str(text).replace("|", "\\|")


def table_row(cells):
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def table_head(cells):
    return [table_row(cells), "|" + "---|" * len(cells)]


# ----------------------------------------------------------------------------------------
# Reading the kept results
# ----------------------------------------------------------------------------------------


def final_metrics(directory):
    """The last line of metrics.jsonl, or linear_eval.json for the random encoder; None if absent."""
    if (directory / "linear_eval.json").exists():
        result = json.loads((directory / "linear_eval.json").read_text())
        return {
            "linear_top1": result["top1"],
            "knn_top1": result["knn_top1"],
            "knn1_top1": result["knn1_top1"],
            "epoch": 0,
            "step": 0,
            "protocol": "offline linear probe",
        }
    history = read_metrics(directory)
    return history[-1] if history else None


def read_lines(path):
    """Every line of a JSON-lines file; [] if there is none."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_metrics(directory):
    """Every line of a run's metrics.jsonl (one per epoch); [] if it has none."""
    return read_lines(directory / "metrics.jsonl")


class KeptRun(NamedTuple):
    """What a table reads of one run: its last metrics line, every line, where it ran, and its directory."""

    metrics: dict  # the last line of metrics.jsonl (or linear_eval.json's numbers)
    history: list  # every line of metrics.jsonl, one per epoch
    provenance: dict  # provenance.json (or, for a run still going, what its args.json says)
    directory: Path  # where its files are: the kept results, or the run directory


def row_results(args, name, experiment, row):
    """seed -> KeptRun(final metrics, history, provenance, directory) for each seed of --seeds that has results:
    the kept ones, else those of a run directory (an unfinished run shows there)."""
    found = {}
    for seed in args.seeds:
        directory = results_dir(args, name, experiment, row, seed)
        if not (directory / "args.json").exists() and not (directory / "linear_eval.json").exists():
            directory = run_dir(args, experiment, row, seed)
        metrics = final_metrics(directory)
        if metrics is None:
            continue
        provenance = directory / "provenance.json"
        if provenance.exists():
            where = json.loads(provenance.read_text())
        else:  # a run still going (or stopped): what its args.json says
            trained = json.loads((directory / "args.json").read_text()) if (directory / "args.json").exists() else {}
            where = {"git_revision": trained.get("git_revision", "?"), "device": trained.get("device_name", "?")}
        found[seed] = KeptRun(metrics, read_metrics(directory), where, directory)
    return found


def values(found, key):
    return {seed: metrics.get(key) for seed, (metrics, *_) in found.items()}


def knn_rise(found):
    """seed -> how far kNN top-1 rose between the run's last two evaluations (at 10 epochs: epoch 5 to 10), and
    the set of (from, to) epochs: a curve still rising at the end says that more steps would help."""
    rise, spans = {}, set()
    for seed, (_, history, *_) in found.items():
        scored = [(row["epoch"], row["knn_top1"]) for row in history if row.get("knn_top1") is not None]
        if len(scored) >= 2:
            (from_epoch, from_knn), (to_epoch, to_knn) = scored[-2:]
            rise[seed] = to_knn - from_knn
            spans.add((from_epoch, to_epoch))
    return rise, spans


def cpu_of(provenance):
    """The CPU a run ran on: provenance's "cpu", or the model at the start of the older "machine" text; ""
    where neither was recorded (a run still going)."""
    return provenance.get("cpu") or (provenance.get("machine") or "").split(",")[0].strip()


def provenance_of(found):
    """The code revisions, devices and CPUs of a row's runs, e.g. 'git 44f80b3; cpu; AMD EPYC'; several if they
    differ, flagged: two devices, or two CPU models, compute and time differently."""
    if not found:
        return "-"
    revisions = sorted({p.get("git_revision", "?") for _, _, p, _ in found.values()})
    devices = sorted({p.get("device", "?") for _, _, p, _ in found.values()})
    cpus = sorted({cpu_of(p) for _, _, p, _ in found.values()} - {""})
    text = f"git {', '.join(revisions)}; {', '.join(devices)}"
    text += " (MIXED DEVICES: do not compare)" if len(devices) > 1 else ""
    text += f"; {', '.join(cpus)}" if cpus else ""
    return text + (" (MIXED CPUS)" if len(cpus) > 1 else "")


def seeds_of_both(found_a, found_b):
    """The runs of two rows for the seeds that both have, keyed (row, seed): what a paired difference is made of."""
    both = [seed for seed in found_a if seed in found_b]
    return {**{("a", s): found_a[s] for s in both}, **{("b", s): found_b[s] for s in both}}


def scale_line(args, experiment, with_data_dir=False):
    folder = f" (`--data-dir {data_dir(args, experiment)}`)" if with_data_dir else ""
    return (
        f"Scale: dataset {args.dataset or experiment.dataset}{folder}, {args.epochs} epochs"
        + (f", at most {args.max_steps} steps" if args.max_steps else "")
        + f", batch {args.batch_size}"
        + (f", warm-up {args.warmup_epochs} epochs" if args.warmup_epochs is not None else "")
        + (f", queue {args.queue_size} (MoCo v2, ReSSL)" if args.queue_size else "")
        + (f", extra flags `{args.extra}`" if args.extra else "")
        + (f", {args.nproc} processes per run (torchrun)" if args.nproc > 1 else "")
        + f", seeds {','.join(map(str, args.seeds))}."
    )


# ----------------------------------------------------------------------------------------
# The experiments' tables
# ----------------------------------------------------------------------------------------


def save_table(args, experiment, name, lines):
    """Write <name>.md beside the experiment's runs and print it."""
    path = Path(args.out_root) / scale_name(args, experiment) / f"{name}.md"
    write_text(path, lines)


def write_text(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path}")


def write_table(args, name, experiment, rows):
    """<experiment>.md: the paper's numbers next to ours, with how ours were measured."""
    lines = [
        f"# {experiment.title}",
        "",
        scale_line(args, experiment) + " The paper: 200 epochs, batch 256.",
        "Ours: online linear probe top-1, weighted kNN (k=200) top-1 and 1-NN top-1 at the last epoch "
        "(the random encoder: offline linear probe), as mean ± standard deviation over the seeds and, with two "
        "or more, the 95 % confidence interval of the mean [low, high] (Student's t).",
        "",
        "| row | paper top-1 | paper KNN-1 | ours: linear top-1 | kNN top-1 | 1-NN top-1 | seeds | epoch "
        "| code, device, CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = row_results(args, name, experiment, row)
        paper = [row.paper.get("top1"), row.paper.get("knn1")]
        ours = [
            show_both(summarise(values(found, key).values()), sign=False)
            for key in ("linear_top1", "knn_top1", "knn1_top1")
        ]
        epochs = sorted({m.get("epoch", "-") for m, *_ in found.values()})
        lines.append(
            f"| {row.label} | {' | '.join(fmt(v) for v in paper)} | {' | '.join(ours)} | {len(found)} | "
            f"{', '.join(map(str, epochs)) or '-'} | {provenance_of(found)} |"
        )
    if any("min_per_epoch" in row.paper for row in rows):  # Table 4: what EMA costs, beside the accuracy
        lines += cost_table(args, name, experiment, rows)
    save_table(args, experiment, name, lines)


def cost_table(args, name, experiment, rows):
    """Table 4's other columns: the paper's EMA layers, parameters, backbone forwards per image and minutes per
    epoch (on its 2 GPUs) next to ours, from each run's last metrics row, mean over the seeds: the EMA target's
    parameters, the backbone forwards per image, and the training images per second (of a partial epoch too,
    with --max-steps), with each row's time per image against the first row's."""
    lines = [
        "",
        "What EMA costs (Table 4's other columns). The paper's Params (MB) are the ResNet-50 backbone's parameters "
        "held, in millions (23.5 each: 47.0 with the EMA backbone, 23.5 without), not the EMA copies'; ours are "
        "the EMA target's parameters in millions (float32 MB = 4 x that), heads included: another quantity. Time: "
        "the paper's minutes per epoch on its 2 GPUs; ours, training images per second and each row's time per "
        "image against the first row's.",
        "",
        "| row | paper: EMA layers | paper: params (MB) | paper: forwards | paper: min / epoch | ours: EMA parameters "
        "(millions) | ours: forwards per image | ours: images / s | time per image, against the first row: paper "
        "| ours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first_paper, first_ours = None, None
    for row in rows:
        found = row_results(args, name, experiment, row)
        ema = summarise([v / 1e6 for v in values(found, "ema_params").values() if v is not None])
        forwards = summarise(values(found, "backbone_forwards_per_image").values())
        speed = summarise(values(found, "images_per_second").values())
        paper_time = row.paper.get("min_per_epoch")
        first_paper = first_paper or paper_time
        first_ours = first_ours or (speed.mean if speed else None)
        paper_ratio = fmt(paper_time / first_paper) if paper_time and first_paper else "-"
        ours_ratio = fmt(first_ours / speed.mean) if speed and first_ours else "-"
        paper = [row.paper.get(key) for key in ("ema_layers", "params_mb", "forwards", "min_per_epoch")]
        lines.append(
            f"| {row.label} | {' | '.join('-' if v is None else str(v) for v in paper)} | {show_mean(ema)} | "
            f"{show_mean(forwards)} | {show_mean(speed)} | {paper_ratio} | {ours_ratio} |"
        )
    return lines


def write_laptop_table(args, name, experiment, rows):
    """laptop.md (and search.md): per row, kNN top-1 over the seeds with its 95 % interval, the paired
    difference to the random backbone and to the row it is compared with, the collapse monitor, the time."""
    random_row = next((r for r in experiment.rows if r.script == "linear_eval.py"), None)
    random = values(row_results(args, name, experiment, random_row), "knn_top1") if random_row else {}
    by_label = {row.label: row for row in experiment.rows}
    lines = [
        f"# {experiment.title}",
        "",
        scale_line(args, experiment, with_data_dir=True)
        + " kNN: weighted, k = 200, on the whole evaluation split (`--eval-split`: the test split, or the "
        "validation split); mean ± standard deviation over the seeds and the 95 % confidence interval of the "
        "mean (Student's t; with 3 seeds it is mean ± 2.48 sd); 'above random': kNN top-1 minus that of the "
        "random backbone of the same seed; 'against': the paired difference (same seed) to the row named, "
        "with its 95 % interval; linear: the online probe; spread and rank: the collapse monitor (README); "
        "minutes: training time, the sum of the epochs' epoch_seconds (loading and evaluation not included), "
        "mean over the seeds; kNN rise: how far kNN top-1 rose between the run's last two evaluations, mean over "
        "the seeds with its 95 % interval (a curve still rising at the end).",
        "",
        "| run | seeds | kNN top-1 | 95 % CI | above random [95 % CI] | against | difference [95 % CI] | linear top-1 "
        "| spread | rank | final loss | kNN rise, last two evaluations [95 % CI] | training minutes | code, device, "
        "CPU | paper top-1 (CIFAR-100, 200 ep.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        found = row_results(args, name, experiment, row)
        knn = values(found, "knn_top1")
        unfinished = sorted(s for s, (m, history, *_) in found.items() if history and m.get("epoch", 0) < args.epochs)
        label = row.label + (f" (unfinished: seed {', '.join(map(str, unfinished))})" if unfinished else "")
        above = paired(knn, random) if row is not random_row else None
        against = by_label.get(row.compare)
        difference = paired(knn, values(row_results(args, name, experiment, against), "knn_top1")) if against else None
        minutes = summarise(
            [sum(h["epoch_seconds"] for h in history) / 60 for _, history, *_ in found.values() if history]
        )
        mean_of = lambda key: show_mean(summarise(values(found, key).values()))
        rise, spans = knn_rise(found)
        epochs = ", ".join(f"epoch {a} to {b}" for a, b in sorted(spans))
        rise_cell = "-" if not rise else f"{show_both(summarise(rise.values()))} ({epochs})"
        lines.append(
            f"| {label} | {len(found)} | {show_mean(summarise(knn.values()))} | "
            f"{show_interval(summarise(knn.values()))} | {show_both(above)} | "
            f"{row.compare or '-'} | {show_both(difference)} | "
            f"{mean_of('linear_top1')} | {mean_of('output_spread')} | {mean_of('feature_rank')} | {mean_of('loss')} | "
            f"{rise_cell} | "
            f"{'-' if minutes is None else f'{minutes.mean:.1f}'} | {provenance_of(found)} | "
            f"{fmt(row.paper.get('top1'))} |"
        )
    save_table(args, experiment, name, lines)


# ----------------------------------------------------------------------------------------
# The instruments' measures (grad_norms.jsonl, target_drift.jsonl, weights.jsonl, epoch times)
# ----------------------------------------------------------------------------------------


def fluctuation(series):
    """How much a curve jumps from step to step: the mean over consecutive steps of |ln g_t - ln g_(t-1)|.

    Fixed before any result was looked at, to read Fig. 5's "most fluctuated": on a log scale, as the figure
    draws the gradients, the size of each step-to-step change. Taking logarithms makes it scale-free, so a
    stage is not called fluctuating for having larger gradients (the projector's are), and comparing each step
    with the one before leaves out a slow trend over training, which the coefficient of variation over all
    steps would count. Pairs where either value is 0 (no logarithm) are left out; None for fewer than 2 values."""
    changes = [
        abs(math.log(now) - math.log(before)) for before, now in zip(series, series[1:]) if before > 0 and now > 0
    ]
    return sum(changes) / len(changes) if changes else None


def stage_fluctuations(directory):
    """stage -> the fluctuation of its gradient norm over a run's steps (grad_norms.jsonl); {} unless every stage
    was logged over at least two steps."""
    lines = read_lines(directory / "grad_norms.jsonl")
    if len(lines) < 2 or any(stage not in lines[0] for stage in STAGES):
        return {}
    return {stage: fluctuation([line[stage] for line in lines]) for stage in STAGES}


def mean_gradients(directory):
    """stage -> the mean over a run's steps of its l-inf gradient norm (Fig. 5's magnitude), for the stages
    grad_norms.jsonl has; {} if not logged."""
    lines = read_lines(directory / "grad_norms.jsonl")
    stages = [stage for stage in STAGES if lines and stage in lines[0]]
    return {stage: sum(line[stage] for line in lines) / len(lines) for stage in stages}


def mean_drift(directory, side):
    """The mean over a run's steps of how far the `side` ("online" or "target") output moved in one step on the
    fixed batch (target_drift.jsonl: the mean over 64 images of ||z_t/|z_t| - z_(t-1)/|z_(t-1)|||); None if absent."""
    lines = read_lines(directory / "target_drift.jsonl")
    return sum(line[side] for line in lines) / len(lines) if lines else None


def jump(weight_lines):
    """FC2's largest step against its typical one, fixed before the runs: d_t = the mean over the tracked rows of
    ||w_t - w_(t-1)||_2, the online rows (the paper: with EMA "the weight of the online network is much more
    stable"), and jump = max_t d_t / median_t d_t. A spike such as Fig. 2's "abnormal point" is a step many
    times the run's median step; a run that moves evenly has a jump near 1. None for fewer than 2 steps, or a
    median step of 0 (no typical step to compare with)."""
    steps = list(fc2_steps(weight_lines).values())
    if len(steps) < 2 or statistics.median(steps) == 0:
        return None
    return max(steps) / statistics.median(steps)


def fc2_steps(weight_lines):
    """step t -> d_t, the mean over the tracked rows of FC2 of ||w_t - w_(t-1)||_2 (the online rows)."""
    rows = [line["online"] for line in weight_lines]  # steps x tracked rows x (w1, w2)
    return {
        line["step"]: sum(math.dist(now, before) for now, before in zip(after, earlier)) / len(after)
        for line, earlier, after in zip(weight_lines[1:], rows, rows[1:])
    }


def largest_steps_in_the_first_epoch(results):
    """(how many of the 2-wide runs took their largest FC2 step in the first epoch, how many runs, whether every
    one of them warmed its learning rate up over at least that epoch): where most runs' largest step falls in the
    first epoch, the jump measure reads a start-up transient."""
    first = total = 0
    warmup = True
    for label in TWO_WIDE_ROWS.values():
        for run in results.get(label, {}).values():
            steps = fc2_steps(read_lines(run.directory / "weights.jsonl"))
            if steps and run.history:
                total += 1
                first += max(steps, key=steps.get) <= run.history[0]["step"]  # epoch 1's last step
                trained = run.directory / "args.json"
                warmup &= trained.exists() and json.loads(trained.read_text()).get("warmup_epochs", 0) >= 1
    return first, total, warmup


def median_epoch_seconds(history):
    """A run's median epoch time: other work on the machine slows some epochs, and the median follows the
    epochs that ran undisturbed (the sum, or the mean, takes the slowed ones in full)."""
    seconds = [line["epoch_seconds"] for line in history if line.get("epoch_seconds") is not None]
    return statistics.median(seconds) if seconds else None


def ratios(found_a, found_b, measure_of):
    """seed -> measure(a) / measure(b), over the seeds both rows have where both are positive."""
    out = {}
    for seed in found_a:
        if seed in found_b:
            a, b = measure_of(found_a[seed]), measure_of(found_b[seed])
            if a is not None and b is not None and a > 0 and b > 0:
                out[seed] = a / b
    return out


def within_run(found, measure_of):
    """seed -> measure_of(the seed's run), where it gives a positive number."""
    out = {seed: measure_of(run) for seed, run in found.items()}
    return {seed: value for seed, value in out.items() if value is not None and value > 0}


def stage_ratio(numerator, denominator):
    """A function of a run: the mean gradient at one stage's output over that at another's (None if not logged)."""

    def ratio(run):
        means = mean_gradients(run.directory)
        return means[numerator] / means[denominator] if means.get(numerator) and means.get(denominator) else None

    return ratio


def projector_over_others(run):
    """The projector's fluctuation over that of the most fluctuating other stage (Fig. 5: "most fluctuated")."""
    f = stage_fluctuations(run.directory)
    if not f or None in f.values():
        return None
    largest_other = max(f[s] for s in STAGES if s != "projector")
    return f["projector"] / largest_other if largest_other > 0 else None


def blocks_over_the_rest(run):
    """The most fluctuating of blocks 1-3 over the least fluctuating of conv1, block4 and the projector
    (Fig. 5: blocks 1, 2, 3 "are most stable"): below 1 when every one of blocks 1-3 fluctuates less."""
    f = stage_fluctuations(run.directory)
    if not f or None in f.values():
        return None
    least_of_the_rest = min(f[s] for s in ("conv1", "block4", "projector"))
    return max(f[s] for s in ("block1", "block2", "block3")) / least_of_the_rest if least_of_the_rest > 0 else None


# measure -> function(found of a, found of b) -> {seed: ratio}; a claim's `measure` names one
MEASURES = {
    "gradient: projector / block4": lambda a, b: within_run(a, stage_ratio("projector", "block4")),
    "gradient: block4 / block1": lambda a, b: within_run(a, stage_ratio("block4", "block1")),
    "fluctuation: projector / most fluctuating other stage": lambda a, b: within_run(a, projector_over_others),
    "fluctuation: most fluctuating of blocks 1-3 / least of conv1, block4, projector": lambda a, b: within_run(
        a, blocks_over_the_rest
    ),
    "target drift": lambda a, b: ratios(a, b, lambda run: mean_drift(run.directory, "target")),
    "online drift": lambda a, b: ratios(a, b, lambda run: mean_drift(run.directory, "online")),
    "FC2 jump": lambda a, b: ratios(a, b, lambda run: jump(read_lines(run.directory / "weights.jsonl"))),
    "median epoch time": lambda a, b: ratios(a, b, lambda run: median_epoch_seconds(run.history)),
}


# ----------------------------------------------------------------------------------------
# The claims: each claim's per-seed values, tests and verdicts
# ----------------------------------------------------------------------------------------


def labels_of(side):
    """The row labels a side of a claim reads: one, or the two of a difference."""
    return () if side is None else (side if isinstance(side, tuple) else (side,))


def show_side(side):
    if side is None:
        return "-"
    return " − ".join(labels_of(side)) if isinstance(side, tuple) else side


def side_values(results, side, metric):
    """seed -> the side's value in `metric`: a row's, or the difference of two rows' (first - second)."""
    first, *second = [values(results[label], metric) for label in labels_of(side)]
    if not second:
        return {s: v for s, v in first.items() if v is not None}
    return {s: v - second[0][s] for s, v in first.items() if v is not None and second[0].get(s) is not None}


def close_margin(results, claim):
    """The margin of a "close" claim, in points: CLOSE_FRACTION of what its full-EMA row (b) adds in kNN top-1
    over the random backbone of the same seed, mean over the seeds (0 where training adds nothing). kNN for both
    columns: the random backbone's linear top-1 is an offline probe of 100 epochs, the trained rows' an online
    probe, so their difference is no gain of training."""
    gain = paired(values(results[claim.b], "knn_top1"), values(results[RANDOM], "knn_top1"))
    return None if gain is None else CLOSE_FRACTION * max(gain.mean, 0.0)


@dataclass
class Verdicts:
    """One claim's results: a test per metric (accuracy claims) or one test of its measure's log ratio."""

    claim: object
    tests: dict  # metric (or the measure) -> Test
    seeds: int
    provenance: str
    margin: float = None  # close claims
    ratios: dict = None  # measured claims: seed -> ratio
    note: str = ""


def runs_of(results, claim):
    """The runs a claim reads, keyed (label, seed), for its code, device and CPU cell."""
    return {
        (label, seed): run for label in labels_of(claim.a) + labels_of(claim.b) for seed, run in results[label].items()
    }


def two_cpu_seeds(results, claim):
    """The seeds whose runs of this claim's rows ran on more than one CPU model (a pair that cannot be timed
    against itself, and whose float results may round differently)."""
    by_seed = {}
    for label in labels_of(claim.a) + labels_of(claim.b):
        for seed, run in results[label].items():
            by_seed.setdefault(seed, set()).add(cpu_of(run.provenance) or "?")
    return sorted(seed for seed, cpus in by_seed.items() if len(cpus - {"?"}) > 1)


def where_cell(results, claim):
    text = provenance_of(runs_of(results, claim))
    split = two_cpu_seeds(results, claim)
    return text + (f"; seed {', '.join(map(str, split))} on two CPUs" if split else "")


def evaluate_accuracy_claim(results, claim):
    """A claim's paired difference a - b per seed in each of its metrics, tested in the paper's direction (for
    "comparable or preferable": against the claim's margin, the same in every metric)."""
    margin = close_margin(results, claim) if claim.direction == "close" else 0.0
    tests, seeds = {}, 0
    for metric in claim.metrics:
        difference = paired(side_values(results, claim.a, metric), side_values(results, claim.b, metric))
        tests[metric] = test_claim(difference, claim.direction, margin or 0.0)
        seeds = max(seeds, 0 if difference is None else difference.n)
    if claim.direction == "close" and margin is None:  # no random backbone or full-EMA row yet: no margin
        for test in tests.values():
            test.p = test.p_other = None
            test.verdict = test.holm = f"{NOT_YET} (no margin: the full-EMA row or the random backbone is missing)"
    return Verdicts(claim, tests, seeds, where_cell(results, claim), margin=margin)


def evaluate_measured_claim(results, claim):
    """A measured claim's ratio per seed (report.MEASURES), tested on its logarithm: a ratio is as far above 1
    at 2 as below it at 0.5, which the logarithm makes symmetric (+-0.69)."""
    found_a = results[claim.a]
    found_b = results[claim.b] if claim.b else {}
    per_seed = MEASURES[claim.measure](found_a, found_b)
    summary = summarise([math.log(r) for r in per_seed.values()])
    test = test_claim(summary, claim.direction)
    note = ""
    if claim.measure == "median epoch time":  # Table 4 also says: one backbone forward per image, not two
        forwards_a = summarise(values(found_a, "backbone_forwards_per_image").values())
        forwards_b = summarise(values(found_b, "backbone_forwards_per_image").values())
        if forwards_a is not None and forwards_b is not None:
            halved = forwards_a.mean <= forwards_b.mean / 2
            note = f"backbone forwards per image {forwards_a.mean:.2f} against {forwards_b.mean:.2f}"
            if not halved and test.p is not None:
                test.verdict = "refuted"
                test.p, test.p_other = 1.0, 0.0  # a count, not an estimate: no chance in it
    return Verdicts(claim, {claim.measure: test}, len(per_seed), where_cell(results, claim), ratios=per_seed, note=note)


def evaluate_claims(args, name, experiment):
    """Every claim's verdicts from the kept results of `experiment`, with Holm's correction applied per column:
    kNN top-1 over the accuracy claims, the linear probe over them, 1-NN over those that report it, and the
    instruments' measures over the measured claims. Returns (accuracy verdicts, measured verdicts, results)."""
    by_label = {row.label: row for row in experiment.rows}
    results = {label: row_results(args, name, experiment, row) for label, row in by_label.items()}
    accuracy = [evaluate_accuracy_claim(results, claim) for claim in ACCURACY_CLAIMS]
    measured = [evaluate_measured_claim(results, claim) for claim in MEASURED_CLAIMS]
    for later in (False, True):  # the claims fixed before the runs, and those added later: each a family of its own
        for metric in METRIC_NAMES:
            apply_holm([v.tests[metric] for v in family(accuracy, later) if metric in v.tests])
        apply_holm([v.tests[v.claim.measure] for v in family(measured, later)])
    return accuracy, measured, results


def family(verdicts, later=False):
    """The verdicts of the claims fixed before the runs, or (later=True) of those added later: two Holm families."""
    return [v for v in verdicts if v.claim.added_later == later]


# ----------------------------------------------------------------------------------------
# docs/claims.md
# ----------------------------------------------------------------------------------------


def count_verdicts(tests):
    """'4 confirmed, 1 refuted, 10 not seen at this scale, 8 not yet measured' for a column of tests."""
    kinds = {"confirmed": 0, "refuted": 0, "not seen at this scale": 0, NOT_YET: 0}
    for test in tests:
        kinds[next(k for k in kinds if test.verdict.startswith(k))] += 1
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items())


def count_holm(tests):
    """'3 confirmed, 1 refuted, 11 not seen' after Holm's correction, over the claims measured so far."""
    kinds = {"confirmed": 0, "refuted": 0, "not seen": 0}
    for test in tests:
        if not test.holm.startswith(NOT_YET):
            kinds[test.holm] += 1
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items())


def holm_changes(verdicts, key):
    """The claims whose verdict Holm's correction turns to 'not seen', for the sentence that says so."""
    return [
        v.claim.text
        for v in verdicts
        if key(v) in v.tests
        and v.tests[key(v)].verdict.split(" and ")[0] in ("confirmed", "refuted")
        and v.tests[key(v)].holm == "not seen"
    ]


def holm_sentence(knn, linear, instruments, knn_lost):
    """What Holm's correction changes, in one sentence: how many of each column's confirmations and
    refutations survive it, and which kNN verdicts (the primary metric's) it turns to not seen."""

    def survive(tests):
        decided = [t for t in tests if t.verdict.startswith(("confirmed", "refuted"))]
        kept = [t for t in decided if t.holm in ("confirmed", "refuted")]
        return f"{len(kept)} of {len(decided)}"

    lost = f" (it turns to not seen: {'; '.join(knn_lost)})" if knn_lost else ""
    return (
        f"What it changes here: of the confirmations and refutations, {survive(knn)} survive it in kNN{lost}, "
        f"{survive(linear)} in the linear probe and {survive(instruments)} among the measured claims."
    )


def added_later_paragraph(accuracy, measured, name):
    """What the claims marked (added later) are, why they were added, and their verdicts: a family of their own.
    They were chosen knowing the laptop rows' results, before any run of another scale (name: the experiment)."""
    later = family(accuracy, later=True)
    later_measured = [v.tests[v.claim.measure] for v in family(measured, later=True)]
    if not later and not later_measured:
        return []
    knn, linear = [v.tests["knn_top1"] for v in later], [v.tests["linear_top1"] for v in later]
    return [
        f"**Claims added later.** {len(later)} accuracy claims and {len(later_measured)} measured claims, marked "
        "*(added later)*, were added on 2026-12-07, after the results of "
        + ("the rows they read" if name == "laptop" else "the laptop rows (before any run of this scale)")
        + " were known, where the claims fixed before did not test the paper's own words: Sec. 7's \"all SSL "
        'frameworks drop dramatically" and Fig. 6(b)\'s projector-only EMA doing "much better than baselines" at β '
        f'{BETA_AGGRESSIVE}; Fig. 5 on the run the paper recorded its gradients on ("the case shown in Fig. 2 with '
        "β = 0\", the 2-wide projector; the claims fixed before read the preset's projector); and the online "
        "network's drift (the paper: \"the weight of the online network is much more stable\"; the target's "
        "drift, which the claims fixed before read, is smaller by construction, an EMA averaging the online "
        "network's steps). Chosen with the results in view, they are exploratory: Holm's correction takes them as "
        "a family of their own, and the counts above leave them out. kNN top-1: "
        f"{count_verdicts(knn)}; after Holm: {count_holm(knn)}. Linear probe: {count_verdicts(linear)}; after "
        f"Holm: {count_holm(linear)}. Measured: {count_verdicts(later_measured)}; after Holm: "
        f"{count_holm(later_measured)}.",
        "",
    ]


def steps_per_run(results, epochs):
    """(steps per run, steps per epoch) of the scale, from the last metrics line of any finished kept run."""
    for found in results.values():
        for metrics, *_ in found.values():
            if metrics.get("epoch") == epochs and metrics.get("step"):
                return metrics["step"], metrics["step"] // epochs
    return None, None


def lag(beta):
    """How many steps an EMA target lags behind the online network: 1 / (1 - beta), the mean age of the weights
    it averages (their weights fall off as beta^age)."""
    return 1.0 / (1.0 - beta)


def beta_lines(results, epochs):
    """What the two betas mean at this scale and in the paper's run, computed from the lag formula."""
    steps, per_epoch = steps_per_run(results, epochs)
    gentle, harsh = float(BETA_GENTLE), float(BETA_AGGRESSIVE)
    paper_steps = PAPER_EPOCHS * PAPER_STEPS_PER_EPOCH
    if steps is None:
        return ["How long a run is at this scale is not yet known (no finished run kept), so neither is the lag."]
    share = lag(gentle) / steps
    paper_equivalent = 1 - 1 / (share * paper_steps)
    moved = 1 - harsh**steps  # how far an EMA of a fixed online network gets from its start in one run
    beyond = paper_equivalent > harsh
    regime = (
        f"beyond the paper's aggressive {BETA_AGGRESSIVE} (lag {lag(harsh):,.0f} steps, "
        f"{100 * lag(harsh) / paper_steps:.1f} % of its run): at this scale the presets' β is already in the "
        "paper's aggressive regime"
        if beyond
        else f"gentler than the paper's aggressive {BETA_AGGRESSIVE} (lag {lag(harsh):,.0f} steps, "
        f"{100 * lag(harsh) / paper_steps:.1f} % of its run)"
    )
    return [
        f"**What the betas mean.** An EMA target lags the online network by lag = 1 / (1 − β) steps (the mean age "
        f"of the weights it averages). A run here has {steps:,} steps ({epochs} epochs of {per_epoch}). The "
        f"presets' β = {BETA_GENTLE} lags {lag(gentle):,.0f} steps, {100 * share:.0f} % of the run; the same "
        f"share of the paper's run ({PAPER_EPOCHS} epochs × {PAPER_STEPS_PER_EPOCH} steps = {paper_steps:,} steps) "
        f"is a lag of {share * paper_steps:,.0f} steps, β = 1 − 1 / {share * paper_steps:,.0f} ≈ "
        f"{paper_equivalent:.4f}, {regime}. β = {BETA_AGGRESSIVE} here lags {lag(harsh):,.0f} steps, "
        f"{lag(harsh) / steps:.1f} runs: over the whole run its target moves 1 − {BETA_AGGRESSIVE}^{steps:,} = "
        f"{100 * moved:.0f} % of the way from its start (were the online network to stand still). It was chosen "
        f"because its lag is {lag(harsh) / lag(gentle):.0f} × the preset's, the ratio of the paper's two betas.",
    ]


def drop_summary(results, method, stages, metric):
    """Per seed, acc(gentle beta) - acc(aggressive beta) of one method's row with EMA on `stages`."""
    gentle = f"{method}: EMA all (classic)" if stages == "all" else f"{method}: EMA projector"
    harsh = f"{method}: EMA {stages} at beta {BETA_AGGRESSIVE}"
    return paired(values(results[gentle], metric), values(results[harsh], metric))


def monitor_cell(found):
    spread = summarise(values(found, "output_spread").values())
    rank = summarise(values(found, "feature_rank").values())
    return f"{fmt(None if spread is None else spread.mean)} / {'-' if rank is None else f'{rank.mean:.1f}'}"


def mean_cell(found, metric):
    return show_mean(summarise(values(found, metric).values()))


def write_claims(args, name, experiment):
    """docs/claims.md (or claims-gpu.md): every claim with its paired difference, interval, p-value and verdict
    in kNN top-1 and in the linear probe side by side, Holm's column beside each, then the sections that say
    how the margin, the betas, the instruments and the times were read; and its forest plot and the page of
    where each kept run ran."""
    accuracy, measured, results = evaluate_claims(args, name, experiment)
    out = Path(args.claims_out)
    figure = out.parent / "figures" / f"{out.stem}-forest.png"
    drawn = write_forest_plot(accuracy, measured, figure)
    fixed = family(accuracy)  # the claims fixed before the runs (the counts below)
    knn = [v.tests["knn_top1"] for v in fixed]
    linear = [v.tests["linear_top1"] for v in fixed]
    instruments = [v.tests[v.claim.measure] for v in family(measured)]
    knn_lost = holm_changes(fixed, lambda v: "knn_top1")
    width = "full-width" if name == "full-width" else "quarter-width"
    lines = [
        f"# The paper's claims at the {'full-width (GPU)' if name == 'full-width' else 'laptop'} scale",
        "",
        f"Written by `python tools/reproduce.py claims{' --scale full' if name == 'full-width' else ''} --table` "
        f"from the kept results of the {name} experiment (docs/results/{name}/), in seconds and without torch. "
        f"{scale_line(args, experiment)} {experiment.title}. The paper's numbers come from 200 epochs of a "
        f"full-width ResNet-18 on CIFAR-100; ours from {args.epochs} epochs of a {width} one on CIFAR-10.",
        "",
        "**How a claim is tested.** Each claim compares two sides, paired by seed (the runs of one seed share the "
        "initialisation and the data order): a side is a row, or the difference of two rows (a drop, a gap). "
        "Accuracy claims are judged in kNN top-1 (weighted, k = 200, on the test split), the primary metric, "
        "fixed before the claims' runs, and beside it in the online linear probe's top-1, the paper's own "
        "metric. Per claim: the mean of a − b over the seeds with its 95 % confidence interval (Student's t with "
        "n − 1 degrees of freedom), and the one-sided p-value in the paper's direction. *higher* / *lower*: "
        "**confirmed** when that p is below 0.025, i.e. the two-sided 95 % interval leaves 0 out on the paper's "
        "side; **refuted** when the interval leaves 0 out on the other side. *comparable or preferable* "
        "(projector-only against full EMA): tested one-sided as the paper words it: **confirmed** when the "
        'one-sided 95 % lower bound of a − b lies above −margin (p of "a − b > −margin" below 0.05), **and '
        "better** when the two-sided 95 % interval lies above 0, **refuted** when the one-sided 95 % upper bound "
        "lies below −margin (the margin: below). Otherwise **not seen at this scale**. Measured claims "
        "(gradients, drift, jumps, time) are ratios, tested on their logarithm in the same way (a ratio above 1 "
        "is a log ratio above 0) and shown as the geometric mean over the seeds with its interval.",
        "",
        f"**Many tests at once.** With this many claims, some verdicts would come by chance alone: if none of "
        f"the {len(knn)} accuracy claims fixed before the runs held, tests at 2.5 % per side (5 % for the "
        f"comparable-or-preferable ones) would still confirm or refute about "
        f"{sum(2 * test.level for test in knn):.1f} of them in each metric. "
        "The Holm column corrects for that (Holm's step-down adjustment of the p-values, each column separately: "
        "kNN, the linear probe, 1-NN, the instruments; a claim not yet measured counts with p = 1; every verdict "
        "at 2.5 % per side, the comparable-or-preferable ones too): a verdict that survives it keeps the chance of "
        f"any wrong verdict in its column at or below 5 %. {holm_sentence(knn, linear, instruments, knn_lost)}",
        "",
        f"**Counts** of the claims fixed before the runs. kNN top-1 (primary), {len(knn)} accuracy claims: "
        f"{count_verdicts(knn)}; after Holm: "
        f"{count_holm(knn)}. Linear probe: {count_verdicts(linear)}; after Holm: {count_holm(linear)}. "
        f"Instruments, {len(instruments)} measured claims: {count_verdicts(instruments)}; after Holm: "
        f"{count_holm(instruments)}.",
        "",
        *added_later_paragraph(accuracy, measured, name),
    ]
    if drawn:
        lines += [
            f"![Each claim's paired difference with its 95 % interval, kNN and linear probe; the paper's side "
            f"shaded](figures/{figure.name})",
            "",
        ]
    lines += accuracy_table(accuracy)
    lines += close_section(accuracy, results)
    lines += collapse_section(accuracy, results)
    lines += beta_section(accuracy, results, args.epochs)
    lines += stability_section(measured, accuracy, results, out.parent if name == "laptop" else None)
    lines += time_section(measured, results)
    lines += [
        "## Where the runs ran",
        "",
        "Each row's last column names the code revisions, devices and CPU models of its runs; a row whose runs "
        "ran on two CPU models is flagged (MIXED CPUS), and so is each seed whose paired runs did (their float "
        "results round differently and their times do not compare). Every kept run, row by row and seed by "
        "seed: [provenance.md](provenance.md).",
    ]
    write_text(out, lines)
    write_provenance(args, out.parent / "provenance.md")


def accuracy_table(accuracy):
    lines = [
        "## The claims in accuracy: kNN top-1 and the online linear probe, side by side",
        "",
        "a − b: the paired mean difference in points with its 95 % interval; p: one-sided, in the paper's "
        "direction; Holm: the verdict after the correction over the column.",
        "",
        *table_head(
            [
                "claim",
                "paper",
                "a",
                "b",
                "paper's direction",
                "seeds",
                "kNN: a − b [95 % CI]",
                "kNN: p",
                "kNN: verdict",
                "kNN: Holm",
                "linear: a − b [95 % CI]",
                "linear: p",
                "linear: verdict",
                "linear: Holm",
                "code, device, CPU",
            ]
        ),
    ]
    for v in accuracy:
        claim = v.claim
        if claim.direction == "close":
            direction = "a − b > −margin, one-sided" + ("" if v.margin is None else f" (margin {v.margin:.2f})")
        else:
            direction = {"higher": "a > b", "lower": "a < b"}[claim.direction]
        cells = [claim.text, claim.paper, show_side(claim.a), show_side(claim.b), direction, v.seeds]
        for metric in ("knn_top1", "linear_top1"):
            test = v.tests[metric]
            cells += [show_difference(test.summary), show_p(test.p), test.verdict, test.holm]
        lines.append(table_row(cells + [v.provenance]))
    return lines + [""]


def close_section(accuracy, results):
    close = [v for v in accuracy if v.claim.direction == "close"]
    lines = [
        "## Comparable or preferable: the margin, and what other margins say",
        "",
        f"The paper calls projector-only EMA comparable to full EMA up to BYOL's gap in Table 3 "
        f"({PAPER_BYOL_FULL_EMA} and {PAPER_BYOL_PROJECTOR_EMA}: {PAPER_BYOL_FULL_EMA - PAPER_BYOL_PROJECTOR_EMA:.2f} "
        f"points), the largest gap of Table 3. That is {100 * CLOSE_FRACTION:.1f} % of what BYOL's training adds "
        f"over a fixed random encoder (Table 2's {PAPER_RANDOM_ENCODER} -> Table 1's {PAPER_BYOL_FULL_EMA}, "
        f"{PAPER_BYOL_FULL_EMA - PAPER_RANDOM_ENCODER:.1f} points). Each method's margin here is the same fraction "
        "of what its own full-EMA row adds in kNN top-1 over the random backbone of the same seed, mean over the "
        "seeds. The kNN margin serves the linear probe's column too: the random backbone's linear top-1 is an "
        "offline probe of 100 epochs on frozen features, the trained rows' an online probe trained along with "
        f"them, so their difference is no measure of what training adds{probe_note(close, results)}. The last "
        f"columns: the verdict at fixed margins of {', '.join(f'{m:g}' for m in FIXED_MARGINS)} points instead.",
        "",
        *table_head(
            [
                "claim",
                "metric",
                "full EMA above random (kNN) [95 % CI]",
                "margin",
                "a − b [95 % CI]",
                "one-sided 95 % bounds",
                "verdict",
                *[f"at {m:g} point{'s' if m != 1 else ''}" for m in FIXED_MARGINS],
            ]
        ),
    ]
    for v in close:
        gain = paired(values(results[v.claim.b], "knn_top1"), values(results[RANDOM], "knn_top1"))
        for metric in ("knn_top1", "linear_top1"):
            test = v.tests[metric]
            s = test.summary
            bounds = "-"
            if s is not None and s.sd is not None:
                half = student_t_quantile(0.95, s.n - 1) * s.sd / math.sqrt(s.n)
                bounds = f"above {s.mean - half:+.2f}, below {s.mean + half:+.2f}"
            at_fixed = [verdict(s, "close", m) for m in FIXED_MARGINS]
            lines.append(
                table_row(
                    [
                        v.claim.text,
                        METRIC_NAMES[metric],
                        show_difference(gain),
                        fmt(v.margin),
                        show_difference(s),
                        bounds,
                        test.verdict,
                        *at_fixed,
                    ]
                )
            )
    return lines + [""]


def probe_note(close, results):
    """' (here the full-EMA rows of BYOL and ReSSL end below it)': the rows whose online probe ends below the random
    backbone's offline probe, mean over the seeds; '' if none does."""
    random = summarise(values(results[RANDOM], "linear_top1").values())
    below = []
    for v in close:
        full = summarise(values(results[v.claim.b], "linear_top1").values())
        if random is not None and full is not None and full.mean < random.mean:
            below.append(v.claim.b)
    return (
        f" (here {', '.join(below)} end{'s' if len(below) == 1 else ''} below it in the linear probe)" if below else ""
    )


def collapse_section(accuracy, results):
    monitored = [v for v in accuracy if v.claim.monitor]
    lines = [
        "## Without EMA (Table 1): the collapse monitor beside the verdict",
        "",
        "Table 1 compares each method without EMA with its own EMA baseline, and so do these claims. The "
        "mechanism the paper names, collapse, is what the collapse monitor measures at the last epoch: the output "
        "spread (1: the projector's outputs spread out, 0: all the same) and the effective rank of the backbone's "
        "features (how many dimensions they use), mean over the seeds.",
        "",
        *table_head(
            [
                "claim",
                "without EMA: spread / rank",
                "with EMA: spread / rank",
                "kNN: a − b [95 % CI]",
                "kNN verdict",
                "linear: a − b [95 % CI]",
                "linear verdict",
            ]
        ),
    ]
    for v in monitored:
        lines.append(
            table_row(
                [
                    v.claim.text,
                    monitor_cell(results[v.claim.a]),
                    monitor_cell(results[v.claim.b]),
                    show_difference(v.tests["knn_top1"].summary),
                    v.tests["knn_top1"].verdict,
                    show_difference(v.tests["linear_top1"].summary),
                    v.tests["linear_top1"].verdict,
                ]
            )
        )
    return lines + [""]


def beta_section(accuracy, results, epochs):
    beta_claims = {
        v.claim.a[0].split(":")[0]: v for v in accuracy if isinstance(v.claim.a, tuple) and "beta" in v.claim.text
    }
    lines = [
        f"## The beta claim (Sec. 7, Table 6, Fig. 6): from β {BETA_GENTLE} to {BETA_AGGRESSIVE}",
        "",
        f"The paper: with the aggressive β = {BETA_AGGRESSIVE}, full EMA drops sharply and projector-only EMA "
        'barely moves; its method "is less sensitive to the change of β compared to baselines" (Table 6). The '
        f"claim per method: drop = accuracy at β {BETA_GENTLE} (the rows `<method>: EMA all (classic)` and "
        f"`<method>: EMA projector`) minus accuracy at β {BETA_AGGRESSIVE}, per seed, and drop(full EMA) − "
        "drop(projector-only EMA) > 0, paired by seed. The paper's drops, Sec. 7 on CIFAR-100 (full / "
        "projector-only): "
        + ", ".join(
            f"{n['name']} {n['full'][0] - n['full'][1]:.2f} / {n['projector drop']:.2f}" for n in BETA_PAPER.values()
        )
        + "; Table 6 on ImageNet-100: "
        + ", ".join(f"{n['name']} {n['table 6'][0]:+.2f} / {n['table 6'][1]:+.2f}" for n in BETA_PAPER.values())
        + ".",
        "",
        *beta_lines(results, epochs),
        "",
        *table_head(
            [
                "method",
                "metric",
                "drop, full EMA [95 % CI]",
                "drop, projector-only EMA [95 % CI]",
                "difference of the drops [95 % CI]",
                "verdict",
                "paper's drops, Sec. 7 (CIFAR-100)",
            ]
        ),
    ]
    for method, numbers in BETA_PAPER.items():
        v = beta_claims.get(method)
        for metric in ("knn_top1", "linear_top1"):
            test = v.tests[metric] if v else None
            lines.append(
                table_row(
                    [
                        numbers["name"],
                        METRIC_NAMES[metric],
                        show_difference(drop_summary(results, method, "all", metric)),
                        show_difference(drop_summary(results, method, "projector", metric)),
                        show_difference(test.summary if test else None),
                        test.verdict if test else NOT_YET,
                        f"{numbers['full'][0] - numbers['full'][1]:.2f} / {numbers['projector drop']:.2f}",
                    ]
                )
            )
    return lines + [""]


def measured_table(measured):
    lines = table_head(
        [
            "claim",
            "paper",
            "a",
            "b",
            "measure (a ratio)",
            "paper's direction",
            "seeds",
            "per seed",
            "ratio [95 % CI]",
            "p",
            "verdict",
            "Holm",
            "code, device, CPU",
        ]
    )
    for v in measured:
        claim, test = v.claim, v.tests[v.claim.measure]
        direction = "ratio > 1" if claim.direction == "higher" else "ratio < 1"
        per_seed = ", ".join(f"{v.ratios[s]:.2f}" for s in sorted(v.ratios)) or "-"
        measure = claim.measure + ("" if claim.b is None else ", a / b") + (f"; {v.note}" if v.note else "")
        lines.append(
            table_row(
                [
                    claim.text,
                    claim.paper,
                    claim.a,
                    show_side(claim.b),
                    measure,
                    direction,
                    v.seeds,
                    per_seed,
                    show_ratio(test.summary),
                    show_p(test.p),
                    test.verdict,
                    test.holm,
                    v.provenance,
                ]
            )
        )
    return lines + [""]


def stability_section(measured, accuracy, results, docs=None):
    not_time = [v for v in measured if v.claim.measure != "median epoch time"]
    lines = [
        "## The stability thesis: gradients, the target's drift, FC2's jumps (Fig. 2, 3, 5; Tables 2, 7, C.8)",
        "",
        'The paper\'s thesis: the EMA helps "at least partly" through stability; the final stages fluctuate '
        "most, so EMA matters most there. What is measured, each definition fixed before any of its runs was "
        "looked at:",
        "",
        "- **Gradient magnitude** (Fig. 5, `--log-grad-norms`): the l∞ norm of the loss's gradient with respect "
        "to each stage's output, every step; a stage's magnitude is its mean over the steps.",
        "- **Fluctuation** of a stage: the mean over consecutive steps of |ln g_t − ln g_(t−1)|, g_t its l∞ "
        'gradient norm at step t. It reads Fig. 5\'s "most fluctuated" as the figure draws it, on a log scale: '
        "how much the curve jumps from one step to the next. Being scale-free, it does not call a stage "
        "fluctuating for having larger gradients (the projector's are); comparing each step with the one "
        "before, it leaves out a slow trend over training. The coefficient of variation over all steps counts "
        "both, which is why it was not chosen. (The paper's sentence ties the two, \"the projector has the most "
        'significance and is most fluctuated"; read as the absolute size of the changes, the stage with the '
        "largest gradients fluctuates most by that alone. That reading is not tested here.) Claims, per seed: the "
        "projector's fluctuation over the largest of "
        "the other five stages' > 1 (\"the projector fluctuates most\"), and the largest of blocks 1-3's over "
        "the smallest of conv1's, block4's and the projector's < 1 (\"blocks 1-3 fluctuate least\"), on BYOL "
        "without EMA (the paper's setting, β 0) and with EMA on the projector and on every stage, so that the "
        "table says whether the EMA changes the online network's fluctuation. The stability run without EMA "
        "repeats the first row's training seed for seed (the drift instrument changes no weight), so its "
        "verdicts are no second piece of evidence.",
        "- **The target's drift** (`--log-target-drift`): after each step, how far the target's output moved "
        "on a fixed batch of 64 training images, the mean of ||z_t/|z_t| − z_(t−1)/|z_(t−1)|||, and the same "
        "for the online network; a run's drift is the mean over its steps. Without EMA the target is the online "
        "network.",
        "- **FC2's jumps** (Table 2's 2-wide projector, `--track-weights`): d_t = the mean over the tracked rows "
        "of FC2 (the projector's last layer, 2 -> 256) of ||w_t − w_(t−1)||₂, the online rows (the paper: with "
        'EMA "the weight of the online network is much more stable"), and jump = max_t d_t / median_t d_t: '
        "a spike such as Fig. 2's \"abnormal point\" against the run's typical step." + jump_caveat(results),
        "",
        *measured_table(not_time),
    ]
    lines += stability_verdicts(not_time, accuracy)
    lines += fluctuation_table(results)
    lines += drift_table(results)
    lines += two_wide_table(accuracy, results)
    if docs is not None:  # Fig. 2's picture, drawn by tools/plot.py from the same kept results
        command = 'python tools/plot.py --kept "byol 2-wide projector" --only weights --out docs/figures/laptop'
        drawn = (docs / "figures" / "laptop" / "weights-3d.png").exists()
        lines += [
            f"FC2's trajectories (Fig. 2, seed 0), from the kept results: `{command}`"
            + (":" if drawn else " (once the rows are kept)."),
            "",
        ]
        if drawn:
            lines += ["![FC2's rows against the step, without EMA and with it](figures/laptop/weights-3d.png)", ""]
    lines += [
        "Table C.8 and Table 7 are claims of the accuracy table above. Table 7's paper row freezes the target "
        "projector (β = 1) at learning rates 1.0 and 4.0; ours use projector-only EMA at the preset's β "
        f"{BETA_GENTLE}, at the preset's learning rate and at four times it (the rows `byol: EMA all at lr x4` and "
        "`byol: EMA projector at lr x4`): the claim is that projector-only EMA's gap to full EMA grows with the "
        "learning rate.",
        "",
    ]
    return lines


def jump_caveat(results):
    """A sentence on where the kept runs took their largest FC2 step, once there are any."""
    first, total, warmup = largest_steps_in_the_first_epoch(results)
    if not total:
        return ""
    sentence = f" Where it fell, found after the runs: in {first} of the {total} runs the largest step came in the "
    sentence += "first epoch" + (", the learning rate's warm-up" if warmup else "")
    if first > total / 2:
        sentence += (
            ", and so the measure reads how a run starts more than a spike in mid-training such as the paper's "
            '("at step around 10k out of 40k")'
        )
    return sentence + "."


def stability_verdicts(instrument_claims, accuracy):
    """Which of the paper's stability claims hold at this scale: one line per claim, its verdict and Holm's,
    from the same tests as the tables (kNN top-1 for the accuracy claims of Tables 2, 7 and C.8)."""
    lines = ["**Which stability claims hold at this scale** (verdict; after Holm):", ""]
    for v in instrument_claims:
        test = v.tests[v.claim.measure]
        lines.append(
            f"- {v.claim.text}: **{test.verdict}**; {test.holm} ({v.claim.measure}, a / b = "
            f"{show_ratio(test.summary)}, {v.seeds} seeds)"
        )
    for v in accuracy:
        if v.claim.paper.startswith(("Table 2", "Table 7", "Table C.8")):
            test = v.tests["knn_top1"]
            lines.append(
                f"- {v.claim.text}: **{test.verdict}**; {test.holm} (kNN top-1, a − b = "
                f"{show_difference(test.summary)} points, {v.seeds} seeds)"
            )
    return lines + [""]


def fluctuation_table(results):
    lines = [
        "The fluctuation of each stage (mean over the seeds), and the projector's fluctuation with EMA against "
        "without it, paired by seed (a ratio, geometric mean [95 % CI]; no claim of the paper: it shows whether "
        "the EMA changes the online network's fluctuation):",
        "",
        *table_head(["row", "seeds", *STAGES, "projector: against no EMA, paired"]),
    ]
    baseline = results[STABILITY_ROWS["none"]]
    for label in GRADIENT_ROWS:
        found = results[label]
        per_seed = {seed: stage_fluctuations(run.directory) for seed, run in found.items()}
        per_seed = {seed: f for seed, f in per_seed.items() if f and None not in f.values()}
        means = [summarise([f[stage] for f in per_seed.values()]) for stage in STAGES]
        against = "-"
        if label in (STABILITY_ROWS["projector"], STABILITY_ROWS["all"]):
            ratio = ratios(found, baseline, lambda run: stage_fluctuations(run.directory).get("projector"))
            against = show_ratio(summarise([math.log(r) for r in ratio.values()]))
        lines.append(table_row([label, len(per_seed), *[fmt(m.mean if m else None) for m in means], against]))
    return lines + [""]


def drift_table(results):
    lines = [
        "The target's and the online network's drift per step (mean over the steps, then mean ± sd over the "
        "seeds), beside the accuracy each row comes with:",
        "",
        *table_head(["row", "seeds", "target drift per step", "online drift per step", "kNN top-1", "linear top-1"]),
    ]
    for stages, label in STABILITY_ROWS.items():
        found = results[label]
        target = summarise([mean_drift(run.directory, "target") for run in found.values()])
        online = summarise([mean_drift(run.directory, "online") for run in found.values()])
        lines.append(
            table_row(
                [
                    label,
                    len(found),
                    show_mean(target),
                    show_mean(online),
                    mean_cell(found, "knn_top1"),
                    mean_cell(found, "linear_top1"),
                ]
            )
        )
    return lines + [""]


def two_wide_table(accuracy, results):
    table2 = [v for v in accuracy if "knn1_top1" in v.tests]
    lines = [
        "Table 2's rows (BYOL with a 2-wide FC2; EMA on the projector, which holds FC1 as well as FC2): accuracy "
        "in the three metrics and FC2's jump, mean ± sd over the seeds, and the claims \"EMA on FC2 raises "
        'linear and 1-NN accuracy" in 1-NN top-1 too (Holm over the 1-NN column):',
        "",
        *table_head(["row", "seeds", "kNN top-1", "linear top-1", "1-NN top-1", "jump", "paper: top-1 / KNN-1"]),
    ]
    papers = {"none": "20.01 / 10.01", "0.9": "25.76 / 14.17", "0.99": "22.63 / 12.56"}
    for beta, label in TWO_WIDE_ROWS.items():
        found = results[label]
        jumps = summarise([jump(read_lines(run.directory / "weights.jsonl")) for run in found.values()])
        lines.append(
            table_row(
                [
                    label,
                    len(found),
                    mean_cell(found, "knn_top1"),
                    mean_cell(found, "linear_top1"),
                    mean_cell(found, "knn1_top1"),
                    show_mean(jumps),
                    papers[beta],
                ]
            )
        )
    lines += ["", *table_head(["claim", "1-NN: a − b [95 % CI]", "1-NN: p", "1-NN: verdict", "1-NN: Holm"])]
    for v in table2:
        test = v.tests["knn1_top1"]
        lines.append(table_row([v.claim.text, show_difference(test.summary), show_p(test.p), test.verdict, test.holm]))
    return lines + [""]


def time_section(measured, results):
    timed = [v for v in measured if v.claim.measure == "median epoch time"]
    lines = [
        "## Time (Table 4): median epoch times",
        "",
        "Each run's time is its median epoch time (epoch_seconds over its metrics.jsonl lines), the same rule for "
        "both sides of the pair: other work on the machine slows some epochs, and the median follows the "
        "epochs that ran undisturbed, where a sum takes the slowed ones in full. The ratio is taken per seed; a "
        "seed whose pair ran on two CPU models is named in the last column.",
        "",
        *measured_table(timed),
    ]
    for v in timed:
        for label in labels_of(v.claim.a) + labels_of(v.claim.b):
            found = results[label]
            medians = ", ".join(
                f"seed {s}: {median_epoch_seconds(run.history):.1f} s"
                for s, run in sorted(found.items())
                if run.history
            )
            lines.append(f"- {label}: median epoch {medians or '-'}")
    return lines + [""]


# ----------------------------------------------------------------------------------------
# The forest plot: every claim's paired difference (or ratio) with its interval, in one picture
# ----------------------------------------------------------------------------------------


def write_forest_plot(accuracy, measured, path):
    """docs/figures/claims-forest.png: one row per claim; left, the accuracy claims' paired difference a - b in
    points with its 95 % interval, kNN and the linear probe; right, the measured claims' ratio on a log scale.
    The paper's side of each row is shaded (for "comparable or preferable": above -margin). Returns the path,
    or None when matplotlib is not installed (the table does not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no forest plot (pip install matplotlib)")
        return None
    colours = {"knn_top1": "tab:blue", "linear_top1": "tab:orange"}
    height = 0.32 * (len(accuracy) + len(measured)) + 2.5
    figure, (left, right) = plt.subplots(
        2, 1, figsize=(11, height), gridspec_kw={"height_ratios": [len(accuracy), max(1, len(measured))]}
    )
    for y, v in enumerate(reversed(accuracy)):
        for offset, metric in zip((0.15, -0.15), ("knn_top1", "linear_top1")):
            draw_interval(left, y + offset, v.tests[metric].summary, colours[metric], lambda x: x)
    left.axvline(0, color="black", lw=0.8)
    for y, v in enumerate(reversed(accuracy)):  # now that the points have set the axis's limits
        shade_paper_side(left, y, v.claim.direction, -(v.margin or 0.0) if v.claim.direction == "close" else 0.0)
        if all(test.summary is None for test in v.tests.values()):
            label_unmeasured(left, y)
    left.set_yticks(range(len(accuracy)), [short(v.claim.text) for v in reversed(accuracy)], fontsize=7)
    left.set_xlabel("a − b, points (paired by seed; 95 % interval)")
    left.set_title("Accuracy claims: kNN top-1 (blue) and linear probe (orange); the paper's side shaded", fontsize=9)
    right.set_xscale("log")
    for y, v in enumerate(reversed(measured)):
        draw_interval(right, y, v.tests[v.claim.measure].summary, "black", math.exp)
    right.axvline(1, color="black", lw=0.8)
    plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")  # 0.5, 2: not 5 x 10^-1
    right.xaxis.set_major_formatter(plain)
    right.xaxis.set_minor_formatter(plain)
    right.tick_params(axis="x", which="minor", labelsize=6)
    for y, v in enumerate(reversed(measured)):
        shade_paper_side(right, y, v.claim.direction, 1.0)
        if v.tests[v.claim.measure].summary is None:
            label_unmeasured(right, y)
    right.set_yticks(range(len(measured)), [short(v.claim.text) for v in reversed(measured)], fontsize=7)
    right.set_xlabel("ratio (geometric mean over the seeds; 95 % interval; log scale)")
    right.set_title("Measured claims: gradients, fluctuation, drift, jumps, time", fontsize=9)
    for axis in (left, right):
        axis.grid(axis="x", alpha=0.3)
        axis.set_ylim(-0.6, axis.get_ylim()[1])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")
    return path


def label_unmeasured(axis, y):
    """Say on an empty row that its runs are not kept yet (rather than leave a reader to guess)."""
    axis.text(
        0.5,
        y,
        "not yet measured",
        transform=axis.get_yaxis_transform(),
        ha="center",
        va="center",
        fontsize=6,
        color="grey",
    )


def short(text, most=70):
    return text if len(text) <= most else text[: most - 1] + "…"


def shade_paper_side(axis, y, direction, threshold):
    """Shade the band of row y on the side of `threshold` that the paper found, to the edge of the axis (whose
    limits are set by then); the limits stay as they were."""
    low, high = axis.get_xlim()
    side = (threshold, high) if direction in ("higher", "close") else (low, threshold)
    axis.fill_betweenx([y - 0.45, y + 0.45], *side, color="tab:green", alpha=0.12, lw=0)
    axis.set_xlim(low, high)


def draw_interval(axis, y, summary, colour, scale):
    """A point at the mean and a line over the 95 % interval (a point alone for one seed); scale maps the
    summary's numbers to the axis (math.exp: log ratios to ratios)."""
    if summary is None:
        return
    if summary.low is not None:
        axis.plot([scale(summary.low), scale(summary.high)], [y, y], color=colour, lw=1.5)
    axis.plot([scale(summary.mean)], [y], "o", color=colour, ms=4)


# ----------------------------------------------------------------------------------------
# docs/provenance.md: where each kept run ran
# ----------------------------------------------------------------------------------------


def label_of(group, directory_name):
    """A kept row's label from its directory name, where its experiment still has that row; else the name."""
    experiment = EXPERIMENTS.get(group.split("/")[0])
    if experiment is not None:
        for row in experiment.rows:
            if slug(experiment, row) == directory_name:
                return row.label
    return directory_name


def where_it_ran(provenance):
    """'AMD EPYC' for a run kept before provenance recorded more; else the CPU with its vector units and the
    share of the CPU the run got (its CPU seconds over wall seconds times threads: 1.00 is all it asked for)."""
    text = cpu_of(provenance) or "?"
    units = provenance.get("cpu_vector_units")
    if units:
        text += f" ({', '.join(units)})"
    load = provenance.get("load")
    if isinstance(load, dict) and load.get("cpu_share") is not None:
        text += f", CPU share {load['cpu_share']:.2f}"
    return text


def write_provenance(args, path):
    """Every kept run under --results, row by row and seed by seed: the CPU it ran on."""
    root = Path(args.results)
    runs = {}  # group (experiment/scale) -> row -> seed -> provenance
    for file in sorted(root.glob("**/seed*/provenance.json")):
        row_directory = file.parent.parent
        group = str(row_directory.parent.relative_to(root))
        runs.setdefault(group, {}).setdefault(row_directory.name, {})[file.parent.name] = json.loads(file.read_text())
    cpus = {}
    for rows in runs.values():
        for seeds in rows.values():
            for provenance in seeds.values():
                cpus[cpu_of(provenance) or "?"] = cpus.get(cpu_of(provenance) or "?", 0) + 1
    lines = [
        "# Where each kept run ran",
        "",
        "Written by `python tools/reproduce.py claims --table` from every provenance.json under docs/results/: "
        "the CPU model each kept run ran on; for the runs kept since provenance records them, the CPU's vector "
        "units and the share of the CPU the run got (its CPU seconds over its wall seconds times its threads: "
        "1.00 is all it asked for, less when other work shared the cores). Runs kept before that name the CPU "
        'model alone: their provenance.json says `"load": null` with a note.',
        "",
        "In all: " + "; ".join(f"{count} runs on {cpu}" for cpu, count in sorted(cpus.items())) + ".",
        "",
    ]
    for group, rows in runs.items():
        seeds = sorted({seed for row in rows.values() for seed in row}, key=lambda s: int(s[4:]))
        lines += [f"## {group}", "", *table_head(["row", *[f"seed {s[4:]}" for s in seeds]])]
        for directory_name, found in sorted(rows.items(), key=lambda item: label_of(group, item[0])):
            cells = [where_it_ran(found[s]) if s in found else "-" for s in seeds]
            lines.append(table_row([label_of(group, directory_name), *cells]))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
