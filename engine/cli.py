"""The command line: each method's recipe block, the shared flags (defined once, here), --preset laptop,
the range every number must be in, and run_cli, which turns a bad input into one line and an exit code.

A method file states its recipe in one block near its top (a Recipe: the defaults of the shared flags
that differ by method, its own flags, its --preset laptop values, with their sources) and parses its
flags with it; every other default is a shared flag's, below. No torch at import (tools/ use the help
formatter); the device's default and the process group are looked up when needed.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, DivergedError, Preempted


# ----------------------------------------------------------------------------------------
# Numbers and their ranges
# ----------------------------------------------------------------------------------------
# Each numeric flag's range travels with its definition: its argparse type is a Range (positive(int),
# non_negative(float), fraction(), ...), which parses the text and knows the values allowed. check_ranges
# then refuses NaN, inf and anything outside the range, in one line naming the flag, the range and the
# default; a test checks that every numeric flag of every script has one.
POSITIVE, NON_NEGATIVE, FRACTION = "a positive number", "zero or more", "between 0 and 1"
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the tensors a number ends up in are float32


class Range:
    """The argparse type of a numeric flag: `kind` (int or float) parses the text; `allowed` (POSITIVE,
    NON_NEGATIVE, FRACTION) and `at_most` are the values check_ranges accepts. An upper limit guards the sizes
    that would exhaust memory or overflow a random generator before a run could say so."""

    def __init__(self, kind, allowed, at_most=None):
        self.kind, self.allowed, self.at_most = kind, allowed, at_most
        self.__name__ = kind.__name__  # argparse's message for text that does not parse: "invalid int value"

    def __call__(self, text):
        return self.kind(text)

    def contains(self, value):
        if self.allowed == POSITIVE:
            return value > 0
        if self.allowed == NON_NEGATIVE:
            return value >= 0
        return 0 <= value <= 1


def positive(kind, at_most=None):
    return Range(kind, POSITIVE, at_most)


def non_negative(kind, at_most=None):
    return Range(kind, NON_NEGATIVE, at_most)


def fraction():
    return Range(float, FRACTION)


def check_ranges(args, parser):
    """One line for a numeric flag that is NaN, infinite, or outside the range its type (a Range) allows,
    with its default. A flag of several numbers (nargs) has each of them checked."""
    for action in parser._actions:
        given = getattr(args, action.dest, None)
        if not isinstance(action.type, Range) or given is None:  # None: left at "none" (--max-steps, ...)
            continue
        flag = max(action.option_strings, key=len)
        default = parser.get_default(action.dest)
        fix = "leave it out" if default is None else f"the default is {default}"
        for value in given if isinstance(given, (list, tuple)) else [given]:
            if not (math.isfinite(value) and action.type.contains(value)):
                raise ConfigError(f"{flag} must be {action.type.allowed} (got {value}); {fix}")
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                raise ConfigError(f"{flag} must be at most 3.4e38, float32's largest (got {value}); {fix}")
            if action.type.at_most is not None and value > action.type.at_most:
                raise ConfigError(f"{flag} must be at most {action.type.at_most} (got {value}); {fix}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a mistyped flag or a value of the wrong kind ends in one line, as every other
    refusal does (argparse prints its whole usage block first), naming what is wrong and where the flags are."""

    def error(self, message):
        self.exit(2, f"error: {message}; `{self.prog} --help` lists every flag\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, said once: not where the help already says it, nor for a flag
    without one (default None: 'none', or a value that depends on the run)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------
# Flags: each defined once
# ----------------------------------------------------------------------------------------
FROM_RECIPE = object()  # the default of a shared flag that each method's recipe gives (lr, beta, ...)
MAY_CHANGE_ON_RESUME = set()  # the dests of the flags defined with resume_may_change=True
BEFORE_THE_FLAG = {}  # dest -> the value that runs made before the flag existed had (Flag's `before`)


@dataclass
class Flag:
    """One command-line flag, stated once: its spellings, default, type and help.

    type: a Range for a number, a tuple of choices, or str; a flag whose default is False is a switch; with
    type bool, one that --no-NAME also turns off (for a switch a preset turns on).
    resume_may_change: a flag that --resume may change (where the run lives and runs, how often it evaluates,
    saves and measures, and --lr and --probe-lr: lowering them is the way on after a diverged run). Every
    other flag changes the training, so a resume must repeat it. options: argparse's rarer options (metavar,
    nargs, const). before: for a flag added to a recipe after runs were made without it, the value those runs
    had, which --resume compares with (None: the flag's default)."""

    names: tuple
    default: object
    help: str = ""
    type: object = str
    resume_may_change: bool = False
    options: dict = field(default_factory=dict)
    before: object = None

    def add_to(self, parser, default):
        names = (self.names,) if isinstance(self.names, str) else self.names
        if self.type is bool:
            action = parser.add_argument(
                *names, action=argparse.BooleanOptionalAction, default=default, help=self.help, **self.options
            )
        elif default is False:
            action = parser.add_argument(*names, action="store_true", help=self.help, **self.options)
        elif isinstance(self.type, tuple):
            action = parser.add_argument(*names, choices=self.type, default=default, help=self.help, **self.options)
        else:
            action = parser.add_argument(*names, type=self.type, default=default, help=self.help, **self.options)
        if self.resume_may_change:
            MAY_CHANGE_ON_RESUME.add(action.dest)
        if self.before is not None:
            BEFORE_THE_FLAG[action.dest] = self.before


DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "synthetic")  # engine/data.py loads each
SHARED_FLAGS = [
    Flag(
        "--preset",
        "paper",
        "paper: the paper's recipe (the defaults shown here); laptop: a 10-minute CPU run that learns (quarter "
        "width, 10,000 images, 10 epochs, short-run values)",
        ("paper", "laptop"),
        resume_may_change=True,
    ),
    Flag("--dataset", "cifar100", f"one of {', '.join(DATASETS)}"),
    Flag(
        "--data-dir",
        "./data",
        "where datasets live; torchvision downloads here (imagefolder: a folder with train/ and val/ or test/)",
        resume_may_change=True,
    ),
    Flag("--no-download", False, "never download; fail with a message if the data is absent", resume_may_change=True),
    Flag(
        "--image-size",
        None,
        "imagefolder and synthetic only: image side in pixels; None means 32",
        positive(int, at_most=2**10),
    ),
    Flag(
        "--synthetic-size",
        512,
        "number of synthetic training images (smoke runs, benchmarks)",
        positive(int, at_most=10**6),
    ),
    Flag("--arch", "resnet18", "backbone: resnet18 or resnet50 (common.ARCHS; the paper's Table 5 uses resnet50)"),
    Flag(
        "--stem",
        "auto",
        "the backbone's first stage: cifar (3x3 conv, stride 1, no max-pool) or imagenet (7x7 conv, stride 2, "
        "3x3 max-pool: Table 6's ImageNet-100); auto: imagenet for views of 128 pixels or more, else cifar",
        ("auto", "cifar", "imagenet"),
    ),
    Flag(
        "--loader",
        "auto",
        "memory: every image decoded once and held on the run's device (CIFAR, STL-10, small folders); stream: "
        "an imagefolder read from disk by --workers processes as the run goes, each view cut from the whole "
        "image (ImageNet); auto: stream for an imagefolder at --image-size 128 or more, else memory",
        ("auto", "memory", "stream"),
    ),
    Flag(
        "--workers",
        None,
        "processes that decode an image folder once at the start (--loader memory) or read, decode and crop its "
        "images as the run goes (--loader stream); None means one per CPU core, at most 32",
        positive(int, at_most=256),
        resume_may_change=True,
        options={"metavar": "N"},
    ),
    Flag(
        "--width",
        64,
        "channels of conv1; block k's convolutions have width * 2^(k-1) (ResNet-50's blocks put out 4x that). 64 is "
        "the paper's ResNet; 16 is the "
        "quarter-width CPU and teaching setting",
        positive(int, at_most=2**10),
    ),
    Flag(
        "--train-subset",
        None,
        "train on the first N / classes images of each class, in the dataset's order (the test split stays whole)",
        positive(int),
        options={"metavar": "N"},
    ),
    Flag(
        "--eval-split",
        "test",
        "where kNN and the probe are scored: the test split, or val, the last --val-size / classes training "
        "images of each class, never trained on (choose recipes on val, report test once)",
        ("test", "val"),
    ),
    Flag(
        "--val-size",
        10000,
        "images in the validation split of --eval-split val (N / classes of each class)",
        positive(int),
        options={"metavar": "N"},
    ),
    Flag("--epochs", 200, "the paper trains 200 epochs", positive(int, at_most=10**5)),
    Flag(
        "--warmup-epochs",
        None,
        "linear learning-rate warm-up, then cosine decay per step; None means the paper's 10 of 200 epochs "
        "scaled to --epochs: 5%%, at least 1, at most 10",
        non_negative(int, at_most=10**5),
    ),
    Flag(
        "--batch-size",
        256,
        "images per step; each gives two views (the paper: 256)",
        positive(int, at_most=2**16),
    ),
    Flag(
        "--lr",
        FROM_RECIPE,
        "base learning rate, as given (the recipes' values are for batch 256; never rescaled with --batch-size)",
        positive(float),
        resume_may_change=True,
    ),
    Flag(
        "--weight-decay",
        FROM_RECIPE,
        "LARS methods skip biases and BatchNorm; SGD methods decay every parameter (as solo-learn)",
        non_negative(float),
    ),
    Flag(
        "--probe-lr",
        FROM_RECIPE,
        "learning rate of the online linear probe",
        positive(float),
        resume_may_change=True,  # lowering it is the way on after the probe's weights diverge
    ),
    Flag(
        "--max-steps",
        None,
        "stop after this many optimiser steps in all (smoke tests, time-boxed runs); schedules still span --epochs",
        positive(int),
        resume_may_change=True,
    ),
    Flag(
        "--checkpoint-every",
        None,
        "also save last.pt every STEPS optimiser steps inside an epoch (long epochs: ResNet-50, STL-10, "
        "ImageFolder); None means at the end of each epoch only",
        positive(int),
        resume_may_change=True,
        options={"metavar": "STEPS"},
    ),
    Flag(
        "--eval-every",
        10,
        "kNN evaluation every N epochs and at the end (the linear probe is evaluated every epoch)",
        positive(int),
        resume_may_change=True,
    ),
    Flag(
        "--seed",
        0,
        "seeds model initialisation, epoch order and augmentations",
        non_negative(int, at_most=2**63 - 1),
    ),
    Flag(
        "--deterministic",
        False,
        "deterministic kernels (bit-exact reruns on CPU; slower on GPU)",
        resume_may_change=True,
    ),
    Flag(
        "--aug-chunk",
        None,
        "augment N batches at a time: fewer, larger kernel launches; None means 16 on a GPU and 1 (each "
        "batch on its own) on a CPU",
        positive(int, at_most=2**10),
        options={"metavar": "N"},
    ),
    Flag(
        "--compile",
        None,
        "torch.compile each stage module and head in place, with MODE (default when none is given; "
        "reduce-overhead adds CUDA graphs, on a GPU only): for GPUs, where it speeds up the steps after a "
        "warm-up spent compiling; the evaluation stays eager; rarely worth it on a CPU",
        ("default", "reduce-overhead", "max-autotune"),
        resume_may_change=True,
        options={"nargs": "?", "const": "default", "metavar": "MODE"},
    ),
    Flag(
        "--device",
        None,  # default_device(): cuda when a GPU is visible
        "cuda (bf16 autocast, channels_last) or cpu (float32); default: cuda when a GPU is visible, else cpu",
        resume_may_change=True,
    ),
    Flag(
        "--no-sync-bn",
        False,
        "under torchrun on GPUs: BatchNorm over each process's share of the batch, not the global batch",
    ),
    Flag(
        "--out-dir",
        None,
        "run directory for args.json, metrics.jsonl, last.pt; None means runs/<method>-<stages>-b<beta>-s<seed>"
        "[-laptop]",
        resume_may_change=True,
    ),
    Flag(
        "--resume",
        None,
        "continue a run from its last.pt: the run in RUN_DIR, or in --out-dir if no RUN_DIR is given",
        resume_may_change=True,
        options={"nargs": "?", "const": "", "metavar": "RUN_DIR"},
    ),
    Flag(
        "--ema-stages",
        FROM_RECIPE,
        "stages of the target network kept as EMA copies: all, backbone, projector, none, or a comma list of "
        "conv1,block1,block2,block3,block4,projector (the rest share the online weights)",
    ),
    Flag("--beta", FROM_RECIPE, "EMA coefficient of Eq. (6); 0 = no momentum, 1 = frozen target", fraction()),
    Flag(
        "--beta-schedule",
        FROM_RECIPE,
        "constant, or cosine from --beta up to --beta-final over training (solo-learn)",
        ("constant", "cosine"),
    ),
    Flag("--beta-final", FROM_RECIPE, "final beta of the cosine schedule (at least --beta)", fraction()),
    Flag("--bn-block4", False, "BN1 of Table C.8: a BatchNorm on block4's output"),
    Flag(
        "--log-grad-norms",
        False,
        "Fig. 5: write grad_norms.jsonl, the l-inf norm of the loss's gradient w.r.t. each stage's output, every step",
        resume_may_change=True,
    ),
    Flag(
        "--log-target-drift",
        False,
        "the paper's stability thesis: write target_drift.jsonl, how far the online network's and the "
        "target's outputs on one fixed batch moved at each step",
        resume_may_change=True,
    ),
    Flag(
        "--track-weights",
        0,
        "Fig. 2: write weights.jsonl, K rows of the projector's last linear layer (online and target) every "
        "step; use with --proj-hidden-dim 2",
        non_negative(int, at_most=2**16),
        resume_may_change=True,
        options={"metavar": "K"},
    ),
]
RECIPE_DEFAULTS = [flag.names[2:].replace("-", "_") for flag in SHARED_FLAGS if flag.default is FROM_RECIPE]

# --preset laptop: a run of about 10 minutes on 2 CPU cores that visibly learns (README, "Learn on a
# laptop"). A quarter-width ResNet-18 on 10,000 training images for 10 epochs (390 steps at batch
# 256). The beta schedule is constant because the cosine schedule to 1.0 (or 0.999) squeezed into 390
# steps passes beta = 0.995, a target that lags 200 steps -- half the run -- by the middle of it, and
# all but freezes the target for the second half. Each method's recipe adds its own short-run values.
LAPTOP_SCALE = {
    "width": 16,
    "train_subset": 10000,
    "epochs": 10,
    "warmup_epochs": 1,
    "eval_every": 5,
    "beta_schedule": "constant",
}


def default_workers():
    """--workers' default: one process per CPU that os.cpu_count() counts, at most 32."""
    return min(32, os.cpu_count() or 1)


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Recipe:
    """A method's recipe block: its name and title, the defaults of the shared flags that differ by method
    (RECIPE_DEFAULTS: lr, weight_decay, probe_lr, ema_stages, beta, beta_schedule, beta_final), its own flags
    (a list of Flag), and what --preset laptop changes for it besides LAPTOP_SCALE. Its flags are built from
    it: a default is stated here or in SHARED_FLAGS, never in both."""

    def __init__(self, method, title, *, flags=(), laptop=None, **defaults):
        missing, unknown = set(RECIPE_DEFAULTS) - set(defaults), set(defaults) - set(RECIPE_DEFAULTS)
        if missing or unknown:
            raise TypeError(
                f"{method}'s recipe must give exactly {RECIPE_DEFAULTS}: missing {missing}, unknown {unknown}"
            )
        self.method, self.title, self.flags, self.laptop, self.defaults = (
            method,
            title,
            list(flags),
            laptop or {},
            defaults,
        )

    def parser(self):
        parser = ArgumentParser(description=self.title, formatter_class=HelpFormatter)
        for flag in SHARED_FLAGS:
            dest = flag.names[2:].replace("-", "_")
            flag.add_to(parser, self.defaults[dest] if flag.default is FROM_RECIPE else flag.default)
        for flag in self.flags:
            flag.add_to(parser, flag.default)
        return parser

    def parse(self, argv=None):
        """The flags, parsed and checked. --preset laptop makes LAPTOP_SCALE and the recipe's laptop values
        the defaults; flags given on the command line still win."""
        parser = self.parser()
        if parser.parse_known_args(argv)[0].preset == "laptop":
            parser.set_defaults(**LAPTOP_SCALE, **self.laptop)
        args = parser.parse_args(argv)
        check_ranges(args, parser)
        return check_args(args, self.method)


def check_args(args, method):
    """Validate the shared flags before anything heavy happens; fill in the values derived from others."""
    args.method = method
    if args.resume:  # --resume RUN_DIR names the run directory
        if args.out_dir is not None and Path(args.out_dir).resolve() != Path(args.resume).resolve():
            raise ConfigError(
                f"--resume {args.resume} and --out-dir {args.out_dir} name two run directories; give one of them"
            )
        args.out_dir = args.resume
    args.resume = args.resume is not None
    if args.resume and args.out_dir and Path(args.out_dir).is_file():
        raise ConfigError(
            f"--resume takes the run directory, not a file: pass {Path(args.out_dir).parent} (the folder that "
            f"holds {Path(args.out_dir).name})"
        )
    if args.device is None:
        args.device = default_device()
    if args.dataset not in DATASETS:  # (before anything is read)
        raise ConfigError(f"unknown dataset '{args.dataset}'; choose one of {', '.join(DATASETS)}")
    views = args.image_size or (96 if args.dataset == "stl10" else 32)  # the side of the views, in pixels
    if args.stem == "auto":  # the ImageNet ResNet's stem for ImageNet-sized views, CIFAR's for small ones
        args.stem = "imagenet" if views >= 128 else "cifar"
    if (
        args.loader == "auto"
    ):  # an ImageNet-sized folder streams from disk; CIFAR, STL-10 and small folders stay in memory
        args.loader = "stream" if args.dataset == "imagefolder" and views >= 128 else "memory"
    if args.loader == "stream" and args.dataset != "imagefolder":
        raise ConfigError(
            f"--loader stream reads an image folder, not --dataset {args.dataset}; pass --dataset imagefolder "
            f"--data-dir DIR, or --loader memory"
        )
    check_cpu_convolutions(args.device, args.stem, args.width, views, streamed=args.loader == "stream")
    if args.workers is None:
        args.workers = default_workers()
    if args.aug_chunk is None:  # a GPU pays per kernel launch, so it augments 16 batches per call; a CPU does not
        args.aug_chunk = 16 if args.device.startswith("cuda") else 1
    if args.warmup_epochs is None:  # the paper's 10 of 200 epochs, scaled to shorter runs
        args.warmup_epochs = min(10, max(1, round(args.epochs / 20)))
    if args.warmup_epochs > args.epochs:
        raise ConfigError(
            f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}, so the learning "
            f"rate would never reach --lr; choose at most {args.epochs} (the paper: 10 of 200)"
        )
    if args.batch_size < 2:
        raise ConfigError(
            f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per step; choose 2 or more "
            f"(the paper: 256)"
        )
    if args.beta_schedule == "cosine" and args.beta_final < args.beta < 1:  # (beta 1, a frozen target, stays 1)
        raise ConfigError(
            f"--beta {args.beta:g} is above --beta-final {args.beta_final:g}, so the cosine schedule would lower "
            f"beta during training; pass --beta-final 1.0 (or any value from {args.beta:g} up), or "
            f"--beta-schedule constant"
        )
    if args.out_dir is not None and not str(args.out_dir).strip():
        raise ConfigError("--out-dir is empty; name a run directory, or leave the flag out for the default")
    if args.out_dir is None:
        stages = args.ema_stages.replace(",", "+").replace(" ", "")
        preset = "-laptop" if args.preset == "laptop" else ""
        args.out_dir = str(Path("runs") / f"{method}-{stages}-b{args.beta:g}-s{args.seed}{preset}")
    return args


def check_cpu_convolutions(device, stem, width, views, streamed):
    """A CIFAR-stem backbone narrower than 16 at views of 64 pixels or more, or streamed, on the CPU: refused
    in one line, since torch's CPU convolutions (oneDNN, channels_last) corrupt the heap there (seen with torch
    2.14.1 on an AMD EPYC: exit 134 or 139, no message)."""
    if device == "cpu" and stem == "cifar" and width < 16 and (views >= 64 or streamed):
        raise ConfigError(
            f"--width {width} with the CIFAR stem at {views}-pixel views{' streamed' * streamed} crashes inside "
            f"torch's CPU convolutions (oneDNN, channels_last); use --width 16 or more"
            + (", or --loader memory" if views < 64 else "")
            + ", or --device cuda"
        )


def check_queue_size(args):
    """MoCo's and ReSSL's queues are filled one whole batch at a time."""
    if args.queue_size < 1 or args.queue_size % args.batch_size:
        raise ConfigError(
            f"--queue-size {args.queue_size} is not a positive multiple of --batch-size "
            f"{args.batch_size}; choose e.g. {args.batch_size * max(args.queue_size // args.batch_size, 1)}"
        )


# ----------------------------------------------------------------------------------------
# Running a script: one line and an exit code for each way it can end early
# ----------------------------------------------------------------------------------------
def run_cli(main):
    """Run `main()`; a ConfigError or DivergedError ends the program with one line on stderr and exit code 2;
    SIGTERM or a first Ctrl-C with last.pt saved at the end of the step (exit 143 or 130); a second Ctrl-C at
    once, saying what was saved. Under torchrun every process meets the same error (the same flags, files and
    averaged gradients), and rank 0 alone prints it (the others wait 5 s, as torchrun ends them all once
    one fails); every process leaves the process group on the way out."""
    from engine.checkpoint import interrupted_note, remove_if_unused
    from engine.distributed import WORLD, end_distributed

    code = 0
    try:
        main()
    except (ConfigError, DivergedError) as error:
        if WORLD.main:
            print(f"error: {error}", file=sys.stderr)
            remove_if_unused()  # a run directory made for a refused run, holding only its lock
        else:  # torchrun stops every process once one fails: give rank 0 the time to say why first
            time.sleep(5)
        code = 2
    except Preempted as stop:  # (every process stops at the same step; rank 0 says so)
        if WORLD.main:
            print(f"stopped: {stop}", file=sys.stderr)
        code = stop.code
    except KeyboardInterrupt:
        print(interrupted_note(), file=sys.stderr)
        code = 130
    finally:
        end_distributed()
    leave(code, WORLD.size)


def leave(code, world_size=1):
    """End the program with exit code `code`. Under torchrun the process ends here, without the interpreter's
    finalisation: DistributedDataParallel keeps the (already destroyed) gloo group alive until then, and its
    teardown at that point can abort a finished run ("terminate called without an active exception", seen
    once in CI). Every file of the run is closed by now; the two streams are flushed first."""
    if world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
