"""The experiments of tools/reproduce.py and the claims of docs/claims.md: data only.

An experiment is a list of rows, each a row of one of the paper's tables (or of the laptop's), made by
one command line of a method file (or of linear_eval.py, for the random encoder). A claim names the
rows it compares and the direction the paper found. tools/reproduce.py runs the rows; tools/report.py
reads what the runs kept and writes the tables and the claims. Nothing here imports torch, so that
`reproduce.py --table` rebuilds every table in seconds on a machine without it.

Words: a *row* is a line of a table and the flags that make it; a *run* is one training run of a row
with one seed.
"""

from dataclasses import dataclass, field


@dataclass
class Row:
    """One row of a table: the command that makes it (script and flags) and what the paper printed for it."""

    label: str  # the row of the paper's table
    script: str  # byol.py, ..., or linear_eval.py (random encoder)
    flags: str = ""  # flags that make this row
    paper: dict = field(default_factory=dict)  # {"top1": ..., "knn1": ...} as printed in the paper
    compare: str = ""  # the label of the row this one is compared with (paired by seed), if any


@dataclass
class Experiment:
    """A table (or figure) of the paper, or one of ours: its rows and the scale they run at."""

    title: str
    dataset: str  # the paper's dataset; --dataset overrides
    rows: list
    flags: str = ""  # flags for every run of this experiment
    epochs: int = 200  # the paper's length; --epochs overrides
    data_dir: str = "./data"  # --data-dir overrides


def pairs(method, classic, projector, extra=""):
    """The two rows most tables have: EMA on every stage (baseline) and on the projector only."""
    return [
        Row(f"{method}: EMA backbone + projector", f"{method}.py", f"--ema-stages all {extra}".strip(), classic),
        Row(f"{method}: EMA projector only", f"{method}.py", f"--ema-stages projector {extra}".strip(), projector),
    ]


RANDOM = "random backbone (same width, never trained)"
# What the search's SimCLR and DINO rows ran with before the search's choices entered the presets:
# SimCLR's old optimiser and jitter; DINO's old 3-epoch warm-up (each DINO row names its teacher temperature)
SIMCLR_BEFORE = "--optimizer lars --lr 0.4 --weight-decay 1e-5 --jitter-strength 1.0"
DINO_BEFORE = "--warmup-teacher-temp-epochs 3"
FIG2 = "--proj-hidden-dim 2 --beta-schedule constant --log-grad-norms --track-weights 16"
# The laptop rows of the paper's beta claim (Sec. 7) and of its stability thesis (Fig. 2, 3 and 5, Tables 2, 7
# and C.8), after the first rows so that those keep their places. BETA_AGGRESSIVE: the paper's 0.9995, whose
# lag, 1 / (1 - beta) = 2,000 steps, is 20 times that of the preset's 0.99, as in the paper (docs/claims.md).
BETA_AGGRESSIVE = "0.9995"
STABILITY = "--log-grad-norms --log-target-drift"  # Fig. 5's gradients and the target's drift, every step
TWO_WIDE = "--proj-hidden-dim 2 --track-weights 8 --log-grad-norms"  # Table 2 and Fig. 2: FC2's rows are points
LAPTOP_THESIS_ROWS = [
    *[
        Row(
            f"{method}: EMA {stages} at beta {BETA_AGGRESSIVE}",
            f"{method}.py",
            f"--ema-stages {stages} --beta {BETA_AGGRESSIVE}",
            compare=f"{method}: EMA {stages}" + (" (classic)" if stages == "all" else ""),
        )
        for method in ("byol", "dino", "ressl", "mocov2")
        for stages in ("all", "projector")
    ],
    *[
        Row(f"byol: EMA {stages} with stability instruments", "byol.py", f"--ema-stages {stages} {STABILITY}")
        for stages in ("none", "projector", "all")
    ],
    Row("byol 2-wide projector: EMA none", "byol.py", f"--ema-stages none {TWO_WIDE}", {"top1": 20.01, "knn1": 10.01}),
    *[
        Row(
            f"byol 2-wide projector: EMA projector at beta {beta}",
            "byol.py",
            f"--ema-stages projector --beta {beta} {TWO_WIDE}",
            paper,
            compare="byol 2-wide projector: EMA none",
        )
        for beta, paper in [("0.9", {"top1": 25.76, "knn1": 14.17}), ("0.99", {"top1": 22.63, "knn1": 12.56})]
    ],
    Row(
        "byol: EMA projector + BN1 + BN2",
        "byol.py",
        "--ema-stages projector --bn-block4 --bn-proj",
        {"top1": 62.48, "knn1": 55.66},
        compare="byol: EMA projector",
    ),
    # Table 7: the paper's learning rates 1.0 and 4.0; the laptop preset's 0.3 and four times it
    Row("byol: EMA all at lr x4", "byol.py", "--ema-stages all --lr 1.2", {"top1": 58.01}, "byol: EMA all (classic)"),
    Row("byol: EMA projector at lr x4", "byol.py", "--ema-stages projector --lr 1.2", compare="byol: EMA projector"),
]

# The full-width scale of the claims (`reproduce.py claims --scale full`): width 64 and every training image
FULL_WIDTH = "--width 64 --train-subset 50000"

# Table 6 (ImageNet-100) and Table 4 (ImageNet-1K) run at the paper's ImageNet scale (docs/imagenet.md): the ImageNet
# stem (7x7 conv, stride 2, max-pool) in the conv1 stage, 224-pixel views cut from the full-size photographs, a
# loader that streams the JPEGs from disk, and last.pt every 500 steps inside the long epochs.
IMAGENET = "--stem imagenet --loader stream --image-size 224 --checkpoint-every 500"
# The values of solo-learn's ImageNet-100 scripts (vturrisi/solo-learn be3de80, the last argparse version:
# scripts/pretrain/imagenet-100/<method>.sh) that differ from our CIFAR presets; the rest already match
# (docs/imagenet.md has every value with its source). BYOL: lr 0.5, a predictor 8,192 wide, and a Gaussian blur on
# view 1 always and on view 2 with p 0.1; DINO: the same blur; MoCo V2+: queues of 65,536 keys and a blur with p
# 0.5 on each view (the script leaves --gaussian_prob at its default; the CIFAR scripts set 0); ReSSL: lr 0.3, a
# strong view with saturation 0.4 and blur p 0.5, and no --sync_batchnorm in its script (BatchNorm per GPU under
# --nproc 2; nothing changes on one GPU).
# beta 0.9995 for MoCo v2, whose cosine schedule otherwise ends at 0.999, below the start: rising to 1.0, as the other
# three methods' (the paper gives no final value; the method files refuse a schedule that falls)
SLOW_BETA = {
    method: "--beta 0.9995" + (" --beta-final 1.0" if method == "mocov2" else "")
    for method in ("byol", "dino", "ressl", "mocov2")
}
IMAGENET100 = {
    "byol": "--lr 0.5 --pred-hidden-dim 8192 --blur-p 1.0 0.1",
    "dino": "--blur-p 1.0 0.1",
    "ressl": "--lr 0.3 --no-sync-bn --strong-saturation 0.4 --strong-blur-p 0.5",
    "mocov2": "--queue-size 65536 --blur-p 0.5",
}


def claims_rows(random_flags):
    """The rows of the laptop experiment (and of its full-width twin): every method with its classic stage set,
    the projector only, and the other of none / all, the stage sets Table 3 and Fig. 4 need, then the rows of
    the beta claim and of the stability thesis; first the random backbone of the same width, made by
    linear_eval.py with `random_flags`. The rows after the first 19 are the ones the claims table (CLAIMS,
    docs/claims.md) needs besides; new rows go at the end, so that the others keep their places."""
    return (
        [Row(RANDOM, "linear_eval.py", random_flags)]
        + [
            Row(
                f"{method}: EMA {stages}" + (" (classic)" if stages == classic else ""),
                f"{method}.py",
                f"--ema-stages {stages}" + (f" --beta {beta}" if beta else "") + extra,
                paper,
                compare="" if stages == classic else f"{method}: EMA {classic} (classic)",
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
                    [
                        ("all", {"top1": 62.34}),
                        ("projector", {"top1": 60.39}),
                        ("none", {"top1": 2.22}),
                        ("backbone", {"top1": 45.84}),
                        ("conv1", {}),
                        ("block4,projector", {}),
                    ],
                ),
                (
                    "dino",
                    "all",
                    "",
                    [
                        ("all", {"top1": 58.12}),
                        ("projector", {"top1": 58.14}),
                        ("none", {"top1": 1.08}),
                        ("backbone", {"top1": 8.11}),
                    ],
                ),
                (
                    "ressl",
                    "all",
                    "",
                    [
                        ("all", {"top1": 54.66}),
                        ("projector", {"top1": 53.51}),
                        ("none", {"top1": 1.56}),
                        ("backbone", {"top1": 29.79}),
                    ],
                ),
            ]
            for stages, paper in rows
            # Fig. 5 is measured on BYOL without EMA (the paper: its Fig. 2 setting with beta 0)
            for extra in [" --log-grad-norms" if (method, stages) == ("byol", "none") else ""]
        ]
        + LAPTOP_THESIS_ROWS
    )


EXPERIMENTS = {
    "table1": Experiment(
        "Table 1: effect of EMA in each framework (remove it, or add it)",
        "cifar100",
        [
            Row("BYOL, beta 0.99 (baseline)", "byol.py", "--ema-stages all", {"top1": 62.01}),
            Row("BYOL, beta 0 (remove)", "byol.py", "--ema-stages none", {"top1": 43.48}),
            Row("SimSiam, beta 0 (baseline)", "simsiam.py", "--ema-stages none", {"top1": 51.41}),
            Row("SimSiam, beta 0.99 (add)", "simsiam.py", "--ema-stages all --beta 0.99", {"top1": 53.66}),
            Row("DINO, beta 0.99 (baseline)", "dino.py", "--ema-stages all", {"top1": 58.12}),
            Row("DINO, beta 0 (remove)", "dino.py", "--ema-stages none", {"top1": 1.08}),
            Row("ReSSL, beta 0.99 (baseline)", "ressl.py", "--ema-stages all", {"top1": 54.66}),
            Row("ReSSL, beta 0 (remove)", "ressl.py", "--ema-stages none", {"top1": 1.56}),
            Row("MoCo v2, beta 0.99 (baseline)", "mocov2.py", "--ema-stages all", {"top1": 62.34}),
            Row("MoCo v2, beta 0 (remove)", "mocov2.py", "--ema-stages none", {"top1": 2.22}),
            Row("SimCLR, beta 0 (baseline)", "simclr.py", "--ema-stages none", {"top1": 60.45}),
            Row("SimCLR, beta 0.90 (add)", "simclr.py", "--ema-stages all --beta 0.9", {"top1": 61.97}),
        ],
    ),
    "table2": Experiment(
        "Table 2, Fig. 2, 3 and 5: BYOL with a 2-wide projector, EMA on the projector",
        "cifar100",
        [
            Row("Fixed random encoder", "linear_eval.py", "--random-init --no-augment", {"top1": 15.21, "knn1": 6.85}),
            Row("w/o momentum (beta 0)", "byol.py", f"--ema-stages none {FIG2}", {"top1": 20.01, "knn1": 10.01}),
            Row(
                "w/ momentum, beta 0.9",
                "byol.py",
                f"--ema-stages projector --beta 0.9 {FIG2}",
                {"top1": 25.76, "knn1": 14.17},
            ),
            Row(
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
            row
            for method, numbers in [
                ("byol", (62.01, 62.17, 59.61)),
                ("dino", (58.12, 8.11, 58.14)),
                ("ressl", (54.66, 29.79, 53.51)),
                ("mocov2", (62.34, 45.84, 60.39)),
            ]
            for row in [
                Row(
                    f"{method}: EMA backbone + projector (baseline)",
                    f"{method}.py",
                    "--ema-stages all",
                    {"top1": numbers[0]},
                ),
                Row(f"{method}: EMA backbone only", f"{method}.py", "--ema-stages backbone", {"top1": numbers[1]}),
                Row(f"{method}: EMA projector only", f"{method}.py", "--ema-stages projector", {"top1": numbers[2]}),
            ]
        ],
    ),
    # Table 4: DINO with a ResNet-50 on ImageNet-1K (--data-dir: the full ImageNet folder, train/ and val/), beta 0.99
    # (the paper's Sec. 5 for its ResNet-50 runs). solo-learn has no DINO script for ImageNet-1K: these rows run
    # DINO's ImageNet-100 recipe (the preset) on a ResNet-50. Meant first for the time: run with --max-steps N. The
    # paper's numbers (2 RTX A6000 GPUs): EMA layers, parameters (MB), backbone forwards per image, minutes per
    # epoch, top-1 and top-5.
    "table4": Experiment(
        "Table 4: DINO, ResNet-50, ImageNet-1K: EMA on the whole encoder against the projector only (forwards, time)",
        "imagefolder",
        [
            Row(
                "dino: EMA backbone + projector",
                "dino.py",
                "--ema-stages all --beta 0.99",
                {"top1": 67.9, "top5": 88.3, "ema_layers": 53, "params_mb": 47.0, "forwards": 2, "min_per_epoch": 56.5},
            ),
            Row(
                "dino: EMA projector only",
                "dino.py",
                "--ema-stages projector --beta 0.99",
                {"top1": 67.8, "top5": 88.2, "ema_layers": 3, "params_mb": 23.5, "forwards": 1, "min_per_epoch": 38.5},
                compare="dino: EMA backbone + projector",
            ),
        ],
        flags=f"--arch resnet50 {IMAGENET} {IMAGENET100['dino']}",
    ),
    "table5": Experiment(
        "Table 5: ResNet-50 backbone",
        "cifar100",
        [
            row
            for method, full, proj in [
                ("byol", 63.71, 59.88),
                ("mocov2", 65.12, 61.76),
                ("ressl", 57.07, 56.10),
                ("dino", 53.04, 56.54),
            ]
            for row in pairs(method, {"top1": full}, {"top1": proj})
        ],
        flags="--arch resnet50",
    ),
    # Table 6: ResNet-18 on ImageNet-100 (point --data-dir at a folder with train/ and val/ of the 100 classes of
    # docs/imagenet100-classes.txt), 200 epochs, a global batch of 256 (the paper: 2 GPUs x 128; --nproc 2)
    "table6": Experiment(
        "Table 6: ImageNet-100, ResNet-18, EMA on the whole encoder or on the projector only, beta 0.99 and 0.9995",
        "imagefolder",
        [
            Row(
                f"{method}: EMA {'backbone + projector' if stages == 'all' else 'projector only'}, beta {beta}",
                f"{method}.py",
                f"--ema-stages {stages} {SLOW_BETA[method] if beta == '0.9995' else '--beta 0.99'} "
                f"{IMAGENET100[method]}".strip(),
                {"top1": top1},
            )
            for method, numbers in [
                ("byol", (76.60, 71.18, 75.02, 75.52)),
                ("dino", (74.16, 63.78, 74.22, 72.02)),
                ("ressl", (74.02, 61.48, 69.12, 65.81)),
                ("mocov2", (76.48, 69.86, 74.31, 72.06)),
            ]
            for beta, (full, proj) in [("0.99", numbers[0::2]), ("0.9995", numbers[1::2])]
            for stages, top1 in [("all", full), ("projector", proj)]
        ],
        flags=IMAGENET,
    ),
    # lr 1.0 is byol.py's default: written as the default, so that its BYOL row is Table 1's run, trained once
    "table7": Experiment(
        "Table 7: a frozen target projector (beta 1) at learning rates 1.0 and 4.0",
        "cifar100",
        [
            Row(f"{label}, lr {lr}", "byol.py", flags + ("" if lr == "1.0" else f" --lr {lr}"), {"top1": top1})
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
            Row("BYOL", "byol.py", "--ema-stages all", {"top1": 62.01, "knn1": 54.84}),
            Row("w/o momentum", "byol.py", "--ema-stages none", {"top1": 43.48, "knn1": 31.58}),
            Row(
                "w/o momentum + BN1 + BN2",
                "byol.py",
                "--ema-stages none --bn-block4 --bn-proj",
                {"top1": 49.59, "knn1": 42.92},
            ),
            Row("EMA projector", "byol.py", "--ema-stages projector", {"top1": 59.61, "knn1": 54.02}),
            Row("EMA projector + BN1", "byol.py", "--ema-stages projector --bn-block4", {"top1": 60.75, "knn1": 53.32}),
            Row("EMA projector + BN2", "byol.py", "--ema-stages projector --bn-proj", {"top1": 61.97, "knn1": 55.42}),
            Row(
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
            Row("BYOL (baseline)", "byol.py", "--ema-stages all", {"top1": 88.37}),
            Row("w/o momentum", "byol.py", "--ema-stages none", {"top1": 80.34}),
            Row("EMA projector", "byol.py", "--ema-stages projector", {"top1": 87.73}),
            Row("EMA projector + BN1", "byol.py", "--ema-stages projector --bn-block4", {"top1": 87.91}),
            Row("EMA projector + BN2", "byol.py", "--ema-stages projector --bn-proj", {"top1": 88.03}),
            Row(
                "EMA projector + BN1 + BN2", "byol.py", "--ema-stages projector --bn-block4 --bn-proj", {"top1": 88.45}
            ),
        ],
    ),
    "fig4": Experiment(
        "Fig. 4: BYOL with EMA on one stage, or a set of stages (the rest shared)",
        "cifar100",
        [
            Row(f"EMA on {stages}", "byol.py", f"--ema-stages {stages}", paper)
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
    # none / all, against a random backbone of the same width; --preset laptop (engine/cli.py's LAPTOP_SCALE) sets the scale.
    "laptop": Experiment(
        "Learn on a laptop: 6 methods x stage sets, quarter-width ResNet-18, 10,000 CIFAR-10 images, 10 epochs",
        "imagefolder",
        claims_rows("--random-init --no-augment --width 16 --train-subset 10000"),
        flags="--preset laptop",
        epochs=10,
        data_dir="cifar10-images",
    ),
    # The same rows at the paper's width on all of CIFAR-10's training images, for a GPU (`claims --scale full`):
    # the method's laptop values (--preset laptop) but width 64 and all 5,000 images of each class, 30 epochs
    # (5,850 steps of 256). Its runs and kept results live under a scale and an experiment name of their own, and
    # its claims go to docs/claims-gpu.md: never mixed with the laptop's. linear_eval.py takes --width and
    # --train-subset from these flags.
    "full-width": Experiment(
        "The laptop's rows at full width: ResNet-18 of width 64, all 50,000 CIFAR-10 training images, 30 epochs",
        "imagefolder",
        claims_rows("--random-init --no-augment"),
        flags=f"--preset laptop {FULL_WIDTH}",
        epochs=30,
        data_dir="cifar10-images",
    ),
    # The recipe search of --preset laptop (docs/small-scale.md, "Choosing the laptop recipe"): one seed per
    # candidate, scored on the validation split (--eval-split val: 10,000 training images never trained on),
    # each against its method's preset as it was before the search (the first flags of each method). Where a
    # preset has since taken a candidate (MoCo v2, SimCLR, DINO), every row of that method names the values
    # it ran with, so the rows stay what they were. The test split is not looked at here.
    "search": Experiment(
        "Choosing the laptop recipe: candidates on the validation split, against each method's preset",
        "imagefolder",
        [Row(RANDOM, "linear_eval.py", "--random-init --no-augment --width 16 --train-subset 10000")]
        + [
            Row(
                f"{method}: {flags or 'preset'}",
                f"{method}.py",
                flags,
                compare="" if flags == baseline else f"{method}: {baseline or 'preset'}",
            )
            for method, baseline, candidates in [
                (
                    "mocov2",
                    "--proj-hidden-dim 2048",
                    [
                        "--proj-hidden-dim 512",
                        "--proj-hidden-dim 2048 --beta 0.996 --beta-schedule cosine --beta-final 1.0",
                        "--proj-hidden-dim 512 --beta 0.996 --beta-schedule cosine --beta-final 1.0",
                    ],
                ),
                # lightly's SimCLR learns much faster (docs/small-scale.md): its projector and temperature, then its
                # optimiser (SGD lr 0.06, weight decay 5e-4) and its half-strength colour jitter
                (
                    "simclr",
                    SIMCLR_BEFORE,
                    [
                        f"{SIMCLR_BEFORE} --proj-hidden-dim 512",
                        f"{SIMCLR_BEFORE} --proj-hidden-dim 512 --temperature 0.5",
                        "--optimizer sgd --lr 0.06 --weight-decay 5e-4 --jitter-strength 1.0",
                        "--optimizer lars --lr 0.4 --weight-decay 1e-5 --jitter-strength 0.5",
                        "--optimizer sgd --lr 0.06 --weight-decay 5e-4 --jitter-strength 0.5",
                    ],
                ),
                # BYOL's preset lr 0.3 was chosen on test images (docs/small-scale.md): redone here against 1.0.
                # BYOL and ReSSL: beta rising by cosine from 0.99 to 1 over the run (solo-learn's CIFAR recipes),
                # which helped MoCo v2 here
                ("byol", "", ["--proj-hidden-dim 1024 --pred-hidden-dim 1024", "--lr 1.0", "--beta-schedule cosine"]),
                # DINO's loss sits at log(4,096) for the whole laptop run: a sharper teacher (0.04 throughout,
                # the warm-up's own start) and fewer prototypes, alone and together
                (
                    "dino",
                    f"{DINO_BEFORE} --teacher-temp 0.07",
                    [
                        f"{DINO_BEFORE} --teacher-temp 0.07 --proj-hidden-dim 512",
                        f"{DINO_BEFORE} --teacher-temp 0.04",
                        f"{DINO_BEFORE} --teacher-temp 0.07 --num-prototypes 1024",
                        f"{DINO_BEFORE} --teacher-temp 0.04 --num-prototypes 1024",
                    ],
                ),
                # ReSSL's and SimSiam's learning rates doubled (the presets' 0.06: MoCo's CIFAR demo, SimSiam's
                # paper), and ReSSL's teacher temperature softened (0.04, the paper's, to 0.07): its loss stays
                # near chance for the whole run
                ("ressl", "", ["--proj-hidden-dim 512", "--lr 0.12", "--teacher-temp 0.07", "--beta-schedule cosine"]),
                ("simsiam", "", ["--proj-hidden-dim 512 --proj-dim 512", "--lr 0.12"]),
            ]
            for flags in [baseline, *candidates]
        ],
        flags="--preset laptop --eval-split val",
        epochs=10,
        data_dir="cifar10-images",
    ),
    # Sec. 7 gives the projector-only runs at beta 0.9995 only as drops from beta 0.99: in the row labels.
    "beta0.9995": Experiment(
        "Sec. 7 / Fig. 6: a very slow target (beta 0.9995) against beta 0.99, CIFAR-100",
        "cifar100",
        [
            row
            for method, (full, slow, proj, drop) in [
                ("byol", (62.01, 54.81, 59.61, 2.07)),
                ("dino", (58.12, 38.49, 58.14, 4.36)),
                ("ressl", (54.66, 42.46, 53.51, 3.33)),
                ("mocov2", (62.34, 53.04, 60.39, 4.78)),
            ]
            for row in pairs(method, {"top1": full}, {"top1": proj})  # beta 0.99, the default: Table 3's runs
            + [
                Row(
                    f"{method}: EMA backbone + projector, beta 0.9995",
                    f"{method}.py",
                    f"--ema-stages all {SLOW_BETA[method]}",
                    {"top1": slow},
                ),
                Row(
                    f"{method}: EMA projector only, beta 0.9995 (paper: -{drop} from beta 0.99)",
                    f"{method}.py",
                    f"--ema-stages projector {SLOW_BETA[method]}",
                ),
            ]
        ],
    ),
}


# ----------------------------------------------------------------------------------------
# The claims of the paper that the laptop rows can test (docs/claims.md, `reproduce.py claims`)
# ----------------------------------------------------------------------------------------

# The stages of the encoder, input to output (common.STAGES: the keys of grad_norms.jsonl), named here so that
# the report needs no torch
STAGES = ("conv1", "block1", "block2", "block3", "block4", "projector")

# The accuracy every claim is judged in: kNN top-1 (weighted, k = 200), the primary metric, fixed before any
# claims run; and beside it the online linear probe's top-1, the paper's own metric ("Acc", "Top-1").
ACCURACY_METRICS = ("knn_top1", "linear_top1")
METRIC_NAMES = {"knn_top1": "kNN top-1", "linear_top1": "linear probe top-1", "knn1_top1": "1-NN top-1"}

# "Close" (Table 3; the abstract's "comparable or preferable"): projector-only EMA is not worse than full EMA
# by more than a margin, tested one-sided. The margin comes from the paper's own numbers: the largest gap it
# calls comparable is BYOL's (Table 3: 62.01 with full EMA, 59.61 with projector-only EMA), which is this
# fraction of what BYOL's training adds over a fixed random encoder (Table 2: 15.21). Each method's margin is
# the same fraction of what its own full-EMA row adds over the random backbone at our scale (report.py).
PAPER_BYOL_FULL_EMA, PAPER_BYOL_PROJECTOR_EMA, PAPER_RANDOM_ENCODER = 62.01, 59.61, 15.21
CLOSE_FRACTION = (PAPER_BYOL_FULL_EMA - PAPER_BYOL_PROJECTOR_EMA) / (PAPER_BYOL_FULL_EMA - PAPER_RANDOM_ENCODER)
FIXED_MARGINS = (1.0, 2.0, 3.0)  # points: the verdicts a reader with another margin in mind would get

# Sec. 7 and Fig. 6 (CIFAR-100, 200 epochs): full EMA's top-1 at beta 0.99 and at 0.9995, and how far
# projector-only EMA drops between them (the paper gives only the drop); Table 6 (ImageNet-100): the change
# Delta_acc of full EMA and of projector-only EMA between the same two betas.
BETA_GENTLE = "0.99"  # the presets' beta (each method's args.json says so)
BETA_PAPER = {
    "byol": {"name": "BYOL", "full": (62.01, 54.81), "projector drop": 2.07, "table 6": (-5.42, +0.50)},
    "dino": {"name": "DINO", "full": (58.12, 38.49), "projector drop": 4.36, "table 6": (-10.38, -2.20)},
    "ressl": {"name": "ReSSL", "full": (54.66, 42.46), "projector drop": 3.33, "table 6": (-12.54, -3.31)},
    "mocov2": {"name": "MoCo v2", "full": (62.34, 53.04), "projector drop": 4.78, "table 6": (-6.62, -2.25)},
}
PAPER_EPOCHS, PAPER_STEPS_PER_EPOCH = 200, 195  # CIFAR-100: 50,000 images in batches of 256, the last one dropped


@dataclass
class Claim:
    """One claim of the paper, fixed before the runs it reads were looked at (or, with added_later, after).

    An accuracy claim compares side a with side b, paired by seed, in each metric of `metrics`. A side is a
    row's label, or a pair of labels (first, second) meaning that row's per-seed difference first - second,
    so that a claim about a drop or a gap (the beta claim, Table 7) is one paired comparison too.
    `direction`: "higher" (the paper's a is above its b), "lower", or "close" (a - b above minus a margin).

    A measured claim (`measure` set) reads an instrument's files instead of an accuracy: its per-seed value is
    a ratio (report.MEASURES says of what), judged on its logarithm, "higher" (ratio > 1) or "lower" (< 1).
    """

    text: str  # the claim, in the paper's words where it has them
    paper: str  # where the paper shows it, with its numbers
    a: object  # a row's label, or (label, label): a difference of two rows
    b: object = None  # the same; None where the measure is one row's own (a ratio of two of its stages)
    direction: str = "higher"
    measure: str = ""  # "" for accuracy; else a key of report.MEASURES
    metrics: tuple = ACCURACY_METRICS
    monitor: bool = False  # show the collapse monitor (output spread, feature rank) of a and b beside it
    # True for a claim added after the results of the rows it reads were known (the claims page says which and why)
    added_later: bool = False

    def __post_init__(self):
        if self.added_later:  # first, so that a shortened label (the forest plot's) still shows it
            self.text = "(added later) " + self.text


def classic(method):
    """The label of a method's full-EMA row at the preset's beta (its classic stage set, for the EMA methods)."""
    return f"{method}: EMA all (classic)"


def aggressive(method, stages):
    """The label of a method's row with EMA on `stages` at the aggressive beta of Sec. 7."""
    return f"{method}: EMA {stages} at beta {BETA_AGGRESSIVE}"


STABILITY_ROWS = {stages: f"byol: EMA {stages} with stability instruments" for stages in ("none", "projector", "all")}
TWO_WIDE_ROWS = {
    "none": "byol 2-wide projector: EMA none",
    "0.9": "byol 2-wide projector: EMA projector at beta 0.9",
    "0.99": "byol 2-wide projector: EMA projector at beta 0.99",
}
# Fig. 5's gradients are logged on these rows: the first, the paper's setting (beta 0), as the laptop's first
# claims rows ran it; the others with EMA on the projector and on every stage, to see whether the EMA changes
# the online network's fluctuation (the stability rows' `none` repeats the first row's training, seed for seed)
GRADIENT_ROWS = {
    "byol: EMA none": "no EMA",
    STABILITY_ROWS["none"]: "no EMA, stability run",
    STABILITY_ROWS["projector"]: "EMA projector",
    STABILITY_ROWS["all"]: "EMA all",
}

ACCURACY_CLAIMS = [
    # Table 1, "Remove": each method without EMA against its own EMA baseline, in the same metric, as the paper
    # compares them; the collapse monitor says whether the outputs collapsed
    *[
        Claim(
            f"{name} collapses without EMA",
            f"Table 1: {full} -> {none}",
            f"{m}: EMA none",
            classic(m),
            "lower",
            monitor=True,
        )
        for m, name, full, none in [
            ("mocov2", "MoCo v2", 62.34, 2.22),
            ("dino", "DINO", 58.12, 1.08),
            ("ressl", "ReSSL", 54.66, 1.56),
        ]
    ],
    Claim(
        "BYOL drops without EMA", "Table 1: 62.01 -> 43.48", "byol: EMA none", classic("byol"), "lower", monitor=True
    ),
    # Table 1, "Add"
    Claim("EMA helps SimSiam", "Table 1: 51.41 -> 53.66", "simsiam: EMA all", "simsiam: EMA none (classic)", "higher"),
    Claim("EMA helps SimCLR (beta 0.9)", "Table 1: 60.45 -> 61.97", "simclr: EMA all", "simclr: EMA none (classic)"),
    # Table 3: projector-only EMA "comparable or preferable" to full EMA; backbone-only EMA far worse
    *[
        Claim(
            f"{name}: projector-only EMA is comparable or preferable to full EMA",
            f"Table 3: {full} -> {proj}",
            f"{m}: EMA projector",
            classic(m),
            "close",
        )
        for m, name, full, proj in [
            ("byol", "BYOL", 62.01, 59.61),
            ("mocov2", "MoCo v2", 62.34, 60.39),
            ("dino", "DINO", 58.12, 58.14),
            ("ressl", "ReSSL", 54.66, 53.51),
        ]
    ],
    *[
        Claim(
            f"{name}: backbone-only EMA is far worse than full EMA",
            f"Table 3: {full} -> {backbone}",
            f"{m}: EMA backbone",
            classic(m),
            "lower",
        )
        for m, name, full, backbone in [
            ("mocov2", "MoCo v2", 62.34, 45.84),
            ("dino", "DINO", 58.12, 8.11),
            ("ressl", "ReSSL", 54.66, 29.79),
        ]
    ],
    # Fig. 4 (BYOL in the paper; MoCo v2 here, where the stage sets separate at 10 epochs)
    Claim(
        "MoCo v2: EMA on the late stages matters more than on the early ones",
        "Fig. 4 (BYOL, CIFAR-100)",
        "mocov2: EMA block4,projector",
        "mocov2: EMA conv1",
    ),
    Claim(
        "MoCo v2: EMA on the projector alone beats EMA on conv1 alone",
        "Fig. 4 (BYOL, CIFAR-100)",
        "mocov2: EMA projector",
        "mocov2: EMA conv1",
    ),
    # Sec. 7, Table 6, Fig. 6: from the gentle beta to the aggressive one, full EMA drops more than projector-only
    # EMA. a: full EMA's drop, b: projector-only EMA's drop, per seed; the claim: a - b > 0
    *[
        Claim(
            f"{numbers['name']}: the drop from beta {BETA_GENTLE} to {BETA_AGGRESSIVE} is smaller with "
            "projector-only EMA",
            f"Sec. 7 (CIFAR-100): drop {numbers['full'][0] - numbers['full'][1]:.2f} full, "
            f"{numbers['projector drop']:.2f} projector-only; Table 6 (ImageNet-100): "
            f"{numbers['table 6'][0]:+.2f} / {numbers['table 6'][1]:+.2f}",
            (classic(m), aggressive(m, "all")),
            (f"{m}: EMA projector", aggressive(m, "projector")),
        )
        for m, numbers in BETA_PAPER.items()
    ],
    # Sec. 7's other two sentences: full EMA "drops dramatically" at the aggressive beta, and at that beta
    # projector-only EMA "performs much better than baselines" (Fig. 6(b)); added after the rows were seen
    *[
        Claim(
            f"{numbers['name']}: full EMA drops from beta {BETA_GENTLE} to {BETA_AGGRESSIVE}",
            f'Sec. 7: "all SSL frameworks drop dramatically": {numbers["full"][0]:.2f} -> {numbers["full"][1]:.2f}',
            aggressive(m, "all"),
            classic(m),
            "lower",
            added_later=True,
        )
        for m, numbers in BETA_PAPER.items()
    ],
    *[
        Claim(
            f"{numbers['name']}: at beta {BETA_AGGRESSIVE}, projector-only EMA beats full EMA",
            f"Fig. 6(b): full EMA {numbers['full'][1]:.2f}; projector-only EMA {numbers['projector drop']:.2f} "
            f"below its beta {BETA_GENTLE} accuracy",
            aggressive(m, "projector"),
            aggressive(m, "all"),
            added_later=True,
        )
        for m, numbers in BETA_PAPER.items()
    ],
    # Table 2: BYOL with a 2-wide FC2, EMA on the projector, against no EMA; the paper reports linear and 1-NN
    *[
        Claim(
            f"EMA on FC2 (beta {beta}) raises linear and 1-NN accuracy",
            f"Table 2: linear 20.01 -> {linear}, 1-NN 10.01 -> {one_nn}",
            TWO_WIDE_ROWS[beta],
            TWO_WIDE_ROWS["none"],
            metrics=(*ACCURACY_METRICS, "knn1_top1"),
        )
        for beta, linear, one_nn in [("0.9", 25.76, 14.17), ("0.99", 22.63, 12.56)]
    ],
    # Table C.8: BN on block4's output (BN1) and the projector's (BN2) helps projector-only EMA
    Claim(
        "BN1 + BN2 raise projector-only EMA",
        "Table C.8: 59.61 -> 62.48",
        "byol: EMA projector + BN1 + BN2",
        "byol: EMA projector",
    ),
    # Table 7: the paper freezes the target projector (beta 1); these rows use projector-only EMA at the preset's
    # beta. a: projector-only minus full EMA at four times the preset's learning rate; b: the same at the preset's
    Claim(
        "The gap between projector-only and full EMA grows with the learning rate",
        "Table 7 (frozen target projector): -1.74 at lr 1.0, +4.31 at lr 4.0",
        ("byol: EMA projector at lr x4", "byol: EMA all at lr x4"),
        ("byol: EMA projector", classic("byol")),
    ),
]

MEASURED_CLAIMS = [
    # Fig. 5 (BYOL, beta 0): the l-inf gradient of the loss at each stage's output; magnitude: mean over steps
    Claim(
        "The gradient at the projector's output is larger than at block4's",
        'Fig. 5 (BYOL, beta 0): "the projector has the most significance"',
        "byol: EMA none",
        measure="gradient: projector / block4",
    ),
    Claim(
        "The gradient at block4's output is larger than at block1's",
        'Fig. 5: "block 1, 2, 3 have the smallest magnitude gradients"',
        "byol: EMA none",
        measure="gradient: block4 / block1",
    ),
    # Fig. 5 on the paper's own run: the gradients are recorded "for the case shown in Fig. 2 with beta = 0", the
    # 2-wide projector without EMA (the claims above read the preset's projector); added after those were seen
    *[
        Claim(
            f"{text} (Fig. 2's 2-wide projector, no EMA)",
            paper,
            TWO_WIDE_ROWS["none"],
            direction=direction,
            measure=measure,
            added_later=True,
        )
        for text, paper, direction, measure in [
            (
                "The gradient at the projector's output is larger than at block4's",
                'Fig. 5, "for the case shown in Fig. 2 with beta = 0"',
                "higher",
                "gradient: projector / block4",
            ),
            (
                "The gradient at block4's output is larger than at block1's",
                'Fig. 5: "block 1, 2, 3 have the smallest magnitude gradients"',
                "higher",
                "gradient: block4 / block1",
            ),
            (
                "The projector's gradient fluctuates most",
                'Fig. 5: "the projector ... is most fluctuated"',
                "higher",
                "fluctuation: projector / most fluctuating other stage",
            ),
            (
                "Blocks 1-3's gradients fluctuate least",
                'Fig. 5: "block 1, 2, 3 ... are most stable"',
                "lower",
                "fluctuation: most fluctuating of blocks 1-3 / least of conv1, block4, projector",
            ),
        ]
    ],
    # Fig. 5's fluctuation (report.fluctuation defines it), with and without EMA
    *[
        claim
        for row, condition in GRADIENT_ROWS.items()
        for claim in [
            Claim(
                f"The projector's gradient fluctuates most ({condition})",
                'Fig. 5: "the projector ... is most fluctuated"',
                row,
                measure="fluctuation: projector / most fluctuating other stage",
            ),
            Claim(
                f"Blocks 1-3's gradients fluctuate least ({condition})",
                'Fig. 5: "block 1, 2, 3 ... are most stable"',
                row,
                direction="lower",
                measure="fluctuation: most fluctuating of blocks 1-3 / least of conv1, block4, projector",
            ),
        ]
    ],
    # The thesis (Sec. 3.2): "momentum helps the encoder learn from the past to make the training more stable";
    # measured directly: how far the target's output moves per step on a fixed batch (target_drift.jsonl)
    *[
        Claim(
            f"EMA on {'every stage' if stages == 'all' else 'the projector'} makes the target move less per step "
            "than no EMA",
            'Sec. 3.2: EMA makes "the training more stable"',
            STABILITY_ROWS[stages],
            STABILITY_ROWS["none"],
            "lower",
            measure="target drift",
        )
        for stages in ("all", "projector")
    ],
    # ... and the online network's own drift, which the paper's words are about (the target of an EMA moves less by
    # construction: it averages the online network's steps); added after the target's drift was seen
    *[
        Claim(
            f"EMA on {'every stage' if stages == 'all' else 'the projector'} makes the online network move less per "
            "step than no EMA",
            'Sec. 3.2: with EMA "the weight of the online network is much more stable"',
            STABILITY_ROWS[stages],
            STABILITY_ROWS["none"],
            "lower",
            measure="online drift",
            added_later=True,
        )
        for stages in ("all", "projector")
    ],
    # Fig. 2-3 and Appendix E: without EMA, FC2's filters jump ("abnormal point"); with EMA they do not
    *[
        Claim(
            f"Without EMA, FC2's weights make larger jumps than with EMA at beta {beta}",
            'Fig. 2-3, App. E: with EMA "no spike or abnormal point"',
            TWO_WIDE_ROWS["none"],
            TWO_WIDE_ROWS[beta],
            measure="FC2 jump",
        )
        for beta in ("0.9", "0.99")
    ],
    # Table 4: projector-only EMA shares the backbone's forward pass
    Claim(
        "Projector-only EMA runs the backbone once per image instead of twice, and takes less time",
        "Table 4 (DINO, ImageNet-1K): 2 -> 1 forwards, 56.5 -> 38.5 min/epoch",
        "dino: EMA projector",
        classic("dino"),
        "lower",
        measure="median epoch time",
    ),
]
CLAIMS = ACCURACY_CLAIMS + MEASURED_CLAIMS

# The scales the claims are tested at (`reproduce.py claims --scale S`): the experiment whose rows they read, and
# the page they are written to in docs/. Each scale keeps its runs and results apart; none reads another's.
SCALES = {"laptop": ("laptop", "claims.md"), "full": ("full-width", "claims-gpu.md")}
