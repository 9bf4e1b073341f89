"""What a run writes and prints: args.json, metrics.jsonl, the progress and epoch lines, the summary line."""

import json
import sys
import time
from pathlib import Path

import torch

from engine.distributed import WORLD
from engine.errors import ConfigError
from engine.files import atomic_write, git_revision


class RunLogger:
    """args.json, metrics.jsonl (one JSON object per epoch) and the fixed-format epoch line.

    metrics.jsonl is always rewritten whole (atomically) from the run's history, which last.pt
    also holds: after a kill at any instant the file holds whole lines only, and on resume it
    matches the checkpoint the run continues from.
    """

    def __init__(self, args, progress, instruments=None):
        self.args, self.out_dir = args, Path(args.out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"cannot write to --out-dir {self.out_dir} ({error.strerror}); choose a writable directory"
            ) from None
        if (self.out_dir / "last.pt").exists() and not args.resume:
            raise ConfigError(
                f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it or choose "
                f"another --out-dir"
            )
        earlier = self.out_dir / "metrics.jsonl"
        if earlier.is_file() and earlier.stat().st_size and not args.resume:  # its last.pt deleted: keep its results
            raise ConfigError(
                f"{self.out_dir} holds an earlier run's metrics.jsonl (but no last.pt to resume); choose another "
                f"--out-dir, or move that run's files away first"
            )
        # the lines last.pt stands for: its history, and on a resume the provisional line of an epoch that
        # --max-steps cut short, which the history does not hold (it stays until the epoch's end replaces it)
        kept = [*progress.history, *(provisional_line(earlier, progress) if args.resume else [])]
        self.last = kept[-1] if kept else None  # the summary line's metrics
        self.info = {
            **vars(args),
            "git_revision": git_revision(),
            "torch": torch.__version__,
            "world_size": WORLD.size,  # processes under torchrun (1: plain python)
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        }
        self.args_written = False
        if not args.resume:  # a resumed run's args.json is rewritten once last.pt holds its flags (write_args)
            self.write_args()
        self.write_metrics(kept)
        if instruments is not None:
            instruments.open(self.out_dir, progress.step, args.resume)
        self.progress_bar = sys.stdout.isatty()
        self.started, self.steps_done, self.steps_per_epoch = time.monotonic(), 0, None  # for the ETAs
        self.clock, self.last_plain = None, time.monotonic()  # (start, first step) of this epoch; last plain line
        print(f"{args.method}.py at git {self.info['git_revision']}, arguments: {json.dumps(vars(args))}")

    def write_args(self):
        """Write args.json: the run's flags, git revision, torch, processes and device. A --resume may change
        some flags (--lr, --max-steps, ...); its args.json is rewritten only after its first last.pt is saved,
        so that a resume that is refused or diverges first leaves args.json describing last.pt's run."""
        if not self.args_written:
            text = json.dumps(self.info, indent=2)
            atomic_write(self.out_dir / "args.json", lambda f: f.write(text.encode()))
            self.args_written = True

    def progress(self, step_in_epoch, steps, loss):
        """The progress line: step, loss, steps per second and the epoch's ETA. In a terminal it is
        redrawn every 20 steps; otherwise (a log file) printed as a plain line at most once a minute.
        Only a shown line reads the loss: loss.item() waits for the GPU to finish the step, so reading it
        at every step would stall the GPU once per step."""
        now = time.monotonic()
        if self.clock is None or step_in_epoch <= self.clock[1]:  # the first step seen in this epoch
            self.clock = (now, step_in_epoch)
        self.steps_per_epoch, self.steps_done = steps, self.steps_done + 1
        started, first = self.clock
        if step_in_epoch == first:  # the rate needs a step timed from end to end
            return
        rate = (step_in_epoch - first) / max(now - started, 1e-9)
        if self.progress_bar:
            shown = (step_in_epoch + 1) % 20 == 0 or step_in_epoch + 1 == steps
        else:
            shown = now - self.last_plain >= 60 and step_in_epoch + 1 < steps
        if not shown:
            return
        line = (
            f"  step {step_in_epoch + 1}/{steps} loss {loss.item():.4f} | {rate:.2f} steps/s | "
            f"epoch ETA {format_duration((steps - step_in_epoch - 1) / rate)}"
        )
        if self.progress_bar:
            print(f"\r{line}", end="", flush=True)
        else:
            self.last_plain = now
            print(line, flush=True)

    def run_eta(self, step):
        """The time left to the end of the run at this process's pace so far (evaluations included)."""
        if self.steps_per_epoch is None or self.steps_done == 0:
            return "-"
        total = self.args.epochs * self.steps_per_epoch
        left = min(total, self.args.max_steps or total) - step
        return format_duration(left * (time.monotonic() - self.started) / self.steps_done)

    def log_epoch(self, metrics, history, provisional=False):
        """Rewrite metrics.jsonl from the history and print the epoch line. An epoch cut short by
        --max-steps is not in the history: its line is written after it, provisionally, and its resume
        replaces it with the whole epoch's."""
        self.write_metrics([*history, metrics] if provisional else history)
        self.last = metrics
        fmt = lambda v: "   -  " if v is None else f"{v:6.2f}"
        if self.progress_bar:
            print("\r", end="")
        print(
            f"epoch {metrics['epoch']:4d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.4f} | "
            f"beta {metrics['beta']:.5f} | probe top-1 {fmt(metrics['linear_top1'])} | "
            f"kNN top-1 {fmt(metrics['knn_top1'])} | spread {metrics['output_spread']:.2f} "
            f"rank {metrics['feature_rank']:.1f} | {metrics['epoch_seconds']:.1f} s/epoch | "
            f"{metrics['images_per_second']:.0f} img/s | run ETA {self.run_eta(metrics['step'])}",
            flush=True,
        )

    def write_metrics(self, lines):
        text = "".join(json.dumps(m) + "\n" for m in lines)
        atomic_write(self.out_dir / "metrics.jsonl", lambda f: f.write(text.encode()))


def provisional_line(path, progress):
    """[the line metrics.jsonl holds after last.pt's history], when that line is at last.pt's own step: the
    provisional line of an epoch --max-steps cut short; [] when there is none (or the file cannot be read)."""
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    if len(lines) == len(progress.history) + 1 and lines[-1].get("step") == progress.step:
        return lines[-1:]
    return []


def format_duration(seconds):
    """'45s', '12m05s', '3h07m': for the ETAs of the progress and epoch lines."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary_line(args, metrics):
    """The one line a run ends with (tools parse it)."""
    if metrics is None:
        return (
            f"summary: method={args.method} nothing to do: the run in {args.out_dir} has no complete epoch left "
            f"to train"
        )
    keys = (
        "epoch",
        "step",
        "loss",
        "linear_top1",
        "knn_top1",
        "knn1_top1",
        "output_spread",
        "feature_rank",
        "backbone_forwards_per_image",
        "ema_params",
        "peak_memory_mb",
    )
    fields = " ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
    return f"summary: method={args.method} ema_stages={args.ema_stages.replace(' ', '')} beta={args.beta:g} {fields}"
