"""Benchmark: what the paper's cost claim looks like on this machine, measured in one run.

    python tools/bench.py --device cpu --batch-size 32 --steps 3          # about a minute on 2 CPU cores
    python tools/bench.py --device cuda --batch-size 256 --steps 50 --aug-images 16384 --aug-chunk 16 \
        --methods byol,simsiam,simclr,mocov2,dino,ressl

1. Augmentation throughput (views per second): our batched pipeline (engine.data.Views, as the
   training scripts use it, with --aug-chunk 1, 4 and 16 batches per call) against torchvision's
   per-image PIL pipeline with the same BYOL recipe, the PIL pipeline in a DataLoader with as
   many worker processes as torch has threads.
2. Training steps of each method file, run as a user runs it (a subprocess on synthetic
   CIFAR-sized data), with its classic --ema-stages, with `projector` and with `none`:
   the columns of the paper's Table 4. The first of two epochs is a warm-up; the second is timed.
3. The ideal step-time ratio from counted FLOPs beside the measured one. Ideal: a training step
   costs 3 backbone forwards per view for the online network (forward + backward = 1 + 2) plus
   (forwards per image - 1) for the target; heads, augmentation and the optimiser are ignored.

With --real-epoch FLAGS, instead: the project's overhead. byol.py trains two epochs with FLAGS
(any --dataset, e.g. '--preset laptop --dataset imagefolder --data-dir DIR'); the second epoch's
time (kNN aside: epoch_seconds stops before evaluation) is set next to a lean BYOL step built
from the same modules and flags -- the same backbone, heads, EMA target and optimiser, in
channels_last, under the run's settings (cuDNN's autotuner, TF32), compiled as the run compiles
them when FLAGS has --compile, on a fixed batch: no augmentation, no logging, no Python around
it -- times the steps per epoch. The ratio real / lean is what the project's loop, augmentation
and bookkeeping cost. The first epoch is timed too: what it takes beyond the second is the
warm-up, and with --compile mostly the compilation. With --compile the lean step is timed after
the run only, so that the run compiles first, as a user's run does (before it, the lean step
would fill the compiler's cache for the run). --profile adds torch.profiler's summary of one
lean step: the ops that took the most GPU time (CPU time on a CPU), to show what costs the time.
Without --compile (with or without --profile) it counts the operations one lean step dispatches
(engine.measure.operations_dispatched): on a GPU most are a kernel launch each, so when the GPU waits
for Python a step costs what this count says.
--run-dir keeps the run's directory (metrics.jsonl) where a caller can read it, even if this
tool is stopped (tools/gpu_report.py does).

    python tools/bench.py --real-epoch "--preset laptop --dataset imagefolder --data-dir DIR"
    python tools/bench.py --real-epoch "--dataset synthetic --synthetic-size 50000 --device cuda --compile"

With --efficiency FLAGS, instead: how much of the CPU a laptop step uses. The float32 peak as torch
reaches it (2048 x 2048 matrix products, on 1 thread and on all), the FLOPs of one lean BYOL step built
from byol.py's FLAGS (torch's counter: convolutions and matrix products, forward and backward), its
time and share of the peak on all threads, with channels_last, and on 1 thread, and the time of the
end-of-epoch evaluation at the run's sizes (the probe's test features every epoch; kNN's training
features too every --eval-every epochs), all in one run.

    python tools/bench.py --efficiency "--preset laptop" --steps 10

Prints a Markdown table, then one JSON line with the headline ratios `aug_speedup` and
`byol_projector_over_all_step_time`. Nothing here is a test: numbers depend on the machine,
and on what else runs on it -- the header gives the load average before the run; on a machine
busy with other work, multi-threaded torch slows down far more than the PIL worker processes.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from engine.cli import ArgumentParser, HelpFormatter, check_ranges  # noqa: E402
from engine.data import Data, Views  # noqa: E402
from engine.device import check_device, compile_stages, timer, to_device  # noqa: E402
from engine.measure import operations_dispatched  # noqa: E402

CLASSIC = {"byol": "all", "simsiam": "none", "simclr": "none", "mocov2": "all", "dino": "all", "ressl": "all"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=common.positive(int, at_most=2**16), default=32)
    p.add_argument("--steps", type=common.positive(int), default=3, help="timed training steps per configuration")
    p.add_argument("--methods", default="byol", help="comma list of method files to time")
    p.add_argument("--aug-images", type=common.positive(int), default=2048, help="images augmented per pipeline")
    p.add_argument(
        "--aug-chunk",
        type=common.positive(int, at_most=2**10),
        default=1,
        help="--aug-chunk of the timed training runs, and of the augmentation speed-up in the final JSON line",
    )
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--extra", default="", help="extra flags for every method run, e.g. '--queue-size 4096'")
    p.add_argument(
        "--real-epoch",
        default=None,
        metavar="FLAGS",
        help="time two real epochs of byol.py with these "
        "flags against a lean step of the same modules, and print the overhead (nothing else is timed); one flag "
        "alone is written --real-epoch='--preset laptop'",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --real-epoch: also profile one lean step (torch.profiler) and list the ops that took the most "
        "time, GPU time on CUDA and CPU time on a CPU",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="with --real-epoch: the run's directory (metrics.jsonl, ...), kept; default: a temporary one",
    )
    p.add_argument(
        "--loader-throughput",
        default=None,
        metavar="DIR",
        help="--loader stream on the image folder DIR (train/ and val/ or test/): images per second its workers "
        "deliver (two 224-pixel views each, cut from the whole image) with 1 worker and with one per CPU core, "
        "against the images per second a lean BYOL step with the ImageNet stem consumes at 224 pixels on "
        "--device (batch --batch-size, --steps timed steps); prints how many CPU cores that device needs",
    )
    p.add_argument(
        "--loader-batches",
        type=common.positive(int),
        default=8,
        help="--loader-throughput: batches each worker reads (fewer images a batch where the folder is small)",
    )
    p.add_argument(
        "--efficiency",
        default=None,
        metavar="FLAGS",
        help="on the CPU: the float32 matmul peak, the FLOPs and time of a lean BYOL step built from byol.py's "
        "FLAGS (e.g. '--preset laptop'), its share of the peak with and without channels_last and with 1 thread, "
        "and the end-of-epoch evaluation's time at the run's sizes (nothing else is timed)",
    )
    args = p.parse_args(argv)
    check_ranges(args, p)  # one line for a value out of its range (its type: engine.cli.Range)
    check_device(args.device)
    if (args.profile or args.run_dir) and args.real_epoch is None:
        flag = "--profile" if args.profile else "--run-dir"
        raise common.ConfigError(f"{flag} belongs to --real-epoch; add --real-epoch FLAGS or leave {flag} out")
    for flag, text in (("--real-epoch", args.real_epoch), ("--efficiency", args.efficiency)):
        try:
            words = shlex.split(text or "")
        except ValueError as error:  # (an unclosed quote)
            raise common.ConfigError(f"{flag} {text!r}: {error}; give byol.py's flags as one quoted argument")
        if flag == "--real-epoch" and any(word.startswith("--out-dir") for word in words):
            raise common.ConfigError(
                "--real-epoch's run writes to --run-dir (by default a temporary folder); take --out-dir out of FLAGS"
            )
    unknown = [m for m in args.methods.split(",") if m not in CLASSIC]
    if unknown:
        raise common.ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(CLASSIC)}")
    if args.aug_chunk < 1 or args.aug_chunk * args.batch_size > args.aug_images:
        p.error(
            f"--aug-chunk {args.aug_chunk} must be at least 1 and its batches fit in --aug-images {args.aug_images}; "
            f"lower --aug-chunk or raise --aug-images"
        )
    return args


# ---- 1. augmentation ---------------------------------------------------------------------


class PILViews(torch.utils.data.Dataset):
    """Per-image PIL augmentation, as a DataLoader worker does it in solo-learn."""

    def __init__(self, images, transform):
        from PIL import Image

        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


def views_per_second(images, batch_size, chunk, device):
    """Views per second of engine.data.Views, the training scripts' augmentation, with --aug-chunk `chunk`."""
    data = SimpleNamespace(
        train_images=images,
        train_labels=torch.zeros(len(images), dtype=torch.long, device=device),
        mean=torch.full((3,), 0.5, device=device),
        std=torch.full((3,), 0.25, device=device),
    )
    recipe = common.ViewRecipe(size=32)  # BYOL's first view: crop, jitter 0.8, grayscale 0.2, flip
    views = Views(data, [recipe], batch_size, chunk, torch.Generator(device).manual_seed(0), common.augment)
    order, batches = torch.arange(len(images), device=device), len(images) // batch_size
    views.batch(order, -1, 0)  # warm-up
    start = timer(device)
    for i in range(batches):
        views.batch(order, 0, i)
    return batches * batch_size / (timer(device) - start)


def bench_augmentation(args, device):
    import torchvision.transforms as T

    images = (torch.rand(args.aug_images, 3, 32, 32) * 255).to(torch.uint8)
    # Ours, on the run device: as the training scripts make views, --aug-chunk batches at a time.
    on_device = images.to(device)
    ours = {
        chunk: views_per_second(on_device, args.batch_size, chunk, device)
        for chunk in sorted({1, 4, 16, args.aug_chunk})
        if chunk * args.batch_size <= len(images)
    }
    # torchvision's per-image PIL pipeline, parallel over as many worker processes as torch has threads.
    transform = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.08, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.5,) * 3, (0.25,) * 3),
        ]
    )
    workers = torch.get_num_threads()
    loader = torch.utils.data.DataLoader(
        PILViews(images, transform), batch_size=args.batch_size, num_workers=workers, persistent_workers=True
    )
    next(iter(loader))  # start the workers
    start = time.perf_counter()
    for batch in loader:
        batch.to(device)
    timer(device)
    pil = len(images) / (time.perf_counter() - start)
    return ours, pil, workers


# ---- 2. training steps -------------------------------------------------------------------


def time_method(method, stages, args, out_dir):
    """Run the method file for 2 epochs of `steps` steps; return the second epoch's metrics line."""
    cmd = [
        sys.executable,
        str(ROOT / f"{method}.py"),
        "--dataset",
        "synthetic",
        "--synthetic-size",
        str(args.batch_size * args.steps),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "2",
        "--warmup-epochs",
        "0",
        "--eval-every",
        "1000",
        "--device",
        args.device,
        "--arch",
        args.arch,
        "--ema-stages",
        stages,
        "--aug-chunk",
        str(args.aug_chunk),
        "--out-dir",
        str(out_dir),
        *args.extra.split(),
    ]
    if method in ("mocov2", "ressl") and "--queue-size" not in args.extra:
        cmd += ["--queue-size", str(args.batch_size * 16)]
    subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]


# ---- 3. a real epoch against a lean step -----------------------------------------------


def lean_byol_step(run_args, device, channels_last=False, compile=False):
    """BYOL's training step built as byol.py builds it from `run_args` (the same backbone, heads, EMA target,
    probe and optimiser; with run_args.compile, each stage compiled in place as the run compiles it), on one
    fixed batch: no augmentation, no logging, no loop around it. Returns the step, a function of no arguments.
    compile: instead, torch.compile the online encoder as one module (the --efficiency row)."""
    import byol

    online, predictor, target, probe, optimizer = byol.build(run_args, num_classes=10)  # byol.py's own
    models = [online, predictor, target, probe]
    to_device(models, device)
    size = run_args.image_size or 32
    x_1, x_2 = torch.randn(2, run_args.batch_size, 3, size, size, device=device)
    y = torch.randint(0, 10, (run_args.batch_size,), device=device)
    # to_device puts every model in channels_last; the rows without it need the plain layout back
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x_1, x_2 = (x.contiguous(memory_format=layout) for x in (x_1, x_2))
    for model in models:
        model.to(memory_format=layout)
        model.train()
    compile_stages(models, run_args.compile, device)  # --compile MODE: each stage in place, as common.Run does
    # torch.compile (inductor): the online encoder, which does most of the work; the first steps compile
    forward = torch.compile(online) if compile else online

    def step():
        with common.autocast(device):  # the forward passes under autocast, the losses after it (as byol.py)
            f_1, z_1, activations_1 = forward(x_1)
            f_2, z_2, activations_2 = forward(x_2)
            p_1, p_2, z_1m, z_2m = predictor(z_1), predictor(z_2), target(activations_1), target(activations_2)
        loss = byol.byol_loss(p_1, p_2, z_1m, z_2m) + common.probe_loss(probe, (f_1, f_2), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        target.update(run_args.beta)

    return step


def time_steps(step, device, steps=10, warmup=3):
    """Seconds per step over `steps` steps after `warmup` untimed ones, and the seconds the warm-up took (with
    --compile, mostly compiling)."""
    start = timer(device)
    for _ in range(warmup):
        step()
    warm = timer(device)
    for _ in range(steps):
        step()
    return (timer(device) - warm) / steps, warm - start


def lean_byol_step_seconds(run_args, device, steps=10, warmup=3, channels_last=False, compile=False, count_flops=False):
    """Seconds per step of the lean step (lean_byol_step). With count_flops, instead: the FLOPs of one step's
    forward and backward passes (torch's counter: matrix products and convolutions; the optimiser and the EMA
    update are element-wise and not counted)."""
    step = lean_byol_step(run_args, device, channels_last, compile)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        return counter.get_total_flops()
    return time_steps(step, device, steps, warmup)[0]


def profile_step(step, device, rows=15):
    """One step (already warmed up) under torch.profiler: the ops that took the most time (profile_summary)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        step()
        timer(device)
    return profile_summary(profiler.key_averages(), on_gpu, rows)


def profile_summary(events, on_gpu, rows=15):
    """The total and the top `rows` ops of a profile (torch.profiler's key_averages), each with its share of the
    total. On CUDA the clock is the GPU's: the total is the kernels' own time (what the GPU was busy with), and
    each op's is the time of the kernels it launched. A kernel shows twice in the events, as a device event and
    in the self time of the op that launched it, so the total counts the device events and the ranking the
    ops (never both; annotations such as the optimiser's step region are neither). On a CPU the clock is the
    CPU's: each op's own time, without the ops it calls."""
    from torch.autograd import DeviceType

    def annotation(event):
        return getattr(event, "is_user_annotation", False)

    if on_gpu:
        kernels = [e for e in events if e.device_type != DeviceType.CPU and not annotation(e)]
        total = sum(e.self_device_time_total for e in kernels)
        ranked = [e for e in events if e.device_type == DeviceType.CPU and not annotation(e)]
    else:
        total = sum(e.self_cpu_time_total for e in events)
        ranked = list(events)

    def own_microseconds(event):
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    top = sorted(ranked, key=own_microseconds, reverse=True)[:rows]
    ops = [
        {
            "name": event.key[:100],
            "calls": event.count,
            "ms": own_microseconds(event) / 1000,
            "share": own_microseconds(event) / max(total, 1e-9),
        }
        for event in top
        if own_microseconds(event) > 0
    ]
    return {"clock": "GPU" if on_gpu else "CPU", "total_ms": total / 1000, "ops": ops}


def matmul_gflops(threads, n=2048, repeats=10):
    """The machine's float32 peak as torch reaches it: GFLOP/s of n x n matrix products (2 n^3 FLOPs each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - start
    torch.set_num_threads(before)
    return 2 * n**3 * repeats / seconds / 1e9


def bench_efficiency(args):
    """What share of the CPU's float32 peak a laptop step reaches, and what channels_last, the thread count and
    the end-of-epoch evaluation change; every number from this one run."""
    import byol

    run_args = byol.parse_args(shlex.split(args.efficiency))
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    loads = [os.getloadavg()[0]]
    peak = {t: matmul_gflops(t) for t in sorted({1, threads})}
    flops = lean_byol_step_seconds(run_args, device, count_flops=True)
    rows = []
    for name, t, channels_last, compile in [
        (f"{threads} threads", threads, False, False),
        (f"{threads} threads, channels_last", threads, True, False),
        (f"{threads} threads, channels_last, torch.compile", threads, True, True),
        ("1 thread", 1, False, False),
        ("1 thread, channels_last", 1, True, False),
    ]:
        torch.set_num_threads(t)
        seconds = lean_byol_step_seconds(
            run_args, device, steps=args.steps, channels_last=channels_last, compile=compile
        )
        rows.append((name, seconds, flops / seconds / 1e9, flops / seconds / 1e9 / peak[t]))
    torch.set_num_threads(threads)
    # the end-of-epoch evaluation at the run's sizes: features of the training and test images, kNN, the probe
    images = run_args.train_subset or 50000
    data = Data(
        torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8),
        torch.arange(images) % 10,
        torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8),
        torch.arange(10000) % 10,
        10,
        torch.full((3,), 0.5),
        torch.full((3,), 0.25),
    )
    backbone = common.ResNetCIFAR(run_args.arch, width=run_args.width)
    probe = torch.nn.Linear(backbone.feature_dim, 10)
    start = time.perf_counter()
    common.evaluate(backbone, probe, data, knn=True)
    with_knn = time.perf_counter() - start
    start = time.perf_counter()
    common.evaluate(backbone, probe, data, knn=False)
    probe_only = time.perf_counter() - start
    loads.append(os.getloadavg()[0])
    steps_per_epoch = images // run_args.batch_size
    print(f"\nCPU, torch {torch.__version__}: byol.py {args.efficiency}; load average before, after: {loads}")
    print(f"float32 peak (2048 x 2048 matmul): {', '.join(f'{t} threads {g:.1f} GFLOP/s' for t, g in peak.items())}")
    print(f"one step: {flops / 1e9:.2f} GFLOP (forward and backward, matrix products and convolutions)\n")
    print("| step | s / step | GFLOP/s | share of the peak at that thread count |\n|---|---|---|---|")
    for name, seconds, gflops, share in rows:
        print(f"| {name} | {seconds:.3f} | {gflops:.1f} | {100 * share:.0f} % |")
    print(
        f"\nend of an epoch ({steps_per_epoch} steps, {rows[0][1] * steps_per_epoch:.1f} s of lean steps): "
        f"evaluation with kNN {with_knn:.1f} s, the probe only {probe_only:.1f} s"
    )
    summary = {
        "peak_gflops": peak,
        "step_gflop": flops / 1e9,
        "rows": [dict(zip(("config", "seconds", "gflops", "share_of_peak"), row)) for row in rows],
        "eval_seconds_knn": with_knn,
        "eval_seconds_probe_only": probe_only,
    }
    print(json.dumps(summary))
    return summary


def two_epochs_of_byol(flags, epochs, run_dir):
    """Run byol.py with `flags` and `epochs` (at least 2: the schedules of the run FLAGS ask for) into
    `run_dir` until its second epoch is written, its output echoed here (so a log shows how far it got); then
    stop it. Returns its metrics.jsonl rows."""
    run_flags = [*flags, "--eval-every", "1000", "--out-dir", str(run_dir)]
    cmd = [sys.executable, str(ROOT / "byol.py"), *run_flags, "--epochs", str(max(2, epochs))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    said = []  # the run's own one-line refusal, if it ends in one
    for line in process.stdout:
        print(line, end="", flush=True)
        said += [line.strip()] if line.startswith("error: ") else []
        if line.startswith("epoch    2"):  # stop the run once its second epoch is written
            process.terminate()
            break
    process.wait()
    metrics_path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return rows, said[-1] if said else None


def bench_real_epoch(args):
    """Two real epochs of byol.py beside the lean step, timed before and after the run (after it only with
    --compile) so that other work on the machine shows as a gap; prints the overhead and returns the JSON
    summary."""
    import byol

    flags = shlex.split(args.real_epoch)
    run_args = byol.parse_args(flags)
    # the lean step runs under the run's own settings: cuDNN's autotuner and TF32 on CUDA, the run's seed
    device = common.setup(run_args.device, run_args.seed)
    loads = [os.getloadavg()[0]]
    lean_before = None if run_args.compile else time_steps(lean_byol_step(run_args, device, channels_last=True), device)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        lines, said = two_epochs_of_byol(flags, run_args.epochs, run_dir)
    if len(lines) < 2:
        why = f" ({said.removeprefix('error: ')})" if said else "; run it alone to see why"
        raise SystemExit(f"error: byol.py {args.real_epoch} did not finish two epochs{why}")
    loads.append(os.getloadavg()[0])
    step = lean_byol_step(run_args, device, channels_last=True)
    lean_after = time_steps(step, device)
    # the operations one eager lean step dispatches: what its cost grows with when the GPU waits for Python
    operations = None if run_args.compile else operations_dispatched(step)
    profile = profile_step(step, device) if args.profile else None
    loads.append(os.getloadavg()[0])
    steps_per_epoch = lines[0]["step"]
    first, real = lines[0]["epoch_seconds"], lines[1]["epoch_seconds"]
    timed = [lean for lean in (lean_before, lean_after) if lean is not None]
    lean = sum(seconds for seconds, _ in timed) / len(timed) * steps_per_epoch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}, torch {torch.__version__}: byol.py {args.real_epoch}")
    print(f"load average (1 min) before, between, after: {', '.join(f'{x:.2f}' for x in loads)}")
    print(f"\n| | s / epoch ({steps_per_epoch} steps of {run_args.batch_size}) |\n|---|---|")
    print(f"| real (byol.py, the second epoch, kNN aside) | {real:.2f} |")
    print(f"| real, the first epoch (its warm-up{', compilation' if run_args.compile else ''}) | {first:.2f} |")
    shown = [(f"{lean[0] * steps_per_epoch:.2f}" if lean is not None else "-") for lean in (lean_before, lean_after)]
    print(f"| lean step x steps, before the run / after it | {shown[0]} / {shown[1]} |")
    if operations is not None:
        print(f"\noperations dispatched by one lean step: {operations}")
    if profile:
        print(
            f"\ntorch.profiler, one lean step: {profile['total_ms']:.1f} ms of {profile['clock']} time; the ops that "
            f"took the most (their own time)\n\n| op | calls | ms | share |\n|---|---|---|---|"
        )
        for op in profile["ops"]:
            print(f"| {op['name']} | {op['calls']} | {op['ms']:.2f} | {100 * op['share']:.1f} % |")
    summary = {
        "device_name": name,
        "torch": torch.__version__,
        "flags": args.real_epoch,
        "ema_stages": run_args.ema_stages,
        "compile": run_args.compile,
        "batch_size": run_args.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "real_epoch_seconds": real,
        "first_epoch_seconds": first,
        "first_epoch_extra_seconds": first - real,  # the warm-up; with --compile, mostly compiling
        "images_per_second": lines[1]["images_per_second"],
        "peak_memory_mb": lines[1]["peak_memory_mb"],
        "lean_epoch_seconds": lean,
        "overhead": real / lean,
        "lean_before_after": [None if x is None else x[0] * steps_per_epoch for x in (lean_before, lean_after)],
        "lean_warmup_seconds": [None if x is None else x[1] for x in (lean_before, lean_after)],
        "lean_step_operations": operations,
        "profile": profile,
    }
    print(f"\noverhead (real / mean of the lean ones): {real / lean:.2f}\n" + json.dumps(summary))
    return summary


def loader_images_per_second(data, workers, batch_size, batches, size=224):
    """Images per second --loader stream's workers deliver (engine.data.TrainBatches: BYOL's two views of each
    image, cut from the whole image and resized to `size`), in the folder's order, timed from the workers' start
    to the last item. Each worker reads `batches` items of batch_size images, or fewer items of fewer images where
    the folder is too small for that: with fewer items than workers every item is read at once and arrives
    together, which times the start-up, not the rate (8 batches on 16 cores read that way)."""
    from engine.data import TrainBatches, loader

    batches = min(batches, len(data.train_files) // workers)  # (a small folder: fewer items for each worker)
    if batches < 1:
        raise common.ConfigError(
            f"--loader-throughput with {workers} workers needs {workers} training images or more (the folder has "
            f"{len(data.train_files)}); give it a larger folder"
        )
    per_item = min(batch_size, len(data.train_files) // (workers * batches))
    views = [(size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5)] * 2
    order = list(range(len(data.train_files)))
    labels = data.train_labels.tolist()
    dataset = TrainBatches(data.train_files, labels, order, per_item, range(per_item), views, seed=0, epoch=0)
    steps = list(range(workers * batches))
    start, images = time.perf_counter(), 0
    for item in loader(dataset, workers, torch.device("cpu"), batch_size=None, sampler=steps):
        if isinstance(item, str):
            raise common.ConfigError(item)
        images += len(item[1])
    return images / (time.perf_counter() - start)


def bench_loader(args):
    """--loader stream's images per second on 1 core and on all, against a 224-pixel step's appetite."""
    import byol
    from engine.data import load_stream

    data = load_stream(args.loader_throughput, torch.device("cpu"), image_size=224)
    cores = os.cpu_count() or 1
    loads = [os.getloadavg()[0]]
    one = loader_images_per_second(data, 1, args.batch_size, args.loader_batches)
    every = loader_images_per_second(data, cores, args.batch_size, args.loader_batches)
    loads.append(os.getloadavg()[0])
    flags = ["--dataset", "imagefolder", "--data-dir", args.loader_throughput, "--image-size", "224"]
    flags += ["--stem", "imagenet", "--batch-size", str(args.batch_size), "--device", args.device]
    run_args = byol.parse_args(flags)
    device = torch.device(run_args.device)
    common.setup(run_args.device, 0)  # the run's own settings: cuDNN's autotuner, TF32 on a GPU
    seconds, _ = time_steps(lean_byol_step(run_args, device, channels_last=True), device, steps=args.steps)
    step_rate = args.batch_size / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n--loader stream on {args.loader_throughput}: {len(data.train_files)} training images; {cores} CPU cores")
    print(f"load average (1 min) before, after the loader runs: {loads[0]:.2f}, {loads[1]:.2f}\n")
    print("| | images / s |\n|---|---|")
    print(f"| the loader, 1 worker (1 core) | {one:.0f} |")
    print(f"| the loader, {cores} workers | {every:.0f} |")
    print(f"| a BYOL step at 224 pixels, ImageNet stem, batch {args.batch_size}, on {name} | {step_rate:.0f} |")
    needed = step_rate / one
    print(f"\nthe step consumes what {needed:.1f} cores deliver at one core's pace")
    summary = {
        "loader_images_per_second_one_core": one,
        "loader_images_per_second_all_cores": every,
        "cores": cores,
        "step_images_per_second": step_rate,
        "device": name,
        "cores_needed": needed,
    }
    print(json.dumps(summary))
    return summary


def main():
    args = parse_args()
    if args.loader_throughput is not None:
        bench_loader(args)
        return
    if args.real_epoch is not None:
        bench_real_epoch(args)
        return
    if args.efficiency is not None:
        bench_efficiency(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]  # (1 min) other work on the machine skews every number below
    rows, ratios = [], {}
    ours, pil, workers = bench_augmentation(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results = {}
            for stages in dict.fromkeys([CLASSIC[method], "projector", "none"]):
                m = time_method(method, stages, args, Path(tmp) / f"{method}-{stages}")
                results[stages] = m
            base = results[CLASSIC[method]]
            base_seconds = base["epoch_seconds"] / args.steps
            for stages, m in results.items():
                seconds = m["epoch_seconds"] / args.steps
                ideal = (2 + m["backbone_forwards_per_image"]) / (2 + base["backbone_forwards_per_image"])
                rows.append(
                    (
                        method,
                        stages,
                        m["ema_params_mb"],
                        m["backbone_forwards_per_image"],
                        seconds,
                        m["images_per_second"],
                        m["peak_memory_mb"],
                        seconds / base_seconds,
                        ideal,
                    )
                )
                ratios[f"{method}_{stages}_over_{CLASSIC[method]}_step_time"] = seconds / base_seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{name}, torch {torch.__version__}, batch {args.batch_size}, {args.steps} timed steps, {args.arch}; "
        f"load average before the run {load_before:.2f}\n"
    )
    print(
        f"Augmentation (BYOL view 1, 32x32, batch {args.batch_size}): per-image PIL with {workers} workers "
        f"{pil:,.0f} views/s; ours:\n"
    )
    print("| --aug-chunk (batches per call) | views / s | speed-up over PIL |\n|---|---|---|")
    for chunk, speed in ours.items():
        print(f"| {chunk} | {speed:,.0f} | {speed / pil:.1f}x |")
    print()
    print(
        "| method | EMA stages | EMA params (MB) | backbone forwards / image | s / step | images / s "
        "| peak memory (MB) | step time / classic | ideal (FLOPs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.0f} | {r[6]:.0f} "
            f"| {r[7]:.2f} | {r[8]:.2f} |"
        )
    summary = {
        "aug_speedup": ours[args.aug_chunk] / pil,
        "byol_projector_over_all_step_time": ratios.get("byol_projector_over_all_step_time"),
        **ratios,
    }
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    common.run_cli(main)
