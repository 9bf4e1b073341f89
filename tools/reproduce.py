"""Reproduce the paper's tables and figures: one named experiment, one command.

    python tools/reproduce.py --list                       # every experiment and the commands it runs
    python tools/reproduce.py table1                       # Table 1 at full length (CIFAR-100, 200 epochs, GPU)
    python tools/reproduce.py table1 --only remove --dataset imagefolder --data-dir DIR --epochs 3 --batch-size 128
    python tools/reproduce.py table3 --jobs 4              # Table 3, four runs at a time on one GPU

An experiment is a list of runs of the method files (and, for Table 2, linear_eval.py on a
random encoder). They run one after another, each in its own directory under
--out-root/<scale>/, where <scale> names the dataset, epochs and steps, so a scaled-down
reproduction never mixes with a full one. A run that finished is skipped; a run that was
interrupted is resumed from its last.pt (--resume). At the end the final metrics of every
run are collected into <experiment>.md beside them: the paper's numbers next to ours.

With --jobs N, N runs go at once, each its own process on the same device, its output in
reproduce.log in its run directory; one line is printed as each starts and ends. A failed run
does not stop the others: the table is written from those that finished, the failed runs' logs
are listed, and the exit status is 1. On a CPU each process gets an even share of the threads
(OMP_NUM_THREADS), so the N of them do not oversubscribe the cores.

What the paper reports and what we compare it with: its "Acc" / "Top-1" is the online linear
probe's top-1 (solo-learn's protocol) -> our `linear_top1`; its "KNN-1" -> our `knn1_top1`.
Our weighted kNN (k = 200) is shown too. The paper's numbers come from 200-epoch runs; a
scaled-down run is a different experiment, and the table says how it was scaled.

Deviations in how an experiment is set up (each also in README.md):
  * Table 2 / Fig. 2: the paper puts EMA on FC2 only; our smallest EMA stage is the whole
    projector (FC1(512, 2), BN, ReLU, FC2(2, 256)), so EMA covers FC1 as well. beta is kept
    constant (no cosine schedule) so the target's weights follow beta as the figure shows.
  * Table 6 (ImageNet-100): the backbone keeps its CIFAR stem; point --data-dir at an
    ImageNet-100 folder (train/, val/) and choose --image-size through --extra.
"""

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    label: str  # the row of the paper's table
    script: str  # byol.py, ..., or linear_eval.py (random encoder)
    flags: str = ""  # flags that make this row
    paper: dict = field(default_factory=dict)  # {"top1": ..., "knn1": ...} as printed in the paper


@dataclass
class Experiment:
    title: str
    dataset: str  # the paper's dataset; --dataset overrides
    runs: list
    flags: str = ""  # flags for every run of this experiment
    epochs: int = 200  # the paper's length; --epochs overrides


def pairs(method, classic, projector, extra=""):
    """The two rows most tables have: EMA on every stage (baseline) and on the projector only."""
    return [
        Run(f"{method}: EMA backbone + projector", f"{method}.py", f"--ema-stages all {extra}".strip(), classic),
        Run(f"{method}: EMA projector only", f"{method}.py", f"--ema-stages projector {extra}".strip(), projector),
    ]


FIG2 = "--proj-hidden-dim 2 --beta-schedule constant --log-grad-norms --track-weights 16"
EXPERIMENTS = {
    "table1": Experiment(
        "Table 1: effect of EMA in each framework (remove it, or add it)",
        "cifar100",
        [
            Run("BYOL, beta 0.99 (baseline)", "byol.py", "--ema-stages all", {"top1": 62.01}),
            Run("BYOL, beta 0 (remove)", "byol.py", "--ema-stages none", {"top1": 43.48}),
            Run("SimSiam, beta 0 (baseline)", "simsiam.py", "--ema-stages none", {"top1": 51.41}),
            Run("SimSiam, beta 0.99 (add)", "simsiam.py", "--ema-stages all --beta 0.99", {"top1": 53.66}),
            Run("DINO, beta 0.99 (baseline)", "dino.py", "--ema-stages all", {"top1": 58.12}),
            Run("DINO, beta 0 (remove)", "dino.py", "--ema-stages none", {"top1": 1.08}),
            Run("ReSSL, beta 0.99 (baseline)", "ressl.py", "--ema-stages all", {"top1": 54.66}),
            Run("ReSSL, beta 0 (remove)", "ressl.py", "--ema-stages none", {"top1": 1.56}),
            Run("MoCo v2, beta 0.99 (baseline)", "mocov2.py", "--ema-stages all", {"top1": 62.34}),
            Run("MoCo v2, beta 0 (remove)", "mocov2.py", "--ema-stages none", {"top1": 2.22}),
            Run("SimCLR, beta 0 (baseline)", "simclr.py", "--ema-stages none", {"top1": 60.45}),
            Run("SimCLR, beta 0.90 (add)", "simclr.py", "--ema-stages all --beta 0.9", {"top1": 61.97}),
        ],
    ),
    "table2": Experiment(
        "Table 2, Fig. 2, 3 and 5: BYOL with a 2-wide projector, EMA on the projector",
        "cifar100",
        [
            Run("Fixed random encoder", "linear_eval.py", "--random-init --no-augment", {"top1": 15.21, "knn1": 6.85}),
            Run("w/o momentum (beta 0)", "byol.py", f"--ema-stages none {FIG2}", {"top1": 20.01, "knn1": 10.01}),
            Run(
                "w/ momentum, beta 0.9",
                "byol.py",
                f"--ema-stages projector --beta 0.9 {FIG2}",
                {"top1": 25.76, "knn1": 14.17},
            ),
            Run(
                "w/ momentum, beta 0.99",
                "byol.py",
                f"--ema-stages projector --beta 0.99 {FIG2}",
                {"top1": 22.63, "knn1": 12.56},
            ),
        ],
    ),
    "table3": Experiment(
        "Table 3: EMA on the backbone only or on the projector only",
        "cifar100",
        [
            run
            for method, numbers in [
                ("byol", (62.01, 62.17, 59.61)),
                ("dino", (58.12, 8.11, 58.14)),
                ("ressl", (54.66, 29.79, 53.51)),
                ("mocov2", (62.34, 45.84, 60.39)),
            ]
            for run in [
                Run(
                    f"{method}: EMA backbone + projector (baseline)",
                    f"{method}.py",
                    "--ema-stages all",
                    {"top1": numbers[0]},
                ),
                Run(f"{method}: EMA backbone only", f"{method}.py", "--ema-stages backbone", {"top1": numbers[1]}),
                Run(f"{method}: EMA projector only", f"{method}.py", "--ema-stages projector", {"top1": numbers[2]}),
            ]
        ],
    ),
    "table5": Experiment(
        "Table 5: ResNet-50 backbone",
        "cifar100",
        [
            run
            for method, full, proj in [
                ("byol", 63.71, 59.88),
                ("mocov2", 65.12, 61.76),
                ("ressl", 57.07, 56.10),
                ("dino", 53.04, 56.54),
            ]
            for run in pairs(method, {"top1": full}, {"top1": proj})
        ],
        flags="--arch resnet50",
    ),
    "table6": Experiment(
        "Table 6: ImageNet-100, beta 0.99 and 0.9995",
        "imagefolder",
        [
            run
            for method, numbers in [
                ("byol", (76.60, 71.18, 75.02, 75.52)),
                ("dino", (74.16, 63.78, 74.22, 72.02)),
                ("ressl", (74.02, 61.48, 69.12, 65.81)),
                ("mocov2", (76.48, 69.86, 74.31, 72.06)),
            ]
            for beta, (full, proj) in [("0.99", numbers[0::2]), ("0.9995", numbers[1::2])]
            for run in pairs(method, {"top1": full}, {"top1": proj}, f"--beta {beta}")
        ],
    ),
    "table7": Experiment(
        "Table 7: a frozen target projector (beta 1) at learning rates 1.0 and 4.0",
        "cifar100",
        [
            Run(f"{label}, lr {lr}", "byol.py", f"{flags} --lr {lr}", {"top1": top1})
            for lr, numbers in [("1.0", (62.01, 60.27)), ("4.0", (58.01, 62.32))]
            for label, flags, top1 in [
                ("BYOL", "--ema-stages all", numbers[0]),
                ("Fixed g (EMA projector, beta 1)", "--ema-stages projector --beta 1", numbers[1]),
            ]
        ],
    ),
    "tableC8": Experiment(
        "Table C.8: BN on block4's output (BN1) and the projector's output (BN2), BYOL",
        "cifar100",
        [
            Run("BYOL", "byol.py", "--ema-stages all", {"top1": 62.01, "knn1": 54.84}),
            Run("w/o momentum", "byol.py", "--ema-stages none", {"top1": 43.48, "knn1": 31.58}),
            Run(
                "w/o momentum + BN1 + BN2",
                "byol.py",
                "--ema-stages none --bn-block4 --bn-proj",
                {"top1": 49.59, "knn1": 42.92},
            ),
            Run("EMA projector", "byol.py", "--ema-stages projector", {"top1": 59.61, "knn1": 54.02}),
            Run("EMA projector + BN1", "byol.py", "--ema-stages projector --bn-block4", {"top1": 60.75, "knn1": 53.32}),
            Run("EMA projector + BN2", "byol.py", "--ema-stages projector --bn-proj", {"top1": 61.97, "knn1": 55.42}),
            Run(
                "EMA projector + BN1 + BN2",
                "byol.py",
                "--ema-stages projector --bn-block4 --bn-proj",
                {"top1": 62.48, "knn1": 55.66},
            ),
        ],
    ),
    "tableD9": Experiment(
        "Table D.9: CIFAR-10, BYOL, with BN1 / BN2",
        "cifar10",
        [
            Run("BYOL (baseline)", "byol.py", "--ema-stages all", {"top1": 88.37}),
            Run("w/o momentum", "byol.py", "--ema-stages none", {"top1": 80.34}),
            Run("EMA projector", "byol.py", "--ema-stages projector", {"top1": 87.73}),
            Run("EMA projector + BN1", "byol.py", "--ema-stages projector --bn-block4", {"top1": 87.91}),
            Run("EMA projector + BN2", "byol.py", "--ema-stages projector --bn-proj", {"top1": 88.03}),
            Run(
                "EMA projector + BN1 + BN2", "byol.py", "--ema-stages projector --bn-block4 --bn-proj", {"top1": 88.45}
            ),
        ],
    ),
    "fig4": Experiment(
        "Fig. 4: BYOL with EMA on one stage, or a set of stages (the rest shared)",
        "cifar100",
        [
            Run(f"EMA on {stages}", "byol.py", f"--ema-stages {stages}", paper)
            for stages, paper in [
                ("none", {"top1": 43.48}),
                ("conv1", {"top1": 43.07}),
                ("block1", {}),
                ("block2", {}),
                ("block3", {}),
                ("block4", {}),
                ("projector", {"top1": 59.61}),
                ("block4,projector", {}),
                ("backbone", {"top1": 62.17}),
                ("all", {"top1": 62.01}),
            ]
        ],
    ),
    # Learn on a laptop: every method with its classic stage set, the projector only, and the other of
    # none / all, against a random backbone of the same width; --preset laptop (common.LAPTOP) sets the scale.
    "laptop": Experiment(
        "Learn on a laptop: 6 methods x stage sets, quarter-width ResNet-18, 10,000 images, 10 epochs",
        "cifar10",
        [
            Run(
                "random backbone (same width, never trained)",
                "linear_eval.py",
                "--random-init --no-augment --width 16 --train-subset 10000",
            )
        ]
        + [
            Run(
                f"{method}: EMA {stages}" + (" (classic)" if stages == classic else ""),
                f"{method}.py",
                f"--ema-stages {stages}" + (f" --beta {beta}" if beta else ""),
                paper,
            )
            for method, classic, beta, rows in [
                ("simclr", "none", "0.9", [("none", {"top1": 60.45}), ("projector", {}), ("all", {"top1": 61.97})]),
                ("simsiam", "none", "", [("none", {"top1": 51.41}), ("projector", {}), ("all", {"top1": 53.66})]),
                (
                    "byol",
                    "all",
                    "",
                    [("all", {"top1": 62.01}), ("projector", {"top1": 59.61}), ("none", {"top1": 43.48})],
                ),
                (
                    "mocov2",
                    "all",
                    "",
                    [("all", {"top1": 62.34}), ("projector", {"top1": 60.39}), ("none", {"top1": 2.22})],
                ),
                (
                    "dino",
                    "all",
                    "",
                    [("all", {"top1": 58.12}), ("projector", {"top1": 58.14}), ("none", {"top1": 1.08})],
                ),
                (
                    "ressl",
                    "all",
                    "",
                    [("all", {"top1": 54.66}), ("projector", {"top1": 53.51}), ("none", {"top1": 1.56})],
                ),
            ]
            for stages, paper in rows
        ],
        flags="--preset laptop",
        epochs=10,
    ),
    # Sec. 7 gives the projector-only runs at beta 0.9995 only as drops from beta 0.99: in the row labels.
    "beta0.9995": Experiment(
        "Sec. 7 / Fig. 6: a very slow target (beta 0.9995) against beta 0.99, CIFAR-100",
        "cifar100",
        [
            run
            for method, (full, slow, proj, drop) in [
                ("byol", (62.01, 54.81, 59.61, 2.07)),
                ("dino", (58.12, 38.49, 58.14, 4.36)),
                ("ressl", (54.66, 42.46, 53.51, 3.33)),
                ("mocov2", (62.34, 53.04, 60.39, 4.78)),
            ]
            for run in pairs(method, {"top1": full}, {"top1": proj}, "--beta 0.99")
            + [
                Run(
                    f"{method}: EMA backbone + projector, beta 0.9995",
                    f"{method}.py",
                    "--ema-stages all --beta 0.9995",
                    {"top1": slow},
                ),
                Run(
                    f"{method}: EMA projector only, beta 0.9995 (paper: -{drop} from beta 0.99)",
                    f"{method}.py",
                    "--ema-stages projector --beta 0.9995",
                ),
            ]
        ],
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("experiment", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--list", action="store_true", help="print every experiment and its commands, run nothing")
    p.add_argument("--dataset", default=None, help="override the paper's dataset (e.g. imagefolder for a small folder)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="pre-training epochs of every run (default: the experiment's; the paper's 200, the laptop's 10)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop every run after this many steps (schedules still span --epochs)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--warmup-epochs", type=int, default=None, help="default: 10 at 200 epochs, scaled with --epochs (at least 1)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=None,
        help="MoCo v2 and ReSSL queue length (default: theirs; keep it below the number of training images)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma list: run only the rows whose label contains one of these "
        "texts (case-insensitive), e.g. 'dino,ressl'",
    )
    p.add_argument("--extra", default="", help="more flags for every method run, e.g. '--device cpu --eval-every 1'")
    p.add_argument("--out-root", default="runs/reproduce")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run this many of the experiment's runs at once, on the same "
        "device, as separate processes; each writes its output to reproduce.log in its run directory. On a "
        "CPU each process gets an even share of the CPU threads (OMP_NUM_THREADS = threads // jobs, at "
        "least 1, unless OMP_NUM_THREADS is set already); on a GPU all of them share it",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="start no run: write the table from the runs already there (rows without a run show '-')",
    )
    args = p.parse_args(argv)
    if not args.list and args.experiment not in EXPERIMENTS:
        p.error(f"name an experiment ({', '.join(EXPERIMENTS)}) or pass --list")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: run at least 1 at a time")
    return args


def scale_name(args, experiment):
    """The directory of one scale of reproduction: dataset, epochs, steps, batch, and a digest of
    the other flags that change results, so different scales never share a run directory."""
    dataset = args.dataset or experiment.dataset
    name = f"{dataset}-e{args.epochs}" + (f"-s{args.max_steps}" if args.max_steps else "") + f"-b{args.batch_size}"
    other = f"{args.warmup_epochs} {args.queue_size} {args.extra}"
    return name + ("" if other == "None None " else "-" + hashlib.sha1(other.encode()).hexdigest()[:6])


def run_dir(args, experiment, run):
    slug = re.sub(
        r"[^A-Za-z0-9.,=+]+", "_", f"{run.script[:-3]} {experiment.flags} {run.flags}".replace("--", "")
    ).strip("_")
    return Path(args.out_root) / scale_name(args, experiment) / slug


def command(args, experiment, run):
    """The command line of one run, as a user would type it."""
    data = ["--dataset", args.dataset or experiment.dataset, "--data-dir", args.data_dir]
    if run.script == "linear_eval.py":  # the random-encoder baseline: no pre-training
        arch = re.findall(r"--arch (\S+)", experiment.flags) or ["resnet18"]
        passed_on = re.findall(r"--(?:device|width|train-subset) \S+", args.extra)  # from --extra, as for the runs
        return [
            sys.executable,
            str(ROOT / run.script),
            *shlex.split(run.flags),
            "--arch",
            arch[0],
            *data,
            "--batch-size",
            str(args.batch_size),
            *shlex.split(" ".join(passed_on)),
            "--out",
            str(run_dir(args, experiment, run) / "linear_eval.json"),
        ]
    warmup = args.warmup_epochs if args.warmup_epochs is not None else max(1, round(10 * args.epochs / 200))
    scale = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--warmup-epochs", str(warmup)]
    scale += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    scale += (
        ["--queue-size", str(args.queue_size)] if args.queue_size and run.script in ("mocov2.py", "ressl.py") else []
    )
    return [
        sys.executable,
        str(ROOT / run.script),
        *shlex.split(experiment.flags),
        *shlex.split(run.flags),
        *data,
        *scale,
        *shlex.split(args.extra),
        "--out-dir",
        str(run_dir(args, experiment, run)),
    ]


def show(cmd):
    """A command as a user types it from the repository root."""
    return "python " + " ".join(
        shlex.quote(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c) for c in cmd[1:]
    )


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


def read_metrics(directory):
    """Every line of a run's metrics.jsonl (one per epoch); [] if it has none."""
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pending(args, experiment, run):
    """The command that runs or resumes one row, or None (printed as [done]) if it finished with this command."""
    directory = run_dir(args, experiment, run)
    cmd = command(args, experiment, run)
    done = directory / "reproduce-done.json"
    if done.exists() and json.loads(done.read_text()).get("command") == show(cmd):
        print(f"[done]    {run.label}: {directory}", flush=True)
        return None
    if (directory / "last.pt").exists():
        cmd.append("--resume")
    directory.mkdir(parents=True, exist_ok=True)
    return cmd


def mark_done(args, experiment, run):
    """Record that a row finished, with the exact command, so that the next invocation skips it."""
    done = run_dir(args, experiment, run) / "reproduce-done.json"
    done.write_text(json.dumps({"command": show(command(args, experiment, run))}))


def run_one(args, experiment, run):
    """Run (or resume, or skip) one row. Returns True if the run is complete."""
    cmd = pending(args, experiment, run)
    if cmd is None:
        return True
    print(f"[{'resume' if '--resume' in cmd else 'run'}]     {run.label}: {show(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        print(
            f"[failed]  {run.label}: exit {result.returncode}; fix the cause and run this command again to resume",
            flush=True,
        )
        return False
    mark_done(args, experiment, run)
    return True


def run_many(args, experiment, runs):
    """Run the rows --jobs at a time, each as its own process whose output goes to reproduce.log in its run
    directory. A failed row does not stop the others. Returns the failed rows' log files."""
    todo = [(run, cmd) for run in runs if (cmd := pending(args, experiment, run)) is not None]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # logs written as they happen
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))  # a share of the CPU each
    if todo:
        print(
            f"{len(todo)} runs to do, {args.jobs} at a time; OMP_NUM_THREADS={env['OMP_NUM_THREADS']} for each "
            f"(this machine has {os.cpu_count()} CPU threads)",
            flush=True,
        )
    running = {}  # process -> (row, log file, start time)
    failed = []
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                run, cmd = todo.pop(0)
                log = run_dir(args, experiment, run) / "reproduce.log"
                with open(log, "a") as out:  # appended: an earlier, interrupted attempt stays above
                    out.write(f"$ {show(cmd)}\n")
                    out.flush()
                    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[process] = (run, log, time.time())
                print(
                    f"[{'resume' if '--resume' in cmd else 'run'}]     {run.label} (pid {process.pid}, log {log}): "
                    f"{show(cmd)}",
                    flush=True,
                )
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                run, log, started = running.pop(process)
                took = f"after {(time.time() - started) / 60:.1f} min; log {log}"
                if process.returncode == 0:
                    mark_done(args, experiment, run)
                    print(f"[finished] {run.label}: exit 0 {took}", flush=True)
                else:
                    failed.append(log)
                    print(f"[failed]  {run.label}: exit {process.returncode} {took}", flush=True)
    finally:  # Ctrl-C, or any error here: stop the children too (their last.pt stays intact for a resume)
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if running:
            print(
                f"stopped the runs still going (pids {', '.join(str(p.pid) for p in running)}); run the same "
                f"command again to resume them",
                flush=True,
            )
    return failed


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def write_table(args, name, experiment, runs):
    """<experiment>.md: the paper's numbers next to ours, with how ours were measured."""
    rows = [
        f"# {experiment.title}",
        "",
        f"Scale: dataset {args.dataset or experiment.dataset}, {args.epochs} epochs"
        + (f", at most {args.max_steps} steps" if args.max_steps else "")
        + f", batch {args.batch_size}"
        + (f", warm-up {args.warmup_epochs} epochs" if args.warmup_epochs is not None else "")
        + (f", queue {args.queue_size} (MoCo v2, ReSSL)" if args.queue_size else "")
        + (f", extra flags `{args.extra}`" if args.extra else "")
        + ". The paper: 200 epochs, batch 256.",
        "Ours: online linear probe top-1, weighted kNN (k=200) top-1 and 1-NN top-1 at the last epoch "
        "(the random encoder: offline linear probe).",
        "",
        "| row | paper top-1 | paper KNN-1 | ours: linear top-1 | kNN top-1 | 1-NN top-1 | epoch | step | run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        directory = run_dir(args, experiment, run)
        m = final_metrics(directory) or {}
        paper = [run.paper.get("top1"), run.paper.get("knn1")]
        rows.append(
            f"| {run.label} | {' | '.join(fmt(v) for v in paper)} | {fmt(m.get('linear_top1'))} | "
            f"{fmt(m.get('knn_top1'))} | {fmt(m.get('knn1_top1'))} | {m.get('epoch', '-')} | {m.get('step', '-')} | "
            f"`{directory}` |"
        )
    save_table(args, experiment, name, rows)


def write_laptop_table(args, experiment, runs):
    """laptop.md: each run's kNN top-1 against the random backbone's, the collapse monitor, the time."""
    random = final_metrics(run_dir(args, experiment, runs[0])) if runs[0].script == "linear_eval.py" else None
    base = random["knn_top1"] if random else None
    rows = [
        f"# {experiment.title}",
        "",
        f"Dataset {args.dataset or experiment.dataset} (`--data-dir {args.data_dir}`), {args.epochs} epochs"
        + (f", extra flags `{args.extra}`" if args.extra else "")
        + ". kNN: weighted, k = 200, on the whole test "
        "split; 'above random': kNN top-1 minus the random backbone's; linear: the online probe; spread and rank: "
        "the collapse monitor (README); minutes: training time, the sum of the epochs' epoch_seconds (loading and "
        "evaluation not included).",
        "",
        "| run | kNN top-1 | above random | linear top-1 | spread | rank | final loss | training minutes "
        "| paper top-1 (CIFAR-100, 200 ep.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        directory = run_dir(args, experiment, run)
        m = final_metrics(directory) or {}
        history = read_metrics(directory)
        seconds = sum(h["epoch_seconds"] for h in history) if history else None  # training only; resumes included
        above = m["knn_top1"] - base if base is not None and m.get("knn_top1") is not None else None
        unfinished = history and m.get("epoch", 0) < args.epochs  # a run still going, or stopped early
        label = run.label + (f" (unfinished: epoch {m['epoch']} of {args.epochs})" if unfinished else "")
        rows.append(
            f"| {label} | {fmt(m.get('knn_top1'))} | {'-' if above is None else f'{above:+.2f}'} | "
            f"{fmt(m.get('linear_top1'))} | {fmt(m.get('output_spread'))} | {fmt(m.get('feature_rank'))} | "
            f"{fmt(m.get('loss'))} | {'-' if seconds is None else f'{seconds / 60:.1f}'} | "
            f"{fmt(run.paper.get('top1'))} |"
        )
    save_table(args, experiment, "laptop", rows)


def save_table(args, experiment, name, rows):
    """Write <name>.md beside the experiment's runs and print it."""
    path = Path(args.out_root) / scale_name(args, experiment) / f"{name}.md"
    path.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"\nwrote {path}")


def main(argv=None):
    args = parse_args(argv)
    given_epochs = args.epochs
    if args.list:
        for name, experiment in EXPERIMENTS.items():
            args.epochs = given_epochs or experiment.epochs
            print(f"{name}: {experiment.title} (paper dataset: {experiment.dataset})")
            for run in experiment.runs:
                print(f"    {show(command(args, experiment, run))}")
        return 0
    experiment = EXPERIMENTS[args.experiment]
    args.epochs = given_epochs or experiment.epochs
    wanted = [w.strip().lower() for w in (args.only or "").split(",") if w.strip()]
    runs = [r for r in experiment.runs if not wanted or any(w in r.label.lower() for w in wanted)]
    if not runs:
        print(f"error: no row of {args.experiment} has '{args.only}' in its label; see --list", file=sys.stderr)
        return 2
    failed = []
    if args.table:
        complete = [True]
    elif args.jobs == 1:
        complete = [run_one(args, experiment, run) for run in runs]
    else:
        try:
            failed = run_many(args, experiment, runs)
        except KeyboardInterrupt:  # Ctrl-C: run_many has stopped the runs
            return 130
        complete = [not failed]
    if args.experiment == "laptop":
        write_laptop_table(args, experiment, runs)
    else:
        write_table(args, args.experiment, experiment, runs)
    if failed:
        print(
            f"\n{len(failed)} of {len(runs)} runs failed; fix the cause and run this command again to resume "
            f"them. Their logs:"
        )
        print("\n".join(f"    {log}" for log in failed))
    return 0 if all(complete) else 1


if __name__ == "__main__":
    sys.exit(main())
