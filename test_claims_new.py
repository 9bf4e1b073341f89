"""Tests of the claims report (tools/experiments.py, tools/report.py, tools/reproduce.py claims, tools/plot.py
--kept): the statistics against hand-computed values, the instruments' measures on short series, verdicts from
made-up kept results with known answers, the rendered tables, the forest plot, and where every kept run ran.
Fast: no training, no torch in the report."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def tool(name):
    """A module of tools/ (reproduce, report, experiments, plot), imported for its functions."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module(name)


report = tool("report")
experiments = tool("experiments")
reproduce = tool("reproduce")


# ---------------------------------------------------------------------------------------------
# Student's t, computed in report.py
# ---------------------------------------------------------------------------------------------


def test_incomplete_beta_against_its_closed_forms():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert report.regularized_incomplete_beta(x, 1, 1) == pytest.approx(x, abs=1e-12)  # uniform
        assert report.regularized_incomplete_beta(x, 3, 1) == pytest.approx(x**3, abs=1e-12)
        assert report.regularized_incomplete_beta(x, 1, 2.5) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)
        # the symmetry the continued fraction relies on
        assert report.regularized_incomplete_beta(x, 2.5, 4) == pytest.approx(
            1 - report.regularized_incomplete_beta(1 - x, 4, 2.5), abs=1e-12
        )


def test_student_t_against_closed_forms_and_the_table():
    for t in (-30.0, -4.0, -1.0, -0.2, 0.0, 0.5, 2.0, 12.706, 100.0):
        # df 1 is the Cauchy distribution; df 2 has P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2))
        assert report.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert report.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    for p in (0.6, 0.9, 0.95, 0.975, 0.995):
        assert report.student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert report.student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert report.student_t_quantile(1 - p, 7) == pytest.approx(-report.student_t_quantile(p, 7), rel=1e-12)
    for df, printed in enumerate(report.T_975, start=1):  # the table's three decimals
        assert report.student_t_quantile(0.975, df) == pytest.approx(printed, abs=6e-4), df
    assert report.student_t_quantile(0.975, 10**6) == pytest.approx(1.959966, abs=1e-4)  # the normal's
    assert report.T_975 is reproduce.T_975  # still reachable as reproduce.T_975


def test_summaries_and_p_values_by_hand():
    s = report.summarise([1.0, 2.0, 3.0])  # mean 2, sd 1, df 2: t(0.975; 2) = 4.302653
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    half = 0.975 * 2 - 1
    half = half / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)  # the closed form of t(0.975; 2), over sqrt(3)
    assert (s.low, s.high) == pytest.approx((2 - half, 2 + half), abs=1e-9)
    # t = 2 / (1 / sqrt 3) = 2 sqrt 3; P(T >= t) with df 2 = 1/2 - t / (2 sqrt(2 + t^2))
    t = 2 * math.sqrt(3)
    assert report.p_above(s, 0.0) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert report.p_above(s, 0.0) + report.p_below(s, 0.0) == pytest.approx(1.0)
    assert report.p_above(s, 2.0) == pytest.approx(0.5)
    exact = report.summarise([5.0, 5.0, 5.0])  # seeds that agree: no spread, p 0 or 1
    assert report.p_above(exact, 4.0) == 0.0 and report.p_below(exact, 4.0) == 1.0


def test_verdicts_higher_lower_and_one_sided_close():
    sure = report.summarise([1.9, 2.0, 2.1])
    assert report.verdict(sure, "higher") == "confirmed" and report.verdict(sure, "lower") == "refuted"
    assert report.verdict(report.summarise([-1.0, 0.5, 2.0]), "higher") == "not seen at this scale"
    assert report.verdict(report.summarise([5.0]), "higher").startswith("not yet measured")
    # close, one-sided: values 0, 1, 2 have mean 1 and sd 1; the one-sided 95 % lower bound is
    # 1 - t(0.95; 2) / sqrt(3) = 1 - 2.919986 / 1.732051 = -0.6859 (the two-sided one would be -1.484)
    middling = report.summarise([0.0, 1.0, 2.0])
    bound = 1 - report.student_t_quantile(0.95, 2) / math.sqrt(3)
    assert bound == pytest.approx(-0.68586, abs=1e-4)
    assert report.verdict(middling, "close", margin=0.70) == "confirmed"
    assert report.verdict(middling, "close", margin=0.68) == "not seen at this scale"
    test = report.test_claim(middling, "close", 0.70)
    assert test.p < 0.05 < report.test_claim(middling, "close", 0.68).p and test.level == 0.05
    assert report.verdict(report.summarise([2.9, 3.0, 3.1]), "close", 0.5) == "confirmed and better"
    assert report.verdict(report.summarise([-5.1, -5.0, -4.9]), "close", 1.0) == "refuted"
    # higher / lower at 0.025 one-sided: the same as the two-sided 95 % interval leaving 0 out
    for values in ([0.1, 1.0, 2.3], [0.5, 0.6, 0.7], [-0.2, 0.9, 1.0]):
        s = report.summarise(values)
        assert (report.verdict(s, "higher") == "confirmed") == (s.low > 0)


def test_holm_against_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (monotone)
    assert report.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    # a column: two strong claims, one weak (p 0.014: times 2 in Holm's order, 0.029), one refuted, one not yet
    # measured (p = 1 in the family of 5)
    tests = [
        report.test_claim(report.summarise(v), "higher")
        for v in ([1.0, 1.1, 1.2], [0.7, 1.0, 1.3], [-3.0, -3.1, -2.9], [5.0, 5.1, 5.05], [1.0])
    ]
    report.apply_holm(tests)
    assert [t.verdict for t in tests[:4]] == ["confirmed", "confirmed", "refuted", "confirmed"]
    raw = [min(t.p, t.p_other) for t in tests[:4]] + [1.0]
    assert [t.holm_p for t in tests] == pytest.approx(report.holm(raw))
    assert tests[1].holm == "not seen" and tests[0].holm == "confirmed" and tests[2].holm == "refuted"
    assert tests[4].holm.startswith("not yet measured")


# ---------------------------------------------------------------------------------------------
# The instruments' measures on short series
# ---------------------------------------------------------------------------------------------


def test_fluctuation_by_hand():
    e = math.e
    assert report.fluctuation([1.0, e, 1.0, e**3]) == pytest.approx((1 + 1 + 3) / 3)
    assert report.fluctuation([100.0, 100 * e, 100.0, 100 * e**3]) == pytest.approx(5 / 3)  # scale-free
    assert report.fluctuation([1.0, 2.0, 4.0, 8.0]) == pytest.approx(math.log(2))  # a steady trend: each step ln 2
    assert report.fluctuation([3.0, 3.0, 3.0]) == 0.0
    assert report.fluctuation([1.0, e, 0.0, e]) == pytest.approx(1.0)  # pairs with a 0 are left out
    assert report.fluctuation([2.0]) is None and report.fluctuation([1.0, 0.0]) is None


def grad_lines(per_stage):
    """grad_norms.jsonl lines from stage -> series."""
    steps = len(next(iter(per_stage.values())))
    return [{"step": t + 1, **{stage: per_stage[stage][t] for stage in per_stage}} for t in range(steps)]


def test_fluctuation_ratios_of_a_run(tmp_path):
    e = math.e
    calm, wild = [1.0, 1.0, 1.0], [1.0, e, 1.0]  # fluctuation 0 and 1
    half = [1.0, e**0.5, 1.0]  # 0.5
    stages = {"conv1": half, "block1": calm, "block2": [1.0, e**0.25, 1.0], "block3": calm, "block4": half}
    lines = grad_lines({**stages, "projector": wild})
    (tmp_path / "grad_norms.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = report.KeptRun(metrics={}, history=[], provenance={}, directory=tmp_path)
    assert report.stage_fluctuations(tmp_path)["projector"] == pytest.approx(1.0)
    assert report.projector_over_others(run) == pytest.approx(1.0 / 0.5)  # over conv1's and block4's 0.5
    assert report.blocks_over_the_rest(run) == pytest.approx(0.25 / 0.5)  # block2's over the least of the rest


def weight_lines(moves_per_row):
    """weights.jsonl lines: each tracked row starts at (0, 0) and moves by the given (dx, dy) per step."""
    positions = [[0.0, 0.0] for _ in moves_per_row]
    lines = [{"step": 0, "online": [list(p) for p in positions], "target": [list(p) for p in positions]}]
    for step in range(len(moves_per_row[0])):
        for position, moves in zip(positions, moves_per_row):
            position[0] += moves[step][0]
            position[1] += moves[step][1]
        frozen = [[0.0, 0.0] for _ in positions]  # the target's rows: not read by the jump
        lines.append({"step": step + 1, "online": [list(p) for p in positions], "target": frozen})
    return lines


def test_jump_by_hand():
    # row A moves 1, 1, 2, 1; row B 1, 1, 6, 1 (its third step (3.6, 4.8) has length 6): d = 1, 1, 4, 1
    row_a = [(1, 0), (1, 0), (2, 0), (1, 0)]
    row_b = [(0, 1), (0, 1), (3.6, 4.8), (0, 1)]
    assert report.jump(weight_lines([row_a, row_b])) == pytest.approx(4.0 / 1.0)  # max 4 over median 1
    even = [(0.3, 0.4)] * 5  # every step 0.5: no spike
    assert report.jump(weight_lines([even])) == pytest.approx(1.0)
    assert report.jump(weight_lines([[(0, 0), (0, 0), (1, 0)]])) is None  # median step 0: no typical step


def test_median_epoch_time_ignores_the_slowed_epochs():
    history = [{"epoch_seconds": s} for s in (92.0, 93.0, 91.0, 154.0, 186.0)]
    assert report.median_epoch_seconds(history) == 93.0
    assert report.median_epoch_seconds([]) is None


def test_lag_of_the_betas():
    assert report.lag(0.99) == pytest.approx(100.0) and report.lag(0.9995) == pytest.approx(2000.0)
    lines = report.beta_lines({"row": {0: ({"epoch": 10, "step": 390}, [], {}, None)}}, 10)
    text = lines[0]
    assert "390 steps (10 epochs of 39)" in text and "lags 100 steps, 26 % of the run" in text
    assert "≈ 0.9999" in text and "lag 2,000 steps, 5.1 % of its run" in text
    assert "0.9995^390 = 18 %" in text and "20 × the preset's" in text


# ---------------------------------------------------------------------------------------------
# The claims table from made-up kept results with known answers
# ---------------------------------------------------------------------------------------------


def keep(args, name, label, seed, knn, linear=None, one_nn=None, cpu="AMD EPYC", extra=None, files=None):
    """Write made-up kept results of one run: its last metrics line and its provenance."""
    experiment = experiments.EXPERIMENTS[name]
    row = next(r for r in experiment.rows if r.label == label)
    directory = report.results_dir(args, name, experiment, row, seed)
    directory.mkdir(parents=True, exist_ok=True)
    if row.script == "linear_eval.py":
        result = {"top1": 30.0 if linear is None else linear, "knn_top1": knn, "knn1_top1": knn}
        (directory / "linear_eval.json").write_text(json.dumps(result))
    else:
        (directory / "args.json").write_text("{}")
        last = {"epoch": args.epochs, "step": 39 * args.epochs, "knn_top1": knn, "epoch_seconds": 60.0}
        last.update({"linear_top1": knn if linear is None else linear, "knn1_top1": knn if one_nn is None else one_nn})
        last.update(extra or {})
        (directory / "metrics.jsonl").write_text(json.dumps(last) + "\n")
    provenance = {"git_revision": "abc1234", "device": "cpu", "cpu": cpu, "load": None}
    (directory / "provenance.json").write_text(json.dumps(provenance))
    for file, lines in (files or {}).items():
        (directory / file).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def made_up_laptop_results(args):
    """Kept results for the claims below, three seeds each, with answers known by construction."""
    shift = [0.0, 0.4, -0.3]  # how seeds differ, shared by every row of a seed (pairing removes it)
    rows = {
        experiments.RANDOM: [28.0, 28.0, 28.0],
        "mocov2: EMA all (classic)": [40.0, 40.3, 39.8],  # 12 above random: margin 0.615
        "mocov2: EMA none": [26.0, 26.2, 25.9],  # 14 below its own baseline: collapse confirmed
        "mocov2: EMA projector": [39.8, 40.2, 39.4],  # 0.17 below on average: comparable
        "byol: EMA all (classic)": [33.0, 33.5, 33.2],
        "byol: EMA none": [34.5, 35.0, 34.8],  # above: the drop refuted
        "byol: EMA projector": [30.0, 33.5, 36.9],  # noise of 3 points: not seen
        "ressl: EMA all (classic)": [30.0, 30.1, 29.9],
        "ressl: EMA projector": [33.0, 33.2, 33.1],  # 3 above: comparable and better
        "byol: EMA all at beta 0.9995": [27.0, 27.6, 27.1],  # full EMA drops about 6
        "byol: EMA projector at beta 0.9995": [29.5, 33.0, 36.5],  # projector-only drops 0.5
    }
    for label, knn in rows.items():
        for seed, value in enumerate(knn):
            cpu = "Intel Xeon" if (label, seed) == ("byol: EMA none", 1) else "AMD EPYC"  # one pair on two CPUs
            monitor = {"output_spread": 0.05, "feature_rank": 9.0} if label == "mocov2: EMA none" else {}
            keep(args, "laptop", label, seed, value + shift[seed], cpu=cpu, extra=monitor)
    # Table 4: projector-only EMA's epochs take 0.7 of full EMA's; one full-EMA epoch slowed by other work
    for seed in range(3):
        for label, seconds in (("dino: EMA all (classic)", 100.0), ("dino: EMA projector", 70.0 + seed)):
            directory = keep(args, "laptop", label, seed, 35.0, extra={"backbone_forwards_per_image": 1.0})
            forwards = 2.0 if "all" in label else 1.0
            times = [seconds] * 9 + [seconds * (3 if seed == 0 and "all" in label else 1)]
            history = [
                {"epoch": e + 1, "step": 39 * (e + 1), "knn_top1": 35.0, "epoch_seconds": t}
                for e, t in enumerate(times)
            ]
            history[-1]["backbone_forwards_per_image"] = forwards
            (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))
    # the stability rows: the target moves a tenth as much per step with EMA on every stage
    for seed in range(3):
        for stages, target in (("none", 0.2), ("all", 0.02 + 0.001 * seed), ("projector", 0.2)):
            drift = [{"step": s, "online": 0.2, "target": target} for s in range(1, 5)]
            e = math.e
            grads = grad_lines(
                {stage: [1.0, e, 1.0] if stage == "projector" else [1.0, 1.1, 1.0] for stage in experiments.STAGES}
            )
            keep(
                args,
                "laptop",
                experiments.STABILITY_ROWS[stages],
                seed,
                33.0,
                files={"target_drift.jsonl": drift, "grad_norms.jsonl": grads},
            )
    # Table 2's rows: without EMA one big jump (10 x the median step), with EMA even steps
    for seed in range(3):
        spike = [(0.1, 0)] * 5 + [(1.0 + 0.1 * seed, 0)] + [(0.1, 0)] * 4
        even = [(0.1, 0)] * 10
        for beta, moves, knn in (("none", spike, 20.0), ("0.9", even, 22.0 + seed / 10), ("0.99", even, 21.0)):
            weights = weight_lines([moves, moves])
            keep(args, "laptop", experiments.TWO_WIDE_ROWS[beta], seed, knn, files={"weights.jsonl": weights})
    return rows


def claims_args(tmp_path, *more):
    argv = ["claims", "--table", "--seeds", "0,1,2", "--results", str(tmp_path / "kept")]
    argv += ["--out-root", str(tmp_path / "runs"), "--claims-out", str(tmp_path / "docs" / "claims.md"), *more]
    return argv


def test_claims_from_made_up_kept_results(tmp_path):
    argv = claims_args(tmp_path)
    args = reproduce.parse_args(argv)
    args.epochs = experiments.EXPERIMENTS["laptop"].epochs
    made_up_laptop_results(args)
    accuracy, measured, results = report.evaluate_claims(args, "laptop", experiments.EXPERIMENTS["laptop"])
    by_text = {v.claim.text: v for v in accuracy + measured}
    knn = lambda text: by_text[text].tests["knn_top1"]
    assert knn("MoCo v2 collapses without EMA").verdict == "confirmed"  # against its own EMA baseline
    assert knn("BYOL drops without EMA").verdict == "refuted"
    assert knn("BYOL: projector-only EMA is comparable or preferable to full EMA").verdict == "not seen at this scale"
    mocov2_close = by_text["MoCo v2: projector-only EMA is comparable or preferable to full EMA"]
    gain = (12.0 + 12.3 + 11.8) / 3  # MoCo v2's full EMA over the random backbone, paired by seed
    assert mocov2_close.margin == pytest.approx(experiments.CLOSE_FRACTION * gain)  # 5.1 % of it
    assert knn("MoCo v2: projector-only EMA is comparable or preferable to full EMA").verdict == "confirmed"
    assert knn("ReSSL: projector-only EMA is comparable or preferable to full EMA").verdict == "confirmed and better"
    assert knn("DINO collapses without EMA").verdict.startswith("not yet measured")
    beta = by_text["BYOL: the drop from beta 0.99 to 0.9995 is smaller with projector-only EMA"]
    drops = [(33.0 - 27.0) - (30.0 - 29.5), (33.5 - 27.6) - (33.5 - 33.0), (33.2 - 27.1) - (36.9 - 36.5)]
    assert beta.tests["knn_top1"].summary.mean == pytest.approx(sum(drops) / 3)
    assert beta.tests["knn_top1"].verdict == "confirmed"
    table2 = by_text["EMA on FC2 (beta 0.9) raises linear and 1-NN accuracy"]
    assert (
        set(table2.tests) == {"knn_top1", "linear_top1", "knn1_top1"}
        and table2.tests["knn1_top1"].verdict == "confirmed"
    )
    # the measured claims
    time = by_text["Projector-only EMA runs the backbone once per image instead of twice, and takes less time"]
    assert time.ratios == pytest.approx({0: 0.70, 1: 0.71, 2: 0.72})  # medians: seed 0's slowed epoch left out
    assert time.tests["median epoch time"].verdict == "confirmed"
    drift = by_text["EMA on every stage makes the target move less per step than no EMA"]
    assert (
        drift.ratios == pytest.approx({0: 0.1, 1: 0.105, 2: 0.11})
        and drift.tests["target drift"].verdict == "confirmed"
    )
    assert by_text["EMA on the projector makes the target move less per step than no EMA"].ratios == pytest.approx(
        {0: 1.0, 1: 1.0, 2: 1.0}
    )
    jumps = by_text["Without EMA, FC2's weights make larger jumps than with EMA at beta 0.9"]
    assert jumps.ratios == pytest.approx({0: 10.0, 1: 11.0, 2: 12.0}) and jumps.tests["FC2 jump"].verdict == "confirmed"
    fluctuates = by_text["The projector's gradient fluctuates most (EMA all)"]
    assert fluctuates.ratios[0] == pytest.approx(1.0 / math.log(1.1))
    # a pair that ran on two CPUs is named
    assert "seed 1 on two CPUs" in by_text["BYOL drops without EMA"].provenance
    assert "MIXED CPUS" in by_text["BYOL drops without EMA"].provenance
    # Holm: every column has every claim of its kind, those not measured counted with p = 1
    column = [v.tests["knn_top1"] for v in accuracy]
    decisive = [1.0 if t.p is None else min(t.p, t.p_other) for t in column]
    assert [t.holm_p for t in column] == pytest.approx(report.holm(decisive))


def test_claims_table_is_written_with_both_metrics_holm_and_its_figure(tmp_path):
    argv = claims_args(tmp_path)
    args = reproduce.parse_args(argv)
    args.epochs = 10
    made_up_laptop_results(args)
    assert reproduce.main(argv) == 0
    text = (tmp_path / "docs" / "claims.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| claim | paper | a | b |"))
    for column in (
        "kNN: a − b [95 % CI]",
        "kNN: p",
        "kNN: Holm",
        "linear: verdict",
        "linear: Holm",
        "code, device, CPU",
    ):
        assert column in head
    rows = {}  # claim -> its row of the first table (later tables repeat a claim's name)
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert "| confirmed |" in rows["MoCo v2 collapses without EMA"]
    assert (
        "a − b > −margin, one-sided (margin 0.62)"
        in rows["MoCo v2: projector-only EMA is comparable or preferable to full EMA"]
    )
    assert "lag = 1 / (1 − β)" in text and "What it changes here" in text
    figure = tmp_path / "docs" / "figures" / "claims-forest.png"
    if importlib.util.find_spec("matplotlib"):
        data = figure.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
        assert "](figures/claims-forest.png)" in text
    provenance = (tmp_path / "docs" / "provenance.md").read_text()
    assert "Intel Xeon" in provenance and "## laptop/" in provenance
    assert "byol: EMA none" in provenance  # rows by their labels
    assert_tables_render(tmp_path / "docs" / "claims.md")


def test_full_scale_claims_are_kept_apart_from_the_laptops(tmp_path):
    """`claims --scale full`: its own experiment, results directory, scale, table; a tiny synthetic scale here."""
    tiny = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "16"]
    argv = claims_args(tmp_path, "--scale", "full", *tiny)
    argv[argv.index("--claims-out") + 1] = str(tmp_path / "docs" / "claims-gpu.md")
    args = reproduce.parse_args(argv)
    args.epochs = 1
    full = experiments.EXPERIMENTS["full-width"]
    assert [r.label for r in full.rows] == [r.label for r in experiments.EXPERIMENTS["laptop"].rows]
    for label, values in (("mocov2: EMA all (classic)", [50.0, 51.0, 50.5]), ("mocov2: EMA none", [10.0, 10.5, 9.8])):
        for seed, value in enumerate(values):
            keep(args, "full-width", label, seed, value)
            keep(args, "laptop", label, seed, 99.0)  # the laptop's: must not be read
    assert reproduce.main(argv) == 0
    text = (tmp_path / "docs" / "claims-gpu.md").read_text()
    assert "full-width (GPU) scale" in text and "docs/results/full-width/" in text
    row = next(line for line in text.splitlines() if line.startswith("| MoCo v2 collapses without EMA |"))
    assert "-40.40" in row and "confirmed" in row  # (10.0 + 10.5 + 9.8 - 151.5) / 3
    assert not (tmp_path / "docs" / "claims.md").exists()
    kept = list((tmp_path / "kept").glob("full-width/synthetic-e1-b16/*/seed0"))
    assert kept and all("width_64_train_subset_50000" in d.parent.name for d in kept)
    # the commands: the laptop's method values at width 64 on every training image, the random backbone too
    defaults = reproduce.parse_args(["claims", "--scale", "full"])
    assert defaults.claims_out.endswith("docs/claims-gpu.md")
    defaults.epochs = full.epochs
    random_row = next(r for r in full.rows if r.label == experiments.RANDOM)
    command = " ".join(reproduce.command(defaults, full, random_row))
    assert "--width 64 --train-subset 50000" in command and "linear_eval.py" in command
    byol = next(r for r in full.rows if r.label == "byol: EMA all (classic)")
    assert "--preset laptop --width 64 --train-subset 50000" in " ".join(reproduce.command(defaults, full, byol))
    with pytest.raises(SystemExit):
        reproduce.parse_args(["laptop", "--scale", "full"])  # --scale is the claims' choice


# ---------------------------------------------------------------------------------------------
# The docs: tables that render, every kept run's provenance, no torch behind --table
# ---------------------------------------------------------------------------------------------


def assert_tables_render(path):
    """Every row of every table has its header's number of cells, as a GitHub-flavoured renderer splits them:
    markdown-it's table rule (it drops a row's extra cells silently, so the source rows are split with the
    rule's own splitter, which honours escaped pipes)."""
    markdown_it = pytest.importorskip("markdown_it")
    splitter = importlib.import_module("markdown_it.rules_block.table").escapedSplit
    text = Path(path).read_text()
    lines = text.splitlines()
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    tables = [t for t in tokens if t.type == "table_open"]
    assert tables or "|---" not in text, f"{path}: a table that does not render as one"
    for table in tables:
        start, end = table.map
        counts = []
        for number in range(start, end):
            if number == start + 1:
                continue  # the delimiter row
            cells = splitter(lines[number].strip())
            cells = cells[1:] if cells and cells[0] == "" else cells
            cells = cells[:-1] if cells and cells[-1] == "" else cells
            counts.append(len(cells))
        assert set(counts) == {counts[0]}, f"{path}, line {start + 1}: rows of {sorted(set(counts))} cells"
    stripped = [line.strip() for line in lines]  # a table inside a list item is indented
    tables_in_source = sum(
        1 for i, line in enumerate(stripped[1:], 1) if line.startswith("|---") and stripped[i - 1].startswith("|")
    )
    assert tables_in_source == len(tables), f"{path}: {tables_in_source} tables written, {len(tables)} rendered"


@pytest.mark.parametrize("page", ["docs/claims.md", "docs/small-scale.md", "docs/provenance.md"])
def test_docs_tables_render_with_every_cell_in_its_column(page):
    assert_tables_render(ROOT / page)


def test_a_pipe_in_a_cell_is_escaped_and_renders_in_its_cell():
    markdown_it = pytest.importorskip("markdown_it")
    row = report.table_row(["close", "|a - b| ≤ 3", "confirmed"])
    html = markdown_it.MarkdownIt("commonmark").enable("table").render("| x | y | z |\n|---|---|---|\n" + row + "\n")
    assert html.count("<td>") == 3 and "<td>|a - b| ≤ 3</td>" in html


def test_every_kept_run_says_where_it_ran():
    """Each kept run names its CPU model; a run kept since provenance recorded more also its vector units and
    the load it shared; an older one says in so many words that those were not measured."""
    files = sorted((ROOT / "docs" / "results").glob("**/provenance.json"))
    assert len(files) > 100
    for file in files:
        provenance = json.loads(file.read_text())
        where = file.relative_to(ROOT)
        assert isinstance(provenance.get("cpu"), str) and provenance["cpu"], where
        assert "jobs_at_once" not in provenance and "jobs_asked" in provenance, where
        if provenance.get("load") is None:
            assert provenance["load_note"].startswith("not measured"), where
            assert provenance.get("cpu_vector_units") is None and provenance["cpu_vector_units_note"].startswith(
                "not measured"
            ), where
            assert provenance["machine"].startswith(provenance["cpu"]), where
        else:
            assert provenance["cpu_vector_units"] and provenance["torch_cpu_capability"], where
            assert 0 < provenance["load"]["cpu_share"] <= 1.5 and provenance["load"]["cores"] >= 1, where


def test_the_report_tools_need_no_torch():
    script = (
        "import sys; sys.path.insert(0, 'tools'); import reproduce, report, experiments; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_claim_names_rows_of_the_laptop_experiment():
    labels = {row.label for row in experiments.EXPERIMENTS["laptop"].rows}
    for claim in experiments.CLAIMS:
        for label in report.labels_of(claim.a) + report.labels_of(claim.b):
            assert label in labels, (claim.text, label)
        assert claim.direction in ("higher", "lower", "close")
        assert not claim.measure or claim.measure in report.MEASURES
    texts = [claim.text for claim in experiments.CLAIMS]
    assert len(texts) == len(set(texts))  # one row each in the table and the figure
    assert experiments.CLOSE_FRACTION == pytest.approx(2.40 / 46.80)


# ---------------------------------------------------------------------------------------------
# tools/plot.py: Fig. 2's trajectories from kept results
# ---------------------------------------------------------------------------------------------


def test_plot_makes_the_fc2_figure_from_kept_results(tmp_path):
    pytest.importorskip("matplotlib")
    kept = tmp_path / "results"
    args = reproduce.parse_args(["laptop", "--results", str(kept), "--seeds", "0"])
    args.epochs = 10
    for beta, label in experiments.TWO_WIDE_ROWS.items():
        moves = [(0.1, 0.05 * k) for k in range(6)]
        directory = keep(args, "laptop", label, 0, 20.0, files={"weights.jsonl": weight_lines([moves, moves])})
        stages = "none" if beta == "none" else "projector"
        arguments = {"method": "byol", "ema_stages": stages, "beta": 0.0 if beta == "none" else float(beta)}
        (directory / "args.json").write_text(json.dumps(arguments))
    out = tmp_path / "figures"
    result = subprocess.run(
        [
            sys.executable,
            "tools/plot.py",
            "--kept",
            "byol 2-wide projector",
            "--results",
            str(kept),
            "--only",
            "weights",
        ]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["weights-2d.png", "weights-3d.png"]
    assert (out / "weights-3d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, "tools/plot.py", "--kept", "byol: EMA all (classic)", "--results", str(tmp_path / "none")]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no kept results yet" in missing.stderr
