"""Reproduce the paper's tables and figures: one named experiment, one command.

    python tools/reproduce.py --list                       # every experiment and the commands it runs
    python tools/reproduce.py table1                       # Table 1 at full length (CIFAR-100, 200 epochs, GPU)
    python tools/reproduce.py table1 --only remove --dataset imagefolder --data-dir DIR --epochs 3 --batch-size 128
    python tools/reproduce.py table3 --jobs 4              # Table 3, four runs at a time on one GPU
    python tools/reproduce.py table6 --data-dir IMAGENET100 --nproc 2   # Table 6 on 2 GPUs, as the paper ran it
    python tools/reproduce.py table4 --data-dir IMAGENET1K --max-steps N  # Table 4: time N steps of DINO ResNet-50

An experiment is a list of rows, each made by one command of a method file (or, for the random
encoder, of linear_eval.py); a run is one row with one seed. The runs go one after another, each
in its own directory under --out-root/<scale>/, where <scale> names the dataset, epochs and steps,
so a scaled-down reproduction never mixes with a full one. A run that finished is skipped; a run that was
interrupted is resumed from its last.pt (--resume). At the end the final metrics of every
run are collected into <experiment>.md beside them: the paper's numbers next to ours.

This file is the command line and the process runner. The experiments and the claims are data, in
tools/experiments.py; the statistics, the tables, docs/claims.md and its figure are in
tools/report.py. None of the three imports torch: `--table` rebuilds a table in seconds.

`claims` runs the laptop rows the claims need and writes docs/claims.md (with its forest plot in
docs/figures/ and docs/provenance.md, where each kept run ran); `claims --scale full` does the same
for the laptop's rows at full width on all of CIFAR-10 (a GPU's scale), into docs/claims-gpu.md.

With --jobs N, N runs go at once, each its own process on the same device, its output in
reproduce.log in its run directory; one line is printed as each starts and ends. A failed run
does not stop the others: the table is written from those that finished, the failed runs' logs
are listed, and the exit status is 1. On a CPU each process gets an even share of the threads
(OMP_NUM_THREADS), so the N of them do not oversubscribe the cores.

With --nproc N, each method run is launched under torchrun (`python -m torch.distributed.run
--standalone --nproc_per_node N`), one process per GPU; --batch-size stays the global batch.
Such runs live under a scale of their own (-pN), since one process's results are not N's.

What the paper reports and what we compare it with: its "Acc" / "Top-1" is the online linear
probe's top-1 (solo-learn's protocol) -> our `linear_top1`; its "KNN-1" -> our `knn1_top1`.
Our weighted kNN (k = 200) is shown too. The paper's numbers come from 200-epoch runs; a
scaled-down run is a different experiment, and the table says how it was scaled.

Deviations in how an experiment is set up (each also in docs/deviations.md):
  * Table 2 / Fig. 2: the paper puts EMA on FC2 only; our smallest EMA stage is the whole
    projector (FC1(512, 2), BN, ReLU, FC2(2, 256)), so EMA covers FC1 as well. beta is kept
    constant (no cosine schedule) so the target's weights follow beta as the figure shows.
  * Table 6 (ImageNet-100) and Table 4 (ImageNet-1K) run with the ImageNet stem, 224-pixel views and the
    streaming loader; how to make ImageNet-100, their recipe with its sources, and what still differs from
    solo-learn's ImageNet-100 scripts are in docs/imagenet.md.
"""

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments import CLAIMS, EXPERIMENTS, RANDOM, SCALES
from gpu_report import device_slug
from report import ROOT, data_dir, results_dir, row_results, run_dir, write_claims, write_laptop_table, write_table

sys.path.insert(0, str(ROOT))
from engine.cli import ArgumentParser, HelpFormatter  # noqa: E402  (no torch: --table stays fast)
from engine.files import git_revision  # noqa: E402

# Names that the tests (and readers of earlier versions) reach as reproduce.<name>, though they live in
# tools/report.py now: the statistics over seeds and the reading of kept results
from report import T_975, Summary, final_metrics, knn_rise, paired, scale_name, show_both, show_mean, summarise  # noqa: F401
from report import verdict  # noqa: F401


def refuse(message):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("experiment", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}, or claims (see --list)")
    p.add_argument(
        "--list",
        action="store_true",
        help="print the commands of EXPERIMENT (of every experiment without one; --only filters), run nothing",
    )
    p.add_argument("--dataset", default=None, help="override the paper's dataset (e.g. imagefolder for a small folder)")
    p.add_argument("--data-dir", default=None, help="default: the experiment's (./data; laptop: cifar10-images)")
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
    p.add_argument(
        "--seeds",
        default=None,
        help="comma list of seeds: each row runs once per seed (--seed S), and the tables show the mean, the "
        "standard deviation and a 95%% confidence interval over them (default: 0; for claims 0,1,2)",
    )
    p.add_argument("--extra", default="", help="more flags for every method run, e.g. '--device cpu --eval-every 1'")
    p.add_argument("--out-root", default="runs/reproduce")
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="laptop",
        help="claims only: the scale whose rows the claims read and run; laptop: quarter width, 10,000 images, "
        "10 epochs (docs/claims.md); full: width 64, all 50,000 images, 30 epochs, for a GPU (docs/claims-gpu.md)",
    )
    p.add_argument(
        "--claims-out",
        default=None,
        help="where claims writes its table (default: docs/claims.md, or docs/claims-gpu.md for --scale full); its "
        "forest plot goes to figures/<name>-forest.png and provenance.md beside it",
    )
    p.add_argument(
        "--results",
        default=str(ROOT / "docs" / "results"),
        help="where each finished run's small files (args.json, metrics.jsonl, ...) are kept, under "
        "<experiment>/<scale>/<row>/seed<S>/, for the tables: commit them, and --table rebuilds every table "
        "from them with no run directory present",
    )
    p.add_argument(
        "--jobs",
        default="1",
        help="run this many of the experiment's runs at once, on the same "
        "device, as separate processes; each writes its output to reproduce.log in its run directory. On a "
        "CPU each process gets an even share of the CPU threads (OMP_NUM_THREADS = threads // jobs, at "
        "least 1, unless OMP_NUM_THREADS is set already); on a GPU all of them share it. auto: on a GPU, the "
        "number that gave the most images per second in this GPU's latest report (docs/results/gpu/<device>/"
        "report.json, made by tools/gpu_report.py), else 1; on a CPU, one run per core with one thread each",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="launch each method run under torchrun with this many processes on this machine (one per GPU; on "
        "a CPU, gloo processes); --batch-size stays the global batch. Table 6: the paper's 2 GPUs",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="start no run: write the table from the results already there (rows without one show '-')",
    )
    args = p.parse_args(argv)
    if args.experiment is not None and args.experiment not in [*EXPERIMENTS, "claims"]:
        p.error(f"no experiment {args.experiment!r}: name one of {', '.join(EXPERIMENTS)}, claims")
    if args.experiment is None and not args.list:
        p.error(f"name an experiment ({', '.join(EXPERIMENTS)}, claims) or pass --list")
    if args.jobs != "auto":
        try:
            args.jobs = int(args.jobs)
        except ValueError:
            refuse(f"--jobs {args.jobs!r}: give how many runs go at once (a number), or auto")
        if args.jobs < 1:
            refuse(f"--jobs {args.jobs}: run at least 1 at a time")
    if args.nproc < 1:
        refuse(f"--nproc {args.nproc}: launch at least 1 process per run (1, the default, runs without torchrun)")
    for name, least in [("epochs", 1), ("max_steps", 1), ("batch_size", 1), ("queue_size", 1), ("warmup_epochs", 0)]:
        value = getattr(args, name)
        if value is not None and value < least:
            kind = "a positive number" if least else "zero or more"
            refuse(f"--{name.replace('_', '-')} must be {kind} (got {value}); leave it out for the experiment's")
    try:
        shlex.split(args.extra)
    except ValueError as error:
        refuse(f"--extra {args.extra!r} cannot be split into flags ({error}); quote it as one string of flags")
    if args.scale != "laptop" and args.experiment != "claims":
        refuse(f"--scale {args.scale} is for claims; the rows of that scale are the experiment {SCALES[args.scale][0]}")
    if args.claims_out is None:
        args.claims_out = str(ROOT / "docs" / SCALES[args.scale][1])
    if args.seeds is None:
        args.seeds = "0,1,2" if args.experiment == "claims" else "0"
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        refuse(f"--seeds {args.seeds!r}: give a comma list of seeds, e.g. 0,1,2")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        refuse(f"--seeds {args.seeds}: give each seed once, and none below 0")
    return args


def command(args, experiment, row, seed=0):
    """The command line of one run, as a user would type it."""
    data = ["--dataset", args.dataset or experiment.dataset, "--data-dir", data_dir(args, experiment)]
    if row.script == "linear_eval.py":  # the random-encoder baseline: no pre-training
        arch = re.findall(r"--arch (\S+)", experiment.flags) or ["resnet18"]
        passed_on = re.findall(
            r"--(?:device|width|train-subset|eval-split|val-size) \S+", f"{experiment.flags} {args.extra}"
        )
        return [
            sys.executable,
            str(ROOT / row.script),
            *shlex.split(row.flags),
            "--arch",
            arch[0],
            *data,
            "--batch-size",
            str(args.batch_size),
            *shlex.split(" ".join(passed_on)),
            "--seed",
            str(seed),
            "--out",
            str(run_dir(args, experiment, row, seed) / "linear_eval.json"),
        ]
    warmup = args.warmup_epochs if args.warmup_epochs is not None else max(1, round(10 * args.epochs / 200))
    scale = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--warmup-epochs", str(warmup)]
    scale += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    scale += (
        ["--queue-size", str(args.queue_size)] if args.queue_size and row.script in ("mocov2.py", "ressl.py") else []
    )
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return [
        sys.executable,
        *(launcher if args.nproc > 1 else []),
        str(ROOT / row.script),
        *shlex.split(experiment.flags),
        *shlex.split(row.flags),
        *data,
        *scale,
        *shlex.split(args.extra),
        "--seed",
        str(seed),
        "--out-dir",
        str(run_dir(args, experiment, row, seed)),
    ]


def relative_to_root(path):
    """A path under the repository as a user types it from the repository root; any other path as it is."""
    return str(Path(path).relative_to(ROOT)) if str(path).startswith(str(ROOT)) else str(path)


def show(cmd):
    """A command as a user types it from the repository root."""
    return "python " + " ".join(shlex.quote(relative_to_root(c)) for c in cmd[1:])


def pending(args, name, experiment, row, seed):
    """The command that runs or resumes one row, or None (printed as [done] or [kept]) if it finished with this
    command: in its run directory, or in the kept results (--results: a fresh clone does not redo them)."""
    directory = run_dir(args, experiment, row, seed)
    cmd = command(args, experiment, row, seed)
    done = directory / "reproduce-done.json"
    if done.exists() and json.loads(done.read_text()).get("command") == show(cmd):
        print(f"[done]    {row.label}, seed {seed}: {directory}", flush=True)
        return None
    kept = results_dir(args, name, experiment, row, seed) / "provenance.json"
    if kept.exists() and json.loads(kept.read_text()).get("command") == show(cmd):
        print(f"[kept]    {row.label}, seed {seed}: {kept.parent}", flush=True)
        return None
    if (directory / "last.pt").exists():
        cmd.append("--resume")
    directory.mkdir(parents=True, exist_ok=True)
    return cmd


# the small files a table reads
KEPT = ("args.json", "metrics.jsonl", "linear_eval.json", "grad_norms.jsonl", "target_drift.jsonl", "weights.jsonl")


def cpu_model():
    """The CPU's name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return names[0].strip() if names else (platform.processor() or platform.machine())


def cpu_vector_units():
    """The vector instruction sets the CPU has (of those that choose torch's kernels), from /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(re.findall(r"^flags\s*:\s*(.+)$", cpuinfo.read_text(), re.M)[0].split()) if cpuinfo.exists() else set()
    return [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]


_CAPABILITY = {}


def torch_cpu_capability(env):
    """The vector instructions torch's CPU kernels use in a process with this environment (AVX2, AVX512, ...):
    they change float results, so a run's provenance names them. Asked once per invocation."""
    if "value" not in _CAPABILITY:
        script = "import torch; print(torch.backends.cpu.get_cpu_capability())"
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        _CAPABILITY["value"] = out.stdout.strip() or "unknown"
    return _CAPABILITY["value"]


class LoadMeter:
    """The load a run shared the machine with, measured while it ran: the one-minute load average (every
    process on the machine, this run included) sampled every SECONDS, and, when the run ends, its own CPU
    seconds (user + system, from wait4) against its wall time and threads."""

    SECONDS = 10.0

    def __init__(self):
        self.samples, self.last = [], 0.0

    def sample(self):
        now = time.time()
        if now - self.last >= self.SECONDS and Path("/proc/loadavg").exists():
            self.samples.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self.last = now

    def summary(self, cpu_seconds, wall_seconds, threads):
        threads = int(threads) if str(threads).isdigit() else (os.cpu_count() or 1)
        return {
            "cpu_seconds": round(cpu_seconds, 1),
            # 1.0: the run had its threads' worth of CPU all along; 0.5: it got half (other work, or too many threads)
            "cpu_share": round(cpu_seconds / max(wall_seconds * threads, 1e-9), 3),
            "load_average_mean": round(sum(self.samples) / len(self.samples), 2) if self.samples else None,
            "load_average_max": max(self.samples) if self.samples else None,
            "cores": os.cpu_count(),
        }


def wait_for(process, meter, block=False):
    """Reap `process` if it has ended (wait4: its exit status and the CPU time it used); sample the load
    meanwhile. Returns its CPU seconds once it ended, None while it runs."""
    meter.sample()
    pid, status, usage = os.wait4(process.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def mark_done(args, name, experiment, row, seed, threads, started, load, env):
    """Record that a row finished, with the exact command, so that the next invocation skips it; and keep
    its small files in --results with where and when it ran, and the load it shared (provenance.json)."""
    directory = run_dir(args, experiment, row, seed)
    shown = show(command(args, experiment, row, seed))
    (directory / "reproduce-done.json").write_text(json.dumps({"command": shown}))
    kept = results_dir(args, name, experiment, row, seed)
    kept.mkdir(parents=True, exist_ok=True)
    for file in [f for f in KEPT if f != "args.json"]:  # args.json is written below, its out_dir relative
        if (directory / file).exists():
            shutil.copyfile(directory / file, kept / file)
    trained = json.loads((directory / "args.json").read_text()) if (directory / "args.json").exists() else {}
    if trained:  # the kept copy names its run directory as the command does, from the repository root
        kept_args = dict(trained, out_dir=relative_to_root(trained.get("out_dir", "")))
        (kept / "args.json").write_text(json.dumps(kept_args, indent=2))
    provenance = {
        "command": shown,
        "git_revision": trained.get("git_revision", git_revision()),
        "torch": trained.get("torch") or torch_version(),  # (linear_eval.py writes no args.json)
        "device": trained.get("device_name", "cpu") if row.script != "linear_eval.py" else "cpu",
        "cpu": cpu_model(),
        "cpu_vector_units": cpu_vector_units(),
        "torch_cpu_capability": torch_cpu_capability(env),
        "threads": threads,
        "jobs_asked": args.jobs,  # --jobs: runs this invocation keeps going at once; "load" says what was shared
        "load": load,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "wall_seconds": round(time.time() - started),
    }
    (kept / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def torch_version():
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


GPU_REPORTS = ROOT / "docs" / "results" / "gpu"  # tools/gpu_report.py's reports, one folder per device


def visible_gpu():
    """The name of the GPU torch sees (its first), or None: asked in a subprocess, since this tool imports no
    torch."""
    script = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    return out.stdout.strip() or None


def auto_jobs(args, reports=GPU_REPORTS):
    """--jobs auto: how many runs go at once. On a GPU, the number that gave the most images per second in the
    latest report of this GPU that measured it (tools/gpu_report.py's best_jobs), else 1, with a note. On a
    CPU, one run per CPU that os.cpu_count() counts (per --nproc processes), each with one thread (threads_for): the runs are
    independent, and one thread each keeps every core busy without two runs fighting over one."""
    devices = re.findall(r"--device[= ](\S+)", args.extra)
    gpu = None if devices and devices[-1] == "cpu" else visible_gpu()
    if gpu is None:
        jobs = max(1, (os.cpu_count() or 1) // args.nproc)
        print(f"--jobs auto: {jobs} at once on the CPU ({os.cpu_count()} CPUs, one thread each)", flush=True)
        return jobs
    if args.nproc > 1:
        print(f"--jobs auto: 1 at a time (each run already spans {args.nproc} GPUs with --nproc)", flush=True)
        return 1
    folder = reports / device_slug(gpu)
    for path in [folder / "report.json", *sorted(folder.glob("earlier/*/report.json"), reverse=True)]:
        best = json.loads(path.read_text()).get("best_jobs") if path.exists() else None
        if best:
            print(f"--jobs auto: {best} at once on the {gpu}, the best measured in {path}", flush=True)
            return best
    print(
        f"--jobs auto: 1 at a time; no report of the {gpu} has measured runs at once yet (make one with: python "
        f"tools/gpu_report.py --parts jobs)",
        flush=True,
    )
    return 1


def threads_for(args):
    """OMP_NUM_THREADS of each process: as set, or an even share of this machine's CPU threads."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))))


def run_one(args, name, experiment, row, seed):
    """Run (or resume, or skip) one row with one seed. Returns True if the run is complete."""
    cmd = pending(args, name, experiment, row, seed)
    if cmd is None:
        return True
    print(f"[{'resume' if '--resume' in cmd else 'run'}]     {row.label}, seed {seed}: {show(cmd)}", flush=True)
    started, meter = time.time(), LoadMeter()
    process = subprocess.Popen(cmd, cwd=ROOT)
    try:
        while (cpu_seconds := wait_for(process, meter)) is None:
            time.sleep(0.5)
    except KeyboardInterrupt:  # the terminal sent the run the same Ctrl-C: it saves and ends; wait for it
        wait_for(process, meter, block=True)
        raise
    if process.returncode != 0:
        print(
            f"[failed]  {row.label}, seed {seed}: exit {process.returncode}; fix the cause and run this command "
            f"again to resume",
            flush=True,
        )
        return False
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    load = meter.summary(cpu_seconds, time.time() - started, threads)
    mark_done(args, name, experiment, row, seed, threads, started, load, dict(os.environ))
    return True


def run_many(args, name, experiment, jobs):
    """Run the (row, seed) jobs --jobs at a time, each as its own process whose output goes to reproduce.log
    in its run directory. A failed one does not stop the others. Returns the failed ones' log files."""
    todo = [(row, seed, cmd) for row, seed in jobs if (cmd := pending(args, name, experiment, row, seed)) is not None]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads_for(args))  # logs as they happen
    if todo:
        print(
            f"{len(todo)} runs to do, {args.jobs} at a time; OMP_NUM_THREADS={env['OMP_NUM_THREADS']} for each "
            f"(this machine has {os.cpu_count()} CPU threads)",
            flush=True,
        )
    running = {}  # process -> (row, seed, log file, start time, load meter)
    failed = []
    try:
        while todo or running:
            while todo and len(running) < args.jobs:
                row, seed, cmd = todo.pop(0)
                log = run_dir(args, experiment, row, seed) / "reproduce.log"
                with open(log, "a") as out:  # appended: an earlier, interrupted attempt stays above
                    out.write(f"$ {show(cmd)}\n")
                    out.flush()
                    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[process] = (row, seed, log, time.time(), LoadMeter())
                print(
                    f"[{'resume' if '--resume' in cmd else 'run'}]     {row.label}, seed {seed} (pid {process.pid}, "
                    f"log {log}): {show(cmd)}",
                    flush=True,
                )
            time.sleep(0.2)
            ended = {p: cpu for p, (*_, meter) in running.items() if (cpu := wait_for(p, meter)) is not None}
            for process, cpu_seconds in ended.items():
                row, seed, log, started, meter = running.pop(process)
                took = f"after {(time.time() - started) / 60:.1f} min; log {log}"
                if process.returncode == 0:
                    load = meter.summary(cpu_seconds, time.time() - started, env["OMP_NUM_THREADS"])
                    mark_done(args, name, experiment, row, seed, env["OMP_NUM_THREADS"], started, load, env)
                    print(f"[finished] {row.label}, seed {seed}: exit 0 {took}", flush=True)
                else:
                    failed.append(log)
                    print(f"[failed]  {row.label}, seed {seed}: exit {process.returncode} {took}", flush=True)
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


def claim_rows(experiment):
    """The rows the claims read (each claim names one to four), and the random backbone its margins need."""
    labels = {RANDOM}
    for claim in CLAIMS:
        for side in (claim.a, claim.b):
            labels.update(side if isinstance(side, tuple) else [side] if side else [])
    return [row for row in experiment.rows if row.label in labels]


def selected_rows(args, experiment):
    """The rows to run (with claims: those its claims read), of them those with one of --only's texts in the label."""
    rows = claim_rows(experiment) if args.experiment == "claims" else experiment.rows
    wanted = [w.strip().lower() for w in (args.only or "").split(",") if w.strip()]
    return [r for r in rows if not wanted or any(w in r.label.lower() for w in wanted)]


def check_commands(args, experiment, rows):
    """Each script's command, --extra's flags in it, parsed before any run starts: a wrong flag ends here in one
    line, not in one failed run per row."""
    import contextlib
    import importlib
    import io

    from engine.errors import ConfigError

    for script in dict.fromkeys(row.script for row in rows):  # (each script once, in order)
        row = next(row for row in rows if row.script == script)
        line = command(args, experiment, row, args.seeds[0])
        argv = line[line.index(str(ROOT / script)) + 1 :]  # (after torchrun's arguments too, with --nproc)
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                importlib.import_module(Path(script).stem).parse_args(argv)
        except (ConfigError, SystemExit) as error:
            reason = str(error) if isinstance(error, ConfigError) else said.getvalue().strip().split("; `")[0]
            refuse(f"{script} refuses the command of '{row.label}': {reason.removeprefix('error: ')} (--extra?)")


def main(argv=None):
    args = parse_args(argv)
    given_epochs = args.epochs
    if args.list:
        if args.experiment == "claims":
            scale = SCALES[args.scale][0]
            listed = {f"claims (the {scale} rows they need)": EXPERIMENTS[scale]}
        else:
            listed = {name: EXPERIMENTS[name] for name in ([args.experiment] if args.experiment else EXPERIMENTS)}
        for name, experiment in listed.items():
            args.epochs = given_epochs or experiment.epochs
            print(f"{name}: {experiment.title} (paper dataset: {experiment.dataset})")
            for row in selected_rows(args, experiment):
                print(f"    {show(command(args, experiment, row, args.seeds[0]))}")
        if not args.experiment:
            print("claims: the paper's claims at the laptop scale (docs/claims.md), from the laptop runs they need;")
            print("    with --scale full, at full width (docs/claims-gpu.md), from the full-width runs they need")
        return 0
    name = SCALES[args.scale][0] if args.experiment == "claims" else args.experiment
    experiment = EXPERIMENTS[name]
    args.epochs = given_epochs or experiment.epochs
    rows = selected_rows(args, experiment)
    if not rows:
        print(f"error: no row of {args.experiment} has '{args.only}' in its label; see --list", file=sys.stderr)
        return 2
    if not args.table:
        check_commands(args, experiment, rows)
    jobs = [(row, seed) for seed in args.seeds for row in rows]  # seed by seed: a first seed of every row first
    failed = []
    if args.jobs == "auto" and not args.table:
        args.jobs = auto_jobs(args)
    if args.table and not any(row_results(args, name, experiment, row) for row in rows):
        again = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--table")
        print(
            f"error: {args.experiment} has no results yet (seeds {','.join(map(str, args.seeds))}, scale "
            f"{scale_name(args, experiment)}); make them with: python tools/reproduce.py {again}",
            file=sys.stderr,
        )
        return 2
    if args.table:
        complete = [True]
    elif args.jobs == 1:
        complete = [run_one(args, name, experiment, row, seed) for row, seed in jobs]
    else:
        try:
            failed = run_many(args, name, experiment, jobs)
        except KeyboardInterrupt:  # Ctrl-C: run_many has stopped the runs
            return 130
        complete = [not failed]
    if args.experiment == "claims":
        write_claims(args, name, experiment)
    elif name in ("laptop", "full-width", "search"):
        write_laptop_table(args, name, experiment, rows)
    else:
        write_table(args, name, experiment, rows)
    if failed:
        print(
            f"\n{len(failed)} of {len(jobs)} runs failed; fix the cause and run this command again to resume "
            f"them. Their logs:"
        )
        print("\n".join(f"    {log}" for log in failed))
    return 0 if all(complete) else 1


if __name__ == "__main__":
    sys.exit(main())
