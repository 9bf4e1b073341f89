"""Benchmark: what the paper's cost claim looks like on this machine, measured in one run.

    python tools/bench.py --device cpu --batch-size 32 --steps 3          # about a minute on 2 CPU cores
    python tools/bench.py --device cuda --batch-size 256 --steps 50 --aug-images 16384 --aug-chunk 16 \
        --methods byol,simsiam,simclr,mocov2,dino,ressl

1. Augmentation throughput (views per second): our batched pipeline (common.Views, as the
   training scripts use it, with --aug-chunk 1, 4 and 16 batches per call) against torchvision's
   per-image PIL pipeline with the same BYOL recipe, the PIL pipeline in a DataLoader with as
   many worker processes as torch has threads.
2. Training steps of each method file, run as a user runs it (a subprocess on synthetic
   CIFAR-sized data), with its classic --ema-stages, with `projector` and with `none`:
   the columns of the paper's Table 4. The first of two epochs is a warm-up; the second is timed.
3. The ideal step-time ratio from counted FLOPs beside the measured one. Ideal: a training step
   costs 3 backbone forwards per view for the online network (forward + backward = 1 + 2) plus
   (forwards per image - 1) for the target; heads, augmentation and the optimiser are ignored.

Prints a Markdown table, then one JSON line with the headline ratios `aug_speedup` and
`byol_projector_over_all_step_time`. Nothing here is a test: numbers depend on the machine,
and on what else runs on it -- the header gives the load average before the run; on a machine
busy with other work, multi-threaded torch slows down far more than the PIL worker processes.
"""
import argparse
import json
import os
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

CLASSIC = {"byol": "all", "simsiam": "none", "simclr": "none", "mocov2": "all", "dino": "all", "ressl": "all"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    p.add_argument("--methods", default="byol", help="comma list of method files to time")
    p.add_argument("--aug-images", type=int, default=2048, help="images augmented per pipeline")
    p.add_argument("--aug-chunk", type=int, default=1, help="--aug-chunk of the timed training runs, and of the "
                                                            "augmentation speed-up in the final JSON line")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--extra", default="", help="extra flags for every method run, e.g. '--queue-size 4096'")
    args = p.parse_args(argv)
    if args.aug_chunk < 1 or args.aug_chunk * args.batch_size > args.aug_images:
        p.error(f"--aug-chunk {args.aug_chunk} must be at least 1 and its batches fit in --aug-images {args.aug_images}; "
                f"lower --aug-chunk or raise --aug-images")
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
    """Views per second of common.Views, the training scripts' augmentation, with --aug-chunk `chunk`."""
    data = SimpleNamespace(train_images=images, train_labels=torch.zeros(len(images), dtype=torch.long, device=device),
                           mean=torch.full((3,), 0.5, device=device), std=torch.full((3,), 0.25, device=device))
    recipe = common.ViewRecipe(size=32)  # BYOL's first view: crop, jitter 0.8, grayscale 0.2, flip
    views = common.Views(data, [recipe], batch_size, chunk, torch.Generator(device).manual_seed(0))
    order, batches = torch.arange(len(images), device=device), len(images) // batch_size
    views.batch(order, -1, 0)  # warm-up
    start = common.timer(device)
    for i in range(batches):
        views.batch(order, 0, i)
    return batches * batch_size / (common.timer(device) - start)


def bench_augmentation(args, device):
    import torchvision.transforms as T

    images = (torch.rand(args.aug_images, 3, 32, 32) * 255).to(torch.uint8)
    # Ours, on the run device: as the training scripts make views, --aug-chunk batches at a time.
    on_device = images.to(device)
    ours = {chunk: views_per_second(on_device, args.batch_size, chunk, device)
            for chunk in sorted({1, 4, 16, args.aug_chunk}) if chunk * args.batch_size <= len(images)}
    # torchvision's per-image PIL pipeline, parallel over as many worker processes as torch has threads.
    transform = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)),
                           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    workers = torch.get_num_threads()
    loader = torch.utils.data.DataLoader(PILViews(images, transform), batch_size=args.batch_size, num_workers=workers,
                                         persistent_workers=True)
    next(iter(loader))  # start the workers
    start = time.perf_counter()
    for batch in loader:
        batch.to(device)
    common.timer(device)
    pil = len(images) / (time.perf_counter() - start)
    return ours, pil, workers


# ---- 2. training steps -------------------------------------------------------------------


def time_method(method, stages, args, out_dir):
    """Run the method file for 2 epochs of `steps` steps; return the second epoch's metrics line."""
    cmd = [sys.executable, str(ROOT / f"{method}.py"), "--dataset", "synthetic", "--synthetic-size",
           str(args.batch_size * args.steps), "--batch-size", str(args.batch_size), "--epochs", "2",
           "--warmup-epochs", "0", "--eval-every", "1000", "--device", args.device, "--arch", args.arch,
           "--ema-stages", stages, "--aug-chunk", str(args.aug_chunk), "--out-dir", str(out_dir), *args.extra.split()]
    if method in ("mocov2", "ressl") and "--queue-size" not in args.extra:
        cmd += ["--queue-size", str(args.batch_size * 16)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]


def main():
    args = parse_args()
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
                rows.append((method, stages, m["ema_params_mb"], m["backbone_forwards_per_image"], seconds,
                             m["images_per_second"], m["peak_memory_mb"], seconds / base_seconds, ideal))
                ratios[f"{method}_{stages}_over_{CLASSIC[method]}_step_time"] = seconds / base_seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{name}, torch {torch.__version__}, batch {args.batch_size}, {args.steps} timed steps, {args.arch}; "
          f"load average before the run {load_before:.2f}\n")
    print(f"Augmentation (BYOL view 1, 32x32, batch {args.batch_size}): per-image PIL with {workers} workers "
          f"{pil:,.0f} views/s; ours:\n")
    print("| --aug-chunk (batches per call) | views / s | speed-up over PIL |\n|---|---|---|")
    for chunk, speed in ours.items():
        print(f"| {chunk} | {speed:,.0f} | {speed / pil:.1f}x |")
    print()
    print("| method | EMA stages | EMA params (MB) | backbone forwards / image | s / step | images / s | peak memory (MB) "
          "| step time / classic | ideal (FLOPs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.0f} | {r[6]:.0f} | {r[7]:.2f} | {r[8]:.2f} |")
    summary = {"aug_speedup": ours[args.aug_chunk] / pil, "byol_projector_over_all_step_time": ratios.get("byol_projector_over_all_step_time"),
               **ratios}
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
