"""One command that reports what a GPU does with this code, in at most eight minutes.

    python tools/gpu_report.py --data-dir cifar10-images                 # one GPU: docs/results/gpu/<device>/
    python tools/gpu_report.py --device cpu --data-dir cifar10-images    # no GPU: every part at tiny sizes

It prints, and writes as report.json and report.md under docs/results/gpu/<device>/ (for example
nvidia-h200), the parts below, in this order (--parts chooses some; a group name such as `jobs`
or `epoch` chooses all of its parts):

  versions            torch, CUDA, cuDNN, the GPU (name, memory, compute capability), the CPU
  cuda-tests          python -m pytest -q test_all.py -k cuda: passed, failed, seconds (the default run's
                      CUDA tests; the slow one, compiling over 3 epochs, is -m "" -k cuda's)
  epoch-all           tools/bench.py --real-epoch --profile: a real epoch of byol.py (batch 256, full
  epoch-projector     width, 50,000 synthetic CIFAR-sized images) against the lean step, with --ema-stages
                      all and projector; torch.profiler's summary of one lean step of each
  jobs-1 ... jobs-8   N short byol.py runs at once on the one GPU: their images per second together, the
                      peak memory of each; the best N, and what Table 1 (12 runs of 200 epochs) takes at it
  random              the random backbone of the same architecture on the same images (linear_eval.py
                      --random-init --no-augment): what the learning run must end above
  loader              --loader stream (ImageNet's path) at 224 pixels on generated JPEGs: images per second
                      per CPU core and on all, against a 224-pixel step: the cores one GPU needs
  epoch-compiled-all  the real epoch with --compile: the first epoch (mostly compiling) and the second,
  epoch-compiled-projector    each with a cold compiler cache of its own
  learning            a short full-width BYOL run on the JPEG folder (--data-dir): kNN and linear top-1,
                      its epochs and minutes (as many epochs as its time allows, at most 15: it takes up
                      what the parts before it left), and how far above the random backbone it ended

Why each part is a subprocess with a time limit: time on a GPU may come in windows of minutes, and a part
that hangs (a compilation, a deadlocked test, a run that never ends) must not take the report with it. Each part runs
in its own process group, killed whole (the part and every process it started) when its limit expires;
the report then says that it ran out of time, and keeps what it had written by then (its log, its runs'
metrics.jsonl). The limits are shares of --budget-seconds in proportion to each part's expected time
(`seconds` in `all_parts`); what a part leaves unused goes to the next one. report.json and report.md are
rewritten after every part, so that a report killed from outside still holds the parts it finished.
Ctrl-C or a SIGTERM (what `timeout` sends) kills the running part with the report, which marks it
interrupted; a SIGKILL cannot (the part would run on), so give an outer limit with `timeout`, not
`timeout -s KILL`. A part that ran out can be given more time alone: for example
`--parts epoch-compiled --budget-seconds 300`.

Each part's output goes to logs/<part>.log beside the report; its runs (with their checkpoints, not for
docs/) under --work-dir. A report already in the folder moves to earlier/<its date>-<its git revision>/
first, so that the reports before and after a change are both kept. tools/reproduce.py --jobs auto reads
the best N of runs at once from report.json.

Without a GPU it refuses, unless --device cpu is given: then every part runs at tiny sizes (SIZES), into
runs/gpu-report/ by default -- a check that the report works, not a measurement to keep.
"""

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.cli import ArgumentParser, HelpFormatter  # noqa: E402  (no torch at import)
from engine.files import git_revision  # noqa: E402

BUDGET_SECONDS = 480  # eight minutes: the default budget, at which each part's `seconds` is its share
RESERVE_SECONDS = 5  # of the budget, kept for the report's own start-up and last writing
CONTEXT_MB = 500  # memory a CUDA process holds beyond what torch allocates (its context): for the jobs' fit
TABLE1 = {"runs": 12, "epochs": 200, "steps": 195, "batch_size": 256}  # the paper's Table 1 on CIFAR: 12 rows
MAX_LEARNING_EPOCHS = 15


def refuse(message):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How large each part's runs are: the GPU's, or the CPU's tiny ones (--device cpu)."""

    images: int  # synthetic training images of the real-epoch parts
    batch_size: int
    width: int  # the backbone's width: 64 is the paper's ResNet-18
    image_size: int
    heads: tuple  # more flags for byol.py: small heads on the CPU
    jobs: tuple  # how many runs at once, one part each
    jobs_images: int  # synthetic training images of each of those runs (two epochs)
    learning_epochs: int  # of the learning run, when no real epoch was measured to size it by
    learning_overhead: int  # seconds of the learning run that are not epochs: start-up, decoding, the last kNN
    learning_images: tuple  # flags of the learning run (and the random backbone) that choose their images
    loader_images: int  # generated JPEGs of 300 to 500 pixels a side for the loader part (--loader stream at 224)


SIZES = {
    "cuda": Sizes(
        images=50000,
        batch_size=256,
        width=64,
        image_size=32,
        heads=(),
        jobs=(1, 2, 4, 8),
        jobs_images=20000,
        learning_epochs=5,
        learning_overhead=30,
        learning_images=(),  # all 50,000 training images, scored on the test split
        loader_images=2560,
    ),
    "cpu": Sizes(
        images=128,
        batch_size=16,
        width=8,
        image_size=16,
        heads=("--proj-hidden-dim", "64", "--pred-hidden-dim", "64"),
        jobs=(1, 2),
        jobs_images=64,
        learning_epochs=1,
        learning_overhead=15,
        learning_images=("--train-subset", "200", "--eval-split", "val", "--val-size", "100"),
        loader_images=40,
    ),
}


def parse_args(argv=None):
    gpu, cpu = SIZES["cuda"], SIZES["cpu"]
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default=None, help="the CIFAR-10 JPEG folder (train/, test/) of the learning run")
    p.add_argument("--out", default=None, help="default: docs/results/gpu on a GPU, runs/gpu-report on a CPU")
    p.add_argument("--work-dir", default=None, help="the runs' directories; default: runs/gpu-report/<device>/<date>")
    p.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS, help="all parts together, at most")
    p.add_argument("--parts", default=None, help="comma list of parts or groups (epoch, jobs, ...); default: all")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: every part at tiny sizes")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=None,
        help=f"images of the real-epoch parts; default: {gpu.images} on a GPU, {cpu.images} on a CPU",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"of every run; default: {gpu.batch_size} on a GPU, {cpu.batch_size} on a CPU",
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"the backbone's width in every run; default: {gpu.width} on a GPU, {cpu.width} on a CPU",
    )
    p.add_argument(
        "--jobs",
        default=None,
        help="comma list: how many runs at once, one part each; default: "
        f"{','.join(map(str, gpu.jobs))} on a GPU, {','.join(map(str, cpu.jobs))} on a CPU",
    )
    p.add_argument(
        "--jobs-images",
        type=int,
        default=None,
        help=f"synthetic images of each run at once; default: {gpu.jobs_images} on a GPU, {cpu.jobs_images} on a CPU",
    )
    p.add_argument(
        "--learning-epochs",
        type=int,
        default=None,
        help=f"epochs of the learning run; default: as many as its time allows (at most {MAX_LEARNING_EPOCHS})",
    )
    p.add_argument(
        "--train-subset",
        type=int,
        default=None,
        help="training images of the learning run and the random backbone; default: all on a GPU, "
        f"{' '.join(cpu.learning_images)} on a CPU",
    )
    args = p.parse_args(argv)
    sizes = SIZES[args.device]
    for name in ("synthetic_size", "batch_size", "width", "jobs_images", "learning_epochs", "train_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            refuse(f"--{name.replace('_', '-')} {value}: give a positive number, or leave it out for the default")
    if args.budget_seconds <= RESERVE_SECONDS:
        refuse(
            f"--budget-seconds {args.budget_seconds:g} leaves no time for the parts; give more than {RESERVE_SECONDS}"
        )
    try:
        jobs = tuple(int(n) for n in args.jobs.split(",")) if args.jobs else sizes.jobs
    except ValueError:
        refuse(f"--jobs {args.jobs!r}: give a comma list of counts, e.g. 1,2,4,8")
    if min(jobs) < 1:
        refuse(f"--jobs {args.jobs}: every count of runs at once must be at least 1")
    args.sizes = Sizes(
        images=args.synthetic_size or sizes.images,
        batch_size=args.batch_size or sizes.batch_size,
        width=args.width or sizes.width,
        image_size=sizes.image_size,
        heads=sizes.heads,
        jobs=jobs,
        jobs_images=args.jobs_images or sizes.jobs_images,
        learning_epochs=args.learning_epochs or sizes.learning_epochs,
        learning_overhead=sizes.learning_overhead,
        learning_images=("--train-subset", str(args.train_subset)) if args.train_subset else sizes.learning_images,
        loader_images=sizes.loader_images,
    )
    if args.data_dir is not None and not (Path(args.data_dir) / "train").is_dir():
        refuse(f"--data-dir {args.data_dir} has no train/ folder; point it at the CIFAR-10 JPEG folder (train/, test/)")
    for flag, path in (("--out", args.out), ("--work-dir", args.work_dir)):  # before the earlier report is set aside
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            refuse(f"{flag} {path} is a file; name a folder (made if missing)")
    # the parts run from the repository root: every path they are given is absolute
    args.data_dir, args.out, args.work_dir = (
        None if path is None else Path(path).absolute() for path in (args.data_dir, args.out, args.work_dir)
    )
    return args


# ---- the device ----------------------------------------------------------------------------


def device_slug(name):
    """The device's name as a folder name: 'NVIDIA H200' -> 'nvidia-h200'."""
    name = name.replace("(R)", "").replace("(TM)", "")  # (CPU names: 'Intel(R) Xeon(R) Processor')
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cpu_model():
    """The CPU's name as /proc/cpuinfo gives it."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return names[0].strip() if names else "CPU"


def find_device(device):
    """The device the parts run on: its kind (cuda or cpu), name and memory in MB. Without a GPU, --device
    cuda (the default) is refused in one line."""
    import torch

    if device == "cpu":
        return "cpu", cpu_model(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    if not torch.cuda.is_available():
        refuse("no CUDA GPU is visible here; pass --device cpu to run every part at tiny sizes")
    return "cuda", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**20


# ---- the parts -----------------------------------------------------------------------------


@dataclass
class Part:
    """One part of the report: a command run as a subprocess with a time limit, and how to read its results.

    command(ctx, limit): the command line (a list), built when the part starts, from what the parts before
    it measured (ctx.results) and its own time limit. read(ctx, log): its results as a dict, from its log
    and the files it wrote; also after it ran out of time or failed, from whatever it had written."""

    name: str
    seconds: float  # its expected time at the default budget: its share of --budget-seconds
    what: str  # one line for the report: what it measures
    command: Callable
    read: Callable
    needs_data: bool = False  # the learning run and the random backbone need --data-dir


VERSIONS_SCRIPT = """
import json, platform, torch, torchvision
cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_properties(0) if cuda else None
print(json.dumps({
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpus_visible": torch.cuda.device_count(),
    "gpu_memory_gb": round(gpu.total_memory / 2**30, 1) if cuda else None,
    "compute_capability": f"{gpu.major}.{gpu.minor}" if cuda else None,
    "torch_threads": torch.get_num_threads(),
    "platform": platform.platform(),
}))
"""


def last_json_line(text):
    """The last line of `text` that is a JSON object (the tools' summary line), or None."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def metrics_rows(run_dir):
    """The rows of a run's metrics.jsonl, as far as it got (none if it never wrote one; a last line cut short
    by a kill is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def byol_flags(ctx, images, stages="all"):
    """byol.py's flags of the synthetic runs: CIFAR-sized images, the report's batch and width."""
    s = ctx.sizes
    return [
        *("--dataset", "synthetic", "--synthetic-size", str(images), "--image-size", str(s.image_size)),
        *("--batch-size", str(s.batch_size), "--width", str(s.width), "--ema-stages", stages),
        *("--device", ctx.device, *s.heads),
    ]


def read_versions(ctx, log):
    return last_json_line(log) or {}


def read_tests(ctx, log):
    """pytest -q's counts: from its last line ('6 passed, 4 skipped, 2900 deselected in 45.2s'), or, when it
    was stopped before that line, from the progress characters it had printed (. passed, F failed, s skipped)."""
    for line in reversed(log.splitlines()):
        ended = re.search(r" in ([\d.]+)s", line)
        if ended and re.search(r"\d+ (passed|failed|skipped|error|deselected)", line):
            counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) ([a-z]+)", line)}
            return {
                "finished": True,
                "passed": counts.get("passed", 0),
                "failed": counts.get("failed", 0) + counts.get("error", 0),
                "skipped": counts.get("skipped", 0),
                "seconds": float(ended.group(1)),
            }
    progress = "".join(
        re.sub(r"\s*\[\s*\d+%\]$", "", line)
        for line in log.splitlines()
        if re.fullmatch(r"[.FEsxX]+(\s+\[\s*\d+%\])?", line)
    )
    return {
        "finished": False,
        "passed": progress.count("."),
        "failed": progress.count("F") + progress.count("E"),
        "skipped": progress.count("s"),
        "seconds": None,
    }


def epoch_part(stages, compiled, seconds):
    """tools/bench.py --real-epoch for one stage set, eager (with the profiler's summary) or with --compile."""
    name = f"epoch-{'compiled-' if compiled else ''}{stages}"

    def command(ctx, limit):
        flags = byol_flags(ctx, ctx.sizes.images, stages) + (["--compile"] if compiled else [])
        bench = ["tools/bench.py", "--real-epoch", shlex.join(flags), "--run-dir", from_root(ctx.work / name / "run")]
        if not compiled:
            return [sys.executable, *bench, "--profile"]
        # a cold compiler cache of its own: the compile time is the one a user's first compiled run pays. Its
        # path is absolute: inductor runs the C++ compiler from a folder of its own (torch 2.11 failed with a
        # relative one); shown() writes it relative to the root in the report
        cache = str((ctx.work / name / "compiler-cache").absolute())
        return [
            "env",
            f"TORCHINDUCTOR_CACHE_DIR={cache}",
            f"TRITON_CACHE_DIR={cache}/triton",
            sys.executable,
            *bench,
        ]

    def read(ctx, log):
        summary = last_json_line(log)
        if summary is not None:
            return summary
        # bench.py did not get to its summary: the epochs the run had written by then
        rows = metrics_rows(ctx.work / name / "run")
        return {"epochs_written": [{"epoch": r["epoch"], "epoch_seconds": r["epoch_seconds"]} for r in rows]}

    what = f"a real epoch of byol.py --ema-stages {stages}{' --compile' if compiled else ''} against the lean step" + (
        "" if compiled else "; torch.profiler's top ops of one lean step"
    )
    return Part(name, seconds, what, command, read)


def jobs_part(n):
    """N copies of a short byol.py run at once on the one device, each with its share of the CPU threads (as
    tools/reproduce.py --jobs N gives them: OMP_NUM_THREADS if set, else the cores // N); the part's command is
    one shell line that starts them and waits."""
    name = f"jobs-{n}"

    def command(ctx, limit):
        threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // n)
        runs = []
        for k in range(n):
            flags = byol_flags(ctx, ctx.sizes.jobs_images) + ["--epochs", "2", "--eval-every", "1000"]
            out_dir = from_root(ctx.work / name / f"run-{k}")
            byol = [sys.executable, "byol.py", *flags, "--seed", str(k), "--out-dir", out_dir]
            runs.append(f"OMP_NUM_THREADS={threads} {shlex.join(byol)} > {shlex.quote(out_dir + '.log')} 2>&1 &")
        return ["sh", "-c", " ".join(runs) + " wait"]

    def read(ctx, log):
        runs = []
        for k in range(n):
            rows = metrics_rows(ctx.work / name / f"run-{k}")
            second = [row for row in rows if row["epoch"] == 2]
            runs.append(
                {
                    "epochs": len(rows),
                    "images_per_second": second[0]["images_per_second"] if second else None,
                    "peak_memory_mb": max((row["peak_memory_mb"] for row in rows), default=None),
                    "images_trained": rows[-1]["step"] * ctx.sizes.batch_size if rows else 0,
                }
            )
        finished = [run for run in runs if run["images_per_second"] is not None]
        return {
            "runs": runs,
            "all_finished": len(finished) == n,
            # each run's images per second in its second epoch (start-up and the first epoch's warm-up aside)
            "images_per_second_summed": sum(run["images_per_second"] for run in finished),
            "images_trained": sum(run["images_trained"] for run in runs),
            "peak_memory_mb_summed": sum(run["peak_memory_mb"] or 0 for run in runs),
        }

    what = f"{n} byol.py run{'s' if n > 1 else ''} at once (2 epochs each): images per second together, memory"
    return Part(name, 15 + 4 * n, what, command, read)


def learning_epochs(ctx, limit):
    """The learning run's epochs: --learning-epochs if given; else as many as fit in its time limit at the real
    epoch's speed measured by epoch-all (scaled to the run's images; 10 % more for each epoch's probe
    evaluation), at most MAX_LEARNING_EPOCHS; else the device's default."""
    if ctx.args.learning_epochs:
        return ctx.args.learning_epochs
    measured = ctx.results.get("epoch-all", {})
    if "real_epoch_seconds" not in measured:
        return ctx.sizes.learning_epochs
    seconds_per_image = measured["real_epoch_seconds"] / (measured["steps_per_epoch"] * measured["batch_size"])
    epoch_seconds = 1.1 * seconds_per_image * ctx.train_images
    fits = int((limit - ctx.sizes.learning_overhead) / epoch_seconds)
    return max(1, min(MAX_LEARNING_EPOCHS, fits))


def learning_command(ctx, limit):
    epochs = learning_epochs(ctx, limit)
    ctx.learning_epochs = epochs  # for the report: the epochs it was asked for
    s = ctx.sizes
    return [
        *(sys.executable, "byol.py", "--dataset", "imagefolder", "--data-dir", from_root(ctx.args.data_dir)),
        *("--width", str(s.width), "--batch-size", str(s.batch_size), *s.heads, *s.learning_images),
        *("--epochs", str(epochs), "--eval-every", str(epochs), "--device", ctx.device),
        *("--out-dir", from_root(ctx.work / "learning" / "run")),
    ]


def read_learning(ctx, log):
    rows = metrics_rows(ctx.work / "learning" / "run")
    with_knn = [row for row in rows if row.get("knn_top1") is not None]
    return {
        "epochs_asked": getattr(ctx, "learning_epochs", None),  # (set by learning_command)
        "epochs": len(rows),
        "linear_top1": rows[-1]["linear_top1"] if rows else None,  # the online probe's (the paper's "Acc")
        "knn_top1": with_knn[-1]["knn_top1"] if with_knn else None,
        "knn1_top1": with_knn[-1]["knn1_top1"] if with_knn else None,
        "knn_epoch": with_knn[-1]["epoch"] if with_knn else None,
        "training_seconds": sum(row["epoch_seconds"] for row in rows),
        "images_per_second": rows[-1]["images_per_second"] if rows else None,
    }


def random_command(ctx, limit):
    s = ctx.sizes
    return [
        *(sys.executable, "linear_eval.py", "--random-init", "--no-augment"),
        *("--dataset", "imagefolder", "--data-dir", from_root(ctx.args.data_dir), "--width", str(s.width)),
        *("--batch-size", str(s.batch_size), *s.learning_images, "--device", ctx.device),
        *("--out", from_root(ctx.work / "random" / "linear_eval.json")),
    ]


def read_random(ctx, log):
    path = ctx.work / "random" / "linear_eval.json"
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    return {key: result.get(key) for key in ("top1", "top5", "knn_top1", "knn1_top1")}


# The JPEGs are made on every core, each from a seed of its own, with numpy (no torch in the forked workers): made
# one at a time with torch they took 23 ms each on the 2-core CPU (440 in 10.1 s beside other work), about 65 s for
# the 2,816 of a GPU's run, past the part's share; so made, 2,816 took 5.7 s there.
LOADER_SCRIPT = """
import multiprocessing, os, subprocess, sys
from pathlib import Path
import numpy as np
from PIL import Image
root, count, batch, device = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def make(job):
    split, i = job
    path = root / split / f"class{i % 2}" / f"{i}.jpg"
    if not path.exists():
        rng = np.random.default_rng([i, split == "val"])
        height, width = rng.integers(300, 501, size=2)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
jobs = [(split, i) for split, n in (("train", count), ("val", max(count // 10, 3))) for i in range(n)]
for split in ("train", "val"):
    for label in (0, 1):
        (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)
with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
    pool.map(make, jobs, chunksize=32)
bench = ["tools/bench.py", "--loader-throughput", str(root), "--device", device, "--batch-size", batch]
sys.exit(subprocess.run([sys.executable, *bench, "--loader-batches", "3", "--steps", "10"]).returncode)
"""


def loader_part():
    """--loader stream's images per second on one core and on all, against a 224-pixel step on the device: the
    cores one GPU needs for ImageNet (tools/bench.py --loader-throughput), on JPEGs of ImageNet's sizes made
    here (300 to 500 pixels a side, random pixels: they decode as slowly as photographs or slower)."""

    def command(ctx, limit):
        folder = from_root(ctx.work / "loader-jpegs")
        batch = str(256 if ctx.device == "cuda" else 4)
        return [sys.executable, "-c", LOADER_SCRIPT, folder, str(ctx.sizes.loader_images), batch, ctx.device]

    what = "--loader stream at 224 pixels: images per second per CPU core and on all, the cores a 224-pixel step needs"
    return Part("loader", 25, what, command, lambda ctx, log: last_json_line(log) or {})


def all_parts(sizes):
    """Every part, in the order they run: the cheap and the most asked-for first; the random backbone before
    the learning run; the compiled epochs late (compiling is what most often takes longer than planned: a
    compiled bench of git 6bf4e4d did not finish in 130 s on an H200), and the learning run last, since it
    sizes its epochs to the time it is given and so takes up whatever the parts before it left."""
    return [
        Part(
            "versions",
            10,
            "torch, CUDA, cuDNN and the device, as a fresh process sees them",
            lambda ctx, limit: [sys.executable, "-c", VERSIONS_SCRIPT],
            read_versions,
        ),
        Part(
            "cuda-tests",
            60,
            "python -m pytest -q test_all.py -k cuda: passed, failed, seconds",
            lambda ctx, limit: [sys.executable, "-m", "pytest", "-q", "test_all.py", "-k", "cuda"],
            read_tests,
        ),
        epoch_part("all", compiled=False, seconds=40),
        epoch_part("projector", compiled=False, seconds=35),
        *[jobs_part(n) for n in sizes.jobs],
        Part(
            "random",
            20,
            "the random backbone on the same images (linear_eval.py --random-init --no-augment)",
            random_command,
            read_random,
            needs_data=True,
        ),
        loader_part(),
        epoch_part("all", compiled=True, seconds=80),
        epoch_part("projector", compiled=True, seconds=55),
        Part(
            "learning",
            35,
            "a short BYOL run on the JPEG folder: kNN and linear top-1, epochs, minutes",
            learning_command,
            read_learning,
            needs_data=True,
        ),
    ]


def select_parts(parts, wanted):
    """The parts --parts names: a part's name, or a group (`epoch` is every epoch-... part, `jobs` every jobs-N)."""
    if wanted is None:
        return parts
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    chosen = [p for p in parts if any(p.name == name or p.name.startswith(name + "-") for name in names)]
    unknown = [name for name in names if not any(p.name == name or p.name.startswith(name + "-") for p in parts)]
    if unknown or not chosen:
        asked = ", ".join(unknown) if unknown else repr(wanted)
        refuse(f"--parts: no part {asked}; choose from {', '.join(p.name for p in parts)}")
    return chosen


# ---- running a part ------------------------------------------------------------------------


def shown(command):
    """A command as one line a user can paste, from the repository root (this interpreter shown as python, the
    paths inside the repository relative to it)."""
    return shlex.join(command).replace(sys.executable, "python").replace(f"{ROOT}{os.sep}", "")


def from_root(path):
    """A path as the parts are given it: relative to the repository root (where they run) when it lies inside,
    so that the commands and logs kept in the report name no folder of this machine; else absolute."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_part(command, limit, log_path):
    """Run `command` from the repository root in a process group of its own, its output to log_path; when
    `limit` seconds have passed, kill the group whole. Returns (status, exit code, seconds).

    The part's process is waited for without being reaped (os.waitid with WNOWAIT): until it is, its process
    id -- which is also the group's -- cannot be given to another process, so the group killed afterwards is
    this part's (and what it started and left running), never a stranger's. Ctrl-C or a SIGTERM of the report
    kills the group too."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {shown(command)}\n")
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log as it happens: what a killed part had printed
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        try:
            ended = None
            while ended is None and time.monotonic() - started < limit:
                time.sleep(0.05)
                ended = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        finally:  # on time, on expiry, or on Ctrl-C: nothing of the part outlives it
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:  # (no process of the group is left)
                pass
            process.wait()
    seconds = time.monotonic() - started
    if ended is None:
        return "ran out of time", None, seconds
    return ("done" if process.returncode == 0 else "failed"), process.returncode, seconds


# ---- the report ----------------------------------------------------------------------------


def write_report(report, out_dir):
    """report.json and report.md, each replaced whole (a report killed while writing keeps the previous one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown(report))):
        partial = out_dir / f"{name}.tmp"
        partial.write_text(text)
        os.replace(partial, out_dir / name)


def keep_earlier(out_dir):
    """Move a report already in out_dir (report.json, report.md, logs/) to earlier/<its date>-<its revision>/."""
    previous = out_dir / "report.json"
    if not previous.exists():
        return
    try:
        old = json.loads(previous.read_text())
        stamp = f"{old['started'].replace(' ', '-').replace(':', '')}-{old['git_revision']}"
    except (ValueError, KeyError):
        stamp = time.strftime("%Y-%m-%d-%H%M%S", time.localtime(previous.stat().st_mtime))
    destination = out_dir / "earlier" / stamp
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md", "logs"):
        if (out_dir / name).exists():
            os.replace(out_dir / name, destination / name)


def table1_hours(rates, n):
    """Hours of training (start-up and evaluation aside) that Table 1's 12 runs take, `n` at a time, at the
    measured images per second of all runs together (`rates`: runs at once -> images per second). The last
    round runs the runs left over; its rate is the measured one for that many, else n's per-run rate."""
    images_per_run = TABLE1["epochs"] * TABLE1["steps"] * TABLE1["batch_size"]
    seconds, left = 0.0, TABLE1["runs"]
    while left > 0:
        at_once = min(n, left)
        rate = rates.get(at_once, rates[n] * at_once / n)
        seconds += at_once * images_per_run / rate
        left -= at_once
    return seconds / 3600


def summarise(report):
    """The numbers that compare parts: projector against all, the best N of runs at once and Table 1's time at
    it, the learning run against the random backbone."""
    parts = report["parts"]

    def results(name):
        return parts.get(name, {}).get("results") or {}

    summary = {}
    for mode in ("", "compiled-"):
        all_, projector = results(f"epoch-{mode}all"), results(f"epoch-{mode}projector")
        if "real_epoch_seconds" in all_ and "real_epoch_seconds" in projector:
            key = "compiled" if mode else "eager"
            summary[f"projector_over_all_{key}"] = projector["real_epoch_seconds"] / all_["real_epoch_seconds"]
            summary[f"projector_over_all_lean_{key}"] = projector["lean_epoch_seconds"] / all_["lean_epoch_seconds"]
    jobs = {}
    for name, part in parts.items():
        if name.startswith("jobs-") and part.get("results", {}).get("runs"):
            n, r = int(name.split("-")[1]), part["results"]
            memory_mb = r["peak_memory_mb_summed"] + (n * CONTEXT_MB if report["device"] == "cuda" else 0)
            jobs[n] = {
                "images_per_second_summed": r["images_per_second_summed"],
                "images_per_second_wall": r["images_trained"] / part["seconds"] if part.get("seconds") else None,
                "fits_in_memory": memory_mb <= report["device_memory_mb"],
                "all_finished": r["all_finished"],
            }
    if jobs:
        summary["jobs"] = {str(n): row for n, row in sorted(jobs.items())}
        usable = {n: row for n, row in jobs.items() if row["all_finished"] and row["fits_in_memory"]}
        if usable:
            best = max(usable, key=lambda n: usable[n]["images_per_second_summed"])
            rates = {n: row["images_per_second_summed"] for n, row in usable.items()}
            summary["best_jobs"] = best
            summary["table1_hours_at_best_jobs"] = table1_hours(rates, best)
            if 1 in rates:
                summary["table1_hours_one_at_a_time"] = table1_hours(rates, 1)
    learned, random = results("learning"), results("random")
    for ours, theirs, key in (("knn_top1", "knn_top1", "knn"), ("linear_top1", "top1", "linear")):
        if learned.get(ours) is not None and random.get(theirs) is not None:
            summary[f"learning_over_random_{key}_points"] = learned[ours] - random[theirs]
    return summary


# ---- Markdown ------------------------------------------------------------------------------


def number(value, digits=2):
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report):
    """The report as a page: the device and versions, each part's status, then each part's numbers."""
    parts, summary = report["parts"], report.get("summary", {})
    took = f", took {report['seconds']:.0f} s" if report.get("seconds") is not None else " (not finished)"
    lines = [
        f"# What one {report['device_name']} does with this code",
        "",
        f"`{report['command']}`, started {report['started']}, git {report['git_revision']}, {report['cpu']} "
        f"({report['cpu_cores']} cores); budget {report['budget_seconds']:g} s{took}",
        "",
    ]
    if report["device"] == "cpu":
        lines += ["On the CPU at tiny sizes (--device cpu): a check that the report works, not a measurement.", ""]
    versions = parts.get("versions", {}).get("results") or {}
    if versions:
        lines += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in versions.items()] + [""]
    lines += [
        "## Parts",
        "",
        "| part | what it measures | status | seconds | share (s) | limit (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, part in parts.items():
        lines.append(
            f"| {name} | {part['what']} | {part['status']} | {number(part.get('seconds'), 1)} "
            f"| {number(part.get('share_seconds'), 0)} | {number(part.get('limit_seconds'), 0)} |"
        )
    lines += [
        "",
        "A part's share is its part of the budget; its limit, that share and what the parts before it left "
        "unused. Each part's command and output: logs/<part>.log beside this page.",
        "",
    ]
    lines += tests_section(parts) + epochs_section(parts, summary) + jobs_section(parts, summary)
    lines += learning_section(report, summary) + loader_section(parts)
    return "\n".join(lines) + "\n"


def loader_section(parts):
    """--loader stream's images per second against a 224-pixel step's: the CPU cores one GPU needs (ImageNet)."""
    loader = parts.get("loader", {}).get("results") or {}
    if not loader.get("step_images_per_second"):
        return []
    cores = loader["cores_needed"]  # (two digits below one: on a CPU a step needs a small part of a core)
    return [
        "## ImageNet's loader: how many CPU cores one GPU needs",
        "",
        "| | images / s |",
        "|---|---|",
        f"| --loader stream, 1 worker (1 core), two 224-pixel views an image | "
        f"{number(loader['loader_images_per_second_one_core'], 0)} |",
        f"| --loader stream, {loader['cores']} workers | {number(loader['loader_images_per_second_all_cores'], 0)} |",
        f"| a BYOL step at 224 pixels, ImageNet stem, on {loader['device']} | "
        f"{number(loader['step_images_per_second'], 0)} |",
        "",
        f"The step consumes what {number(cores, 1 if cores is None or cores >= 1 else 2)} cores deliver at one "
        "core's pace (generated JPEGs of 300 to 500 pixels a side).",
        "",
    ]


def tests_section(parts):
    tests = parts.get("cuda-tests", {}).get("results")
    if not tests:
        return []
    how = f"in {tests['seconds']:.1f} s" if tests["finished"] else "before it ran out of time (then killed)"
    return [
        "## CUDA tests",
        "",
        f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped {how}.",
        "",
    ]


def epochs_section(parts, summary):
    epochs = {name: part for name, part in parts.items() if name.startswith("epoch-") and part.get("results")}
    if not epochs:
        return []
    lines = [
        "## A real epoch against the lean step",
        "",
        "| part | real epoch (s) | first epoch (s) | lean step x steps (s) | real / lean | images / s "
        "| peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, part in epochs.items():
        r = part["results"]
        if "real_epoch_seconds" in r:
            cells = [
                number(r["real_epoch_seconds"]),
                number(r["first_epoch_seconds"]),
                number(r["lean_epoch_seconds"]),
                number(r["overhead"]),
                number(r["images_per_second"], 0),
                number(r["peak_memory_mb"], 0),
            ]
            lines.append(f"| {name} | {' | '.join(cells)} |")
        else:  # it ran out of time or failed: the epochs its run had written
            written = ", ".join(f"epoch {e['epoch']}: {e['epoch_seconds']:.1f} s" for e in r.get("epochs_written", []))
            lines.append(f"| {name} | {part['status']}; the run had written {written or 'no epoch'} | | | | | |")
    ratios = []
    for mode in ("eager", "compiled"):
        if f"projector_over_all_{mode}" in summary:
            real, lean = summary[f"projector_over_all_{mode}"], summary[f"projector_over_all_lean_{mode}"]
            ratios.append(f"{mode} {real:.2f} (lean step {lean:.2f})")
    if ratios:
        lines += ["", f"projector / all, real epoch: {'; '.join(ratios)} (FLOPs: 0.75)."]
    lines += [
        "",
        "The first epoch's time beyond the second is the warm-up (cuDNN's autotuner, the allocator); with "
        "--compile, mostly compiling (each compiled part starts from an empty compiler cache).",
        "",
    ]
    for name, part in epochs.items():
        profile = part["results"].get("profile")
        if profile:
            operations = part["results"].get("lean_step_operations")
            dispatched = f"; {operations:,} operations dispatched" if operations else ""
            lines += [
                f"### {name}: where one lean step's time goes (torch.profiler, {profile['clock']} time, "
                f"{profile['total_ms']:.1f} ms in all{dispatched})",
                "",
                "| op | calls | ms | share |",
                "|---|---|---|---|",
            ]
            for op in profile["ops"][:10]:
                name_cell = op["name"].replace("|", "/")  # (a kernel's name may hold the table's separator)
                lines.append(f"| {name_cell} | {op['calls']} | {op['ms']:.2f} | {100 * op['share']:.1f} % |")
            lines.append("")
    return lines


def jobs_section(parts, summary):
    if "jobs" not in summary:
        return []
    lines = [
        "## Runs at once on the one device",
        "",
        "| runs at once | images / s together (each run's second epoch, summed) | images / s over the wall time "
        "| peak memory of each (MB) | all finished | fits in memory |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in summary["jobs"].items():
        memories = ", ".join(number(run["peak_memory_mb"], 0) for run in parts[f"jobs-{n}"]["results"]["runs"])
        cells = [
            number(row["images_per_second_summed"], 0),
            number(row["images_per_second_wall"], 0),
            memories,
            "yes" if row["all_finished"] else "no",
            "yes" if row["fits_in_memory"] else "no",
        ]
        lines.append(f"| {n} | {' | '.join(cells)} |")
    if "best_jobs" in summary:
        one_at_a_time = summary.get("table1_hours_one_at_a_time")
        lines += [
            "",
            f"Best: {summary['best_jobs']} at once (`tools/reproduce.py --jobs auto` takes it from this report). "
            f"Table 1 ({TABLE1['runs']} runs of {TABLE1['epochs']} epochs of {TABLE1['steps']} steps) would take "
            f"about {summary['table1_hours_at_best_jobs']:.1f} h of training at it"
            + (f", against {one_at_a_time:.1f} h one at a time" if one_at_a_time is not None else "")
            + " (start-up and evaluation aside).",
        ]
    return lines + [""]


def learning_section(report, summary):
    parts = report["parts"]
    learned, random = parts.get("learning", {}).get("results"), parts.get("random", {}).get("results")
    if not learned and not random:
        return []
    lines = ["## A short learning run", ""]
    if learned:
        minutes = (parts["learning"].get("seconds") or 0) / 60
        lines.append(
            f"byol.py on {report['data_dir']}: {learned['epochs']} of {learned['epochs_asked']} epochs in "
            f"{minutes:.1f} min ({parts['learning']['status']}); kNN top-1 {number(learned['knn_top1'])} "
            f"(after epoch {learned['knn_epoch'] or '-'}), linear top-1 (the online probe) "
            f"{number(learned['linear_top1'])}."
        )
    if random:
        lines.append(
            f"The random backbone on the same images: kNN top-1 {number(random['knn_top1'])}, linear top-1 "
            f"{number(random['top1'])} (a classifier trained on its fixed features)."
        )
    if "learning_over_random_knn_points" in summary:
        linear = summary.get("learning_over_random_linear_points")
        lines.append(
            f"The run against the random backbone: {summary['learning_over_random_knn_points']:+.1f} points in kNN"
            + (f", {linear:+.1f} in linear top-1" if linear is not None else "")
            + "."
        )
    return lines


# ---- the command ---------------------------------------------------------------------------


def stop_on_sigterm(signum, frame):
    """A SIGTERM (an outer time limit, say) ends the report as Ctrl-C does: the running part's group is
    killed and the report written, instead of the report dying and its part running on."""
    raise KeyboardInterrupt


def run_parts(parts, ctx, report, out_dir, seconds):
    """Run the parts one after another within `seconds` in all, each with its time limit, and rewrite the
    report before and after each. Each part's share of the time is in proportion to its expected seconds; it
    may also use what the parts before it left unused: its limit is their shares and its own, less the time
    they took. So the shares add up to `seconds`, and so does the time taken, whatever each part does."""
    started = time.monotonic()
    expected = sum(part.seconds for part in parts)
    shares_so_far = 0.0
    for part in parts:
        record = report["parts"][part.name]
        share = part.seconds * seconds / expected
        shares_so_far += share
        limit = shares_so_far - (time.monotonic() - started)
        record["share_seconds"] = share
        if limit < 1:
            record["status"] = "skipped: the budget was spent"
            continue
        (ctx.work / part.name).mkdir(parents=True, exist_ok=True)
        command = part.command(ctx, limit)
        log = out_dir / "logs" / f"{part.name}.log"
        record.update(status="running", limit_seconds=limit, command=shown(command), log=f"logs/{part.name}.log")
        write_report(report, out_dir)
        line = shown(command).replace("\n", " ")
        line = line if len(line) < 300 else line[:300] + " ..."  # (the whole command is in the log and the JSON)
        print(f"[{time.monotonic() - started:5.0f} s] {part.name} (at most {limit:.0f} s): {line}", flush=True)
        status, exit_code, part_seconds = run_part(command, limit, log)
        try:
            results = part.read(ctx, log.read_text(errors="replace"))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as error:  # odd output: said, not fatal
            results = {"error": f"could not read the part's results: {error!r}"}
        ctx.results[part.name] = results
        record.update(status=status, exit_code=exit_code, seconds=part_seconds, results=results)
        report["summary"] = summarise(report)
        report["best_jobs"] = report["summary"].get("best_jobs")  # what tools/reproduce.py --jobs auto reads
        write_report(report, out_dir)
        print(f"[{time.monotonic() - started:5.0f} s] {part.name}: {status} after {part_seconds:.1f} s", flush=True)


def context(args, device, work):
    """What the parts' commands are built from and read with: the flags, the device (cuda or cpu), the sizes,
    the work folder, the results of the parts run so far, and the training images of the learning run."""
    train_images = sum(1 for _ in (args.data_dir / "train").glob("*/*")) if args.data_dir else 0
    flags = list(args.sizes.learning_images)
    if "--train-subset" in flags:
        train_images = min(train_images, int(flags[flags.index("--train-subset") + 1]))
    return argparse.Namespace(
        args=args, device=device, sizes=args.sizes, work=Path(work), results={}, train_images=train_images
    )


def main(argv=None, parts=None):
    """Run the report. parts: instead of all_parts (the tests pass fake ones)."""
    started = time.monotonic()
    args = parse_args(argv)
    device, device_name, memory_mb = find_device(args.device)
    slug = device_slug(device_name)
    out_root = args.out or ROOT / ("docs/results/gpu" if device == "cuda" else "runs/gpu-report")
    out_dir = out_root / slug
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    work = args.work_dir or ROOT / "runs" / "gpu-report" / slug / stamp.replace(" ", "-")
    parts = select_parts(parts if parts is not None else all_parts(args.sizes), args.parts)
    ctx = context(args, device, work)
    report = {
        "command": shown([sys.executable, "tools/gpu_report.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": stamp,
        "git_revision": git_revision(mark_changes=True),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "device": device,
        "device_name": device_name,
        "device_memory_mb": memory_mb,
        "budget_seconds": args.budget_seconds,
        "data_dir": from_root(args.data_dir) if args.data_dir else None,
        "work_dir": from_root(work),
        "seconds": None,
        "parts": {},
        "summary": {},
    }
    for part in parts:
        skipped = part.needs_data and not args.data_dir
        report["parts"][part.name] = {
            "what": part.what,
            "status": "skipped: no --data-dir given" if skipped else "not run yet",
        }
    keep_earlier(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_report(report, out_dir)
    to_run = [part for part in parts if report["parts"][part.name]["status"] == "not run yet"]
    print(
        f"{device_name}: {len(to_run)} parts in at most {args.budget_seconds:g} s; the report: "
        f"{out_dir / 'report.md'} (rewritten after every part)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run_parts(to_run, ctx, report, out_dir, args.budget_seconds - RESERVE_SECONDS - (time.monotonic() - started))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: run_part has killed the running part's group
        for record in report["parts"].values():
            if record["status"] == "running":
                record["status"] = "interrupted"
        report["seconds"] = time.monotonic() - started
        write_report(report, out_dir)
        print(f"interrupted; the report so far: {out_dir / 'report.md'}", file=sys.stderr)
        return 130
    report["seconds"] = time.monotonic() - started
    write_report(report, out_dir)
    print("\n" + markdown(report))
    not_done = [f"{name} ({part['status']})" for name, part in report["parts"].items() if part["status"] != "done"]
    if not_done:
        print(f"not done: {', '.join(not_done)}", file=sys.stderr)
    # exit 1 when a part failed or ran out of time (the report is written either way); skipped parts are no error
    return 1 if any(report["parts"][part.name]["status"] in ("failed", "ran out of time") for part in to_run) else 0


if __name__ == "__main__":
    sys.exit(main())
