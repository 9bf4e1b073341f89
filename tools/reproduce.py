"""Reproduce the paper's tables and figures: one named experiment, one command.

    python tools/reproduce.py --list                       # every experiment and the commands it runs
    python tools/reproduce.py table1                       # Table 1 at full length (CIFAR-100, 200 epochs, GPU)
    python tools/reproduce.py table1 --only remove --dataset imagefolder --data-dir DIR --epochs 3 --batch-size 128
    python tools/reproduce.py table3 --jobs 4              # Table 3, four runs at a time on one GPU
    python tools/reproduce.py table6 --nproc 2             # Table 6 on 2 GPUs, as the paper ran it (torchrun)

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
  * Table 6 (ImageNet-100): the backbone keeps its CIFAR stem; point --data-dir at an
    ImageNet-100 folder (train/, val/) and choose --image-size through --extra.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
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
    compare: str = ""  # the label of the row this one is compared with (paired by seed), if any


@dataclass
class Experiment:
    title: str
    dataset: str  # the paper's dataset; --dataset overrides
    runs: list
    flags: str = ""  # flags for every run of this experiment
    epochs: int = 200  # the paper's length; --epochs overrides
    data_dir: str = "./data"  # --data-dir overrides


def pairs(method, classic, projector, extra=""):
    """The two rows most tables have: EMA on every stage (baseline) and on the projector only."""
    return [
        Run(f"{method}: EMA backbone + projector", f"{method}.py", f"--ema-stages all {extra}".strip(), classic),
        Run(f"{method}: EMA projector only", f"{method}.py", f"--ema-stages projector {extra}".strip(), projector),
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
        Run(
            f"{method}: EMA {stages} at beta {BETA_AGGRESSIVE}",
            f"{method}.py",
            f"--ema-stages {stages} --beta {BETA_AGGRESSIVE}",
            compare=f"{method}: EMA {stages}" + (" (classic)" if stages == "all" else ""),
        )
        for method in ("byol", "dino", "ressl", "mocov2")
        for stages in ("all", "projector")
    ],
    *[
        Run(f"byol: EMA {stages} with stability instruments", "byol.py", f"--ema-stages {stages} {STABILITY}")
        for stages in ("none", "projector", "all")
    ],
    Run("byol 2-wide projector: EMA none", "byol.py", f"--ema-stages none {TWO_WIDE}", {"top1": 20.01, "knn1": 10.01}),
    *[
        Run(
            f"byol 2-wide projector: EMA projector at beta {beta}",
            "byol.py",
            f"--ema-stages projector --beta {beta} {TWO_WIDE}",
            paper,
            compare="byol 2-wide projector: EMA none",
        )
        for beta, paper in [("0.9", {"top1": 25.76, "knn1": 14.17}), ("0.99", {"top1": 22.63, "knn1": 12.56})]
    ],
    Run(
        "byol: EMA projector + BN1 + BN2",
        "byol.py",
        "--ema-stages projector --bn-block4 --bn-proj",
        {"top1": 62.48, "knn1": 55.66},
        compare="byol: EMA projector",
    ),
    # Table 7: the paper's learning rates 1.0 and 4.0; the laptop preset's 0.3 and four times it
    Run("byol: EMA all at lr x4", "byol.py", "--ema-stages all --lr 1.2", {"top1": 58.01}, "byol: EMA all (classic)"),
    Run("byol: EMA projector at lr x4", "byol.py", "--ema-stages projector --lr 1.2", compare="byol: EMA projector"),
]
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
    # The rows after the first 19 are the ones the claims table (CLAIMS, docs/claims.md) needs besides.
    "laptop": Experiment(
        "Learn on a laptop: 6 methods x stage sets, quarter-width ResNet-18, 10,000 CIFAR-10 images, 10 epochs",
        "imagefolder",
        [
            Run(
                RANDOM,
                "linear_eval.py",
                "--random-init --no-augment --width 16 --train-subset 10000",
            )
        ]
        + [
            Run(
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
        + LAPTOP_THESIS_ROWS,
        flags="--preset laptop",
        epochs=10,
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
        [Run(RANDOM, "linear_eval.py", "--random-init --no-augment --width 16 --train-subset 10000")]
        + [
            Run(
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


# The claims of the paper that the laptop experiment can test (docs/claims.md, `reproduce.py claims`).
# Each compares row a with row b in kNN top-1, paired by seed. "higher" / "lower": the paper's a is
# above / below its b; "close": within CLOSE points either way. Fig. 5 and Table 4 are measured otherwise
# (kind "gradients", "cost"). The verdict comes from the 95 % interval of the paired difference (verdict()).
CLOSE = 3.0  # points: Table 3's largest gap between projector-only and full EMA is 2.4
CLAIMS = [
    # (claim, the paper's evidence, row a, row b, kind)
    ("MoCo v2 collapses without EMA", "Table 1: 62.34 -> 2.22", "mocov2: EMA none", RANDOM, "lower"),
    ("DINO collapses without EMA", "Table 1: 58.12 -> 1.08", "dino: EMA none", RANDOM, "lower"),
    ("ReSSL collapses without EMA", "Table 1: 54.66 -> 1.56", "ressl: EMA none", RANDOM, "lower"),
    ("BYOL drops without EMA", "Table 1: 62.01 -> 43.48", "byol: EMA none", "byol: EMA all (classic)", "lower"),
    ("EMA helps SimSiam", "Table 1: 51.41 -> 53.66", "simsiam: EMA all", "simsiam: EMA none (classic)", "higher"),
    (
        "EMA helps SimCLR (beta 0.9)",
        "Table 1: 60.45 -> 61.97",
        "simclr: EMA all",
        "simclr: EMA none (classic)",
        "higher",
    ),
    *[
        (
            f"{name}: projector-only EMA is close to full EMA",
            f"Table 3: {full} -> {proj}",
            f"{m}: EMA projector",
            f"{m}: EMA all (classic)",
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
        (
            f"{name}: backbone-only EMA is far worse than full EMA",
            f"Table 3: {full} -> {backbone}",
            f"{m}: EMA backbone",
            f"{m}: EMA all (classic)",
            "lower",
        )
        for m, name, full, backbone in [
            ("mocov2", "MoCo v2", 62.34, 45.84),
            ("dino", "DINO", 58.12, 8.11),
            ("ressl", "ReSSL", 54.66, 29.79),
        ]
    ],
    (
        "MoCo v2: EMA on the late stages matters more than on the early ones",
        "Fig. 4 (BYOL, CIFAR-100)",
        "mocov2: EMA block4,projector",
        "mocov2: EMA conv1",
        "higher",
    ),
    (
        "MoCo v2: EMA on the projector alone beats EMA on conv1 alone",
        "Fig. 4 (BYOL, CIFAR-100)",
        "mocov2: EMA projector",
        "mocov2: EMA conv1",
        "higher",
    ),
    (
        "The gradient at the projector's output is larger than at block4's, and block4's than block1's",
        "Fig. 5 (BYOL, beta 0)",
        "byol: EMA none",
        "",
        "gradients",
    ),
    (
        "Projector-only EMA runs the backbone once per image instead of twice, and takes less time",
        "Table 4 (DINO, ImageNet-1K): 2 -> 1 forwards, 56.5 -> 38.5 min/epoch",
        "dino: EMA projector",
        "dino: EMA all (classic)",
        "cost",
    ),
]


def refuse(message):
    """Bad input: one line on stderr, exit code 2 (argparse's own usage errors keep their form)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """As common.HelpFormatter (this tool imports nothing of the project, so that --table needs no torch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("experiment", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}, or claims (see --list)")
    p.add_argument("--list", action="store_true", help="print every experiment and its commands, run nothing")
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
    p.add_argument("--claims-out", default=str(ROOT / "docs" / "claims.md"), help="where claims writes its table")
    p.add_argument(
        "--results",
        default=str(ROOT / "docs" / "results"),
        help="where each finished run's small files (args.json, metrics.jsonl, ...) are kept, under "
        "<experiment>/<scale>/<row>/seed<S>/, for the tables: commit them, and --table rebuilds every table "
        "from them with no run directory present",
    )
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
    if not args.list and args.experiment not in [*EXPERIMENTS, "claims"]:
        p.error(f"name an experiment ({', '.join(EXPERIMENTS)}, claims) or pass --list")
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
    if args.seeds is None:
        args.seeds = "0,1,2" if args.experiment == "claims" else "0"
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        refuse(f"--seeds {args.seeds!r}: give a comma list of seeds, e.g. 0,1,2")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        refuse(f"--seeds {args.seeds}: give each seed once, and none below 0")
    return args


def scale_name(args, experiment):
    """The directory of one scale of reproduction: dataset, epochs, steps, batch, and a digest of
    the other flags that change results, so different scales never share a run directory. --device is
    left out: where a run ran is recorded with its results (provenance.json), and shown in the tables."""
    dataset = args.dataset or experiment.dataset
    name = f"{dataset}-e{args.epochs}" + (f"-s{args.max_steps}" if args.max_steps else "") + f"-b{args.batch_size}"
    name += f"-p{args.nproc}" if args.nproc > 1 else ""
    extra = re.sub(r"--device\s+\S+", "", args.extra).split()
    other = f"{args.warmup_epochs} {args.queue_size} {' '.join(extra)}"
    return name + ("" if other == "None None " else "-" + hashlib.sha1(other.encode()).hexdigest()[:6])


def slug(experiment, run):
    return re.sub(
        r"[^A-Za-z0-9.,=+]+", "_", f"{run.script[:-3]} {experiment.flags} {run.flags}".replace("--", "")
    ).strip("_")


def run_dir(args, experiment, run, seed=0):
    return Path(args.out_root) / scale_name(args, experiment) / slug(experiment, run) / f"seed{seed}"


def results_dir(args, name, experiment, run, seed=0):
    """Where a finished run's small files are kept (and committed): --results/<experiment>/<scale>/<row>/seed<S>."""
    return Path(args.results) / name / scale_name(args, experiment) / slug(experiment, run) / f"seed{seed}"


def data_dir(args, experiment):
    """--data-dir, or the experiment's own folder when it runs on the experiment's dataset (./data otherwise)."""
    if args.data_dir:
        return args.data_dir
    return experiment.data_dir if (args.dataset or experiment.dataset) == experiment.dataset else "./data"


def command(args, experiment, run, seed=0):
    """The command line of one run, as a user would type it."""
    data = ["--dataset", args.dataset or experiment.dataset, "--data-dir", data_dir(args, experiment)]
    if run.script == "linear_eval.py":  # the random-encoder baseline: no pre-training
        arch = re.findall(r"--arch (\S+)", experiment.flags) or ["resnet18"]
        passed_on = re.findall(
            r"--(?:device|width|train-subset|eval-split|val-size) \S+", f"{experiment.flags} {args.extra}"
        )
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
            "--seed",
            str(seed),
            "--out",
            str(run_dir(args, experiment, run, seed) / "linear_eval.json"),
        ]
    warmup = args.warmup_epochs if args.warmup_epochs is not None else max(1, round(10 * args.epochs / 200))
    scale = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--warmup-epochs", str(warmup)]
    scale += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    scale += (
        ["--queue-size", str(args.queue_size)] if args.queue_size and run.script in ("mocov2.py", "ressl.py") else []
    )
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    return [
        sys.executable,
        *(launcher if args.nproc > 1 else []),
        str(ROOT / run.script),
        *shlex.split(experiment.flags),
        *shlex.split(run.flags),
        *data,
        *scale,
        *shlex.split(args.extra),
        "--seed",
        str(seed),
        "--out-dir",
        str(run_dir(args, experiment, run, seed)),
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


def pending(args, name, experiment, run, seed):
    """The command that runs or resumes one row, or None (printed as [done] or [kept]) if it finished with this
    command: in its run directory, or in the kept results (--results: a fresh clone does not redo them)."""
    directory = run_dir(args, experiment, run, seed)
    cmd = command(args, experiment, run, seed)
    done = directory / "reproduce-done.json"
    if done.exists() and json.loads(done.read_text()).get("command") == show(cmd):
        print(f"[done]    {run.label}, seed {seed}: {directory}", flush=True)
        return None
    kept = results_dir(args, name, experiment, run, seed) / "provenance.json"
    if kept.exists() and json.loads(kept.read_text()).get("command") == show(cmd):
        print(f"[kept]    {run.label}, seed {seed}: {kept.parent}", flush=True)
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


def mark_done(args, name, experiment, run, seed, threads, started, load, env):
    """Record that a row finished, with the exact command, so that the next invocation skips it; and keep
    its small files in --results with where and when it ran, and the load it shared (provenance.json)."""
    directory = run_dir(args, experiment, run, seed)
    shown = show(command(args, experiment, run, seed))
    (directory / "reproduce-done.json").write_text(json.dumps({"command": shown}))
    kept = results_dir(args, name, experiment, run, seed)
    kept.mkdir(parents=True, exist_ok=True)
    for file in KEPT:
        if (directory / file).exists():
            shutil.copyfile(directory / file, kept / file)
    trained = json.loads((directory / "args.json").read_text()) if (directory / "args.json").exists() else {}
    provenance = {
        "command": shown,
        "git_revision": trained.get("git_revision", git_revision()),
        "torch": trained.get("torch") or torch_version(),  # (linear_eval.py writes no args.json)
        "device": trained.get("device_name", "cpu") if run.script != "linear_eval.py" else "cpu",
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


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def torch_version():
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def threads_for(args):
    """OMP_NUM_THREADS of each process: as set, or an even share of this machine's CPU threads."""
    return os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))))


def run_one(args, name, experiment, run, seed):
    """Run (or resume, or skip) one row with one seed. Returns True if the run is complete."""
    cmd = pending(args, name, experiment, run, seed)
    if cmd is None:
        return True
    print(f"[{'resume' if '--resume' in cmd else 'run'}]     {run.label}, seed {seed}: {show(cmd)}", flush=True)
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
            f"[failed]  {run.label}, seed {seed}: exit {process.returncode}; fix the cause and run this command "
            f"again to resume",
            flush=True,
        )
        return False
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    load = meter.summary(cpu_seconds, time.time() - started, threads)
    mark_done(args, name, experiment, run, seed, threads, started, load, dict(os.environ))
    return True


def run_many(args, name, experiment, jobs):
    """Run the (row, seed) jobs --jobs at a time, each as its own process whose output goes to reproduce.log
    in its run directory. A failed one does not stop the others. Returns the failed ones' log files."""
    todo = [(run, seed, cmd) for run, seed in jobs if (cmd := pending(args, name, experiment, run, seed)) is not None]
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
                run, seed, cmd = todo.pop(0)
                log = run_dir(args, experiment, run, seed) / "reproduce.log"
                with open(log, "a") as out:  # appended: an earlier, interrupted attempt stays above
                    out.write(f"$ {show(cmd)}\n")
                    out.flush()
                    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[process] = (run, seed, log, time.time(), LoadMeter())
                print(
                    f"[{'resume' if '--resume' in cmd else 'run'}]     {run.label}, seed {seed} (pid {process.pid}, "
                    f"log {log}): {show(cmd)}",
                    flush=True,
                )
            time.sleep(0.2)
            ended = {p: cpu for p, (*_, meter) in running.items() if (cpu := wait_for(p, meter)) is not None}
            for process, cpu_seconds in ended.items():
                run, seed, log, started, meter = running.pop(process)
                took = f"after {(time.time() - started) / 60:.1f} min; log {log}"
                if process.returncode == 0:
                    load = meter.summary(cpu_seconds, time.time() - started, env["OMP_NUM_THREADS"])
                    mark_done(args, name, experiment, run, seed, env["OMP_NUM_THREADS"], started, load, env)
                    print(f"[finished] {run.label}, seed {seed}: exit 0 {took}", flush=True)
                else:
                    failed.append(log)
                    print(f"[failed]  {run.label}, seed {seed}: exit {process.returncode} {took}", flush=True)
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


# ----------------------------------------------------------------------------------------
# Statistics over seeds: mean, standard deviation, 95 % confidence intervals (Student's t)
# ----------------------------------------------------------------------------------------

# The two-sided 95 % quantile of Student's t, t(0.975; df), for df = 1..30 (any statistics table; test_all.py
# checks df 1 and 2 against their closed forms). With 3 seeds (df 2) the interval is mean +- 4.30 sd / sqrt(3)
# = mean +- 2.48 sd: wide. Past df 30 the df-30 value is used, which errs on the wide side.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T_975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@dataclass
class Summary:
    n: int
    mean: float
    sd: float = None  # sample standard deviation (n - 1); None for one value
    low: float = None  # the 95 % confidence interval of the mean; None for one value
    high: float = None


def summarise(values):
    """Mean, standard deviation and 95 % confidence interval of the mean of a few numbers; None for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Summary(1, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T_975[min(n - 1, len(T_975)) - 1] * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired(a, b):
    """The summary of a - b over the seeds both have (dicts seed -> value): a paired comparison, since the two
    runs of one seed share the data order and the initialisation."""
    return summarise([a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None])


def show_mean(summary, sign=False):
    """'34.80 +- 0.41' (mean and standard deviation), '34.80' for one seed, '-' for none."""
    if summary is None:
        return "-"
    mean = f"{summary.mean:+.2f}" if sign else f"{summary.mean:.2f}"
    return mean if summary.sd is None else f"{mean} ± {summary.sd:.2f}"


def show_interval(summary, sign=False):
    if summary is None or summary.low is None:
        return "-"
    f = "{:+.2f}" if sign else "{:.2f}"
    return f"[{f.format(summary.low)}, {f.format(summary.high)}]"


def show_both(difference):
    """A signed difference with its interval: '+1.20 ± 0.30 [+0.45, +1.95]'; '-' for none."""
    if difference is None:
        return "-"
    interval = show_interval(difference, sign=True)
    return show_mean(difference, sign=True) + ("" if interval == "-" else f" {interval}")


def verdict(difference, kind):
    """confirmed / not seen at this scale / refuted, from the 95 % interval of a paired difference (a - b).
    higher / lower: confirmed when the interval excludes 0 on the paper's side, refuted when it excludes 0 on
    the other. close: confirmed when it lies within +-CLOSE, refuted when it lies wholly outside."""
    if difference is None or difference.low is None:
        return "not yet measured (fewer than 2 seeds)"
    low, high = difference.low, difference.high
    if kind == "close":
        if -CLOSE <= low and high <= CLOSE:
            return "confirmed"
        return "refuted" if low > CLOSE or high < -CLOSE else "not seen at this scale"
    if kind == "lower":
        low, high = -high, -low
    if low > 0:
        return "confirmed"
    return "refuted" if high < 0 else "not seen at this scale"


# ----------------------------------------------------------------------------------------
# Tables, from the kept results (--results), or the run directories of unfinished runs
# ----------------------------------------------------------------------------------------


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def row_results(args, name, experiment, run):
    """seed -> (final metrics, history, provenance, directory) for each seed of --seeds that has results: the
    kept ones, else those of a run directory (an unfinished run shows there)."""
    found = {}
    for seed in args.seeds:
        directory = results_dir(args, name, experiment, run, seed)
        if not (directory / "args.json").exists() and not (directory / "linear_eval.json").exists():
            directory = run_dir(args, experiment, run, seed)
        metrics = final_metrics(directory)
        if metrics is None:
            continue
        provenance = directory / "provenance.json"
        if provenance.exists():
            where = json.loads(provenance.read_text())
        else:  # a run still going (or stopped): what its args.json says
            trained = json.loads((directory / "args.json").read_text()) if (directory / "args.json").exists() else {}
            where = {"git_revision": trained.get("git_revision", "?"), "device": trained.get("device_name", "?")}
        found[seed] = (metrics, read_metrics(directory), where, directory)
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


def provenance_of(found):
    """The code revisions and devices of a row's runs, e.g. 'git 44f80b3, cpu (2 threads)'; several if they differ."""
    revisions = sorted({p.get("git_revision", "?") for _, _, p, _ in found.values()})
    devices = sorted({p.get("device", "?") for _, _, p, _ in found.values()})
    if not found:
        return "-"
    mixed = " (MIXED DEVICES: do not compare)" if len(devices) > 1 else ""
    return f"git {', '.join(revisions)}; {', '.join(devices)}{mixed}"


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


def write_table(args, name, experiment, runs):
    """<experiment>.md: the paper's numbers next to ours, with how ours were measured."""
    rows = [
        f"# {experiment.title}",
        "",
        scale_line(args, experiment) + " The paper: 200 epochs, batch 256.",
        "Ours: online linear probe top-1, weighted kNN (k=200) top-1 and 1-NN top-1 at the last epoch "
        "(the random encoder: offline linear probe), as mean ± standard deviation over the seeds.",
        "",
        "| row | paper top-1 | paper KNN-1 | ours: linear top-1 | kNN top-1 | 1-NN top-1 | seeds | epoch | code, device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        found = row_results(args, name, experiment, run)
        paper = [run.paper.get("top1"), run.paper.get("knn1")]
        ours = [show_mean(summarise(values(found, key).values())) for key in ("linear_top1", "knn_top1", "knn1_top1")]
        epochs = sorted({m.get("epoch", "-") for m, *_ in found.values()})
        rows.append(
            f"| {run.label} | {' | '.join(fmt(v) for v in paper)} | {' | '.join(ours)} | {len(found)} | "
            f"{', '.join(map(str, epochs)) or '-'} | {provenance_of(found)} |"
        )
    save_table(args, experiment, name, rows)


def write_laptop_table(args, name, experiment, runs):
    """laptop.md (and search.md): per row, kNN top-1 over the seeds with its 95 % interval, the paired
    difference to the random backbone and to the row it is compared with, the collapse monitor, the time."""
    random_run = next((r for r in experiment.runs if r.script == "linear_eval.py"), None)
    random = values(row_results(args, name, experiment, random_run), "knn_top1") if random_run else {}
    by_label = {run.label: run for run in experiment.runs}
    rows = [
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
        "| spread | rank | final loss | kNN rise, last two evaluations [95 % CI] | training minutes | code, device "
        "| paper top-1 (CIFAR-100, 200 ep.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        found = row_results(args, name, experiment, run)
        knn = values(found, "knn_top1")
        unfinished = sorted(s for s, (m, history, *_) in found.items() if history and m.get("epoch", 0) < args.epochs)
        label = run.label + (f" (unfinished: seed {', '.join(map(str, unfinished))})" if unfinished else "")
        above = paired(knn, random) if run is not random_run else None
        against = by_label.get(run.compare)
        difference = paired(knn, values(row_results(args, name, experiment, against), "knn_top1")) if against else None
        minutes = summarise(
            [sum(h["epoch_seconds"] for h in history) / 60 for _, history, *_ in found.values() if history]
        )
        mean_of = lambda key: show_mean(summarise(values(found, key).values()))
        rise, spans = knn_rise(found)
        epochs = ", ".join(f"epoch {a} to {b}" for a, b in sorted(spans))
        rise_cell = "-" if not rise else f"{show_both(summarise(rise.values()))} ({epochs})"
        rows.append(
            f"| {label} | {len(found)} | {show_mean(summarise(knn.values()))} | "
            f"{show_interval(summarise(knn.values()))} | {show_both(above)} | "
            f"{run.compare or '-'} | {show_both(difference)} | "
            f"{mean_of('linear_top1')} | {mean_of('output_spread')} | {mean_of('feature_rank')} | {mean_of('loss')} | "
            f"{rise_cell} | "
            f"{'-' if minutes is None else f'{minutes.mean:.1f}'} | {provenance_of(found)} | "
            f"{fmt(run.paper.get('top1'))} |"
        )
    save_table(args, experiment, name, rows)


def gradient_ratios(found):
    """Fig. 5, per seed: the mean over steps of the l-inf gradient norm at the projector's output over that at
    block4's, and block4's over block1's (grad_norms.jsonl of a --log-grad-norms run)."""
    ratios = {"projector / block4": {}, "block4 / block1": {}}
    for seed, (*_, directory) in found.items():
        path = directory / "grad_norms.jsonl"
        if not path.exists():
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        mean = {stage: sum(line[stage] for line in lines) / len(lines) for stage in ("block1", "block4", "projector")}
        ratios["projector / block4"][seed] = mean["projector"] / mean["block4"]
        ratios["block4 / block1"][seed] = mean["block4"] / mean["block1"]
    return ratios


def write_claims(args, experiment):
    """docs/claims.md: each claim of the paper testable at the laptop scale, our paired difference with its
    95 % interval, and a verdict."""
    by_label = {run.label: run for run in experiment.runs}
    results = {label: row_results(args, "laptop", experiment, run) for label, run in by_label.items()}
    rows = [
        "# The paper's claims at the laptop scale",
        "",
        "Written by `python tools/reproduce.py claims --table` from the laptop experiment's kept results "
        f"(docs/results/laptop/). {scale_line(args, experiment)} Each claim compares two rows in kNN top-1 "
        "(weighted, k = 200, on the test split), paired by seed: the difference a - b per seed, its mean ± "
        "standard deviation and its 95 % confidence interval (Student's t; with 3 seeds, mean ± 2.48 sd). "
        "Verdict: **confirmed** when the interval excludes 0 on the paper's side (for 'close': lies within "
        f"±{CLOSE:g} points), **refuted** when it excludes 0 on the other side (for 'close': lies wholly outside "
        "±3), **not seen at this scale** otherwise. The paper's numbers come from 200 epochs of a full-width "
        "ResNet-18 on CIFAR-100; ours from 10 epochs of a quarter-width one on 10,000 CIFAR-10 images.",
        "",
        "| claim | paper | a | b | paper's direction | seeds | a - b | 95 % CI | verdict | code, device |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for claim, paper, a, b, kind in CLAIMS:
        found = results[a]
        if kind == "gradients":
            for which, ratio in gradient_ratios(found).items():
                summary = summarise(ratio.values())
                # confirmed when the ratio's interval lies above 1, refuted when below 1
                judged = verdict(
                    None
                    if summary is None
                    else Summary(
                        summary.n,
                        summary.mean - 1,
                        summary.sd,
                        None if summary.low is None else summary.low - 1,
                        None if summary.high is None else summary.high - 1,
                    ),
                    "higher",
                )
                rows.append(
                    f"| {claim} | {paper} | {a} | - | {which} > 1 | {0 if summary is None else summary.n} | "
                    f"ratio {show_mean(summary)} | {show_interval(summary)} | {judged} | {provenance_of(found)} |"
                )
            continue
        if kind == "cost":
            forwards = summarise(values(found, "backbone_forwards_per_image").values())
            base = results[b]
            base_forwards = summarise(values(base, "backbone_forwards_per_image").values())
            seconds = lambda rows_found: {
                seed: sum(h["epoch_seconds"] for h in history) for seed, (_, history, *_) in rows_found.items()
            }
            time_ratio = summarise([seconds(found)[s] / t for s, t in seconds(base).items() if s in seconds(found)])
            halved = forwards is not None and base_forwards is not None and forwards.mean <= base_forwards.mean / 2
            faster = time_ratio is not None and time_ratio.high is not None and time_ratio.high < 1
            judged = (
                "not yet measured"
                if time_ratio is None
                else ("confirmed" if halved and faster else ("refuted" if not halved else "not seen at this scale"))
            )
            rows.append(
                f"| {claim} | {paper} | {a} | {b} | fewer forwards, less time | {len(found)} | forwards "
                f"{show_mean(forwards)} against {show_mean(base_forwards)}; training time ratio "
                f"{show_mean(time_ratio)} | {show_interval(time_ratio)} | {judged} | {provenance_of(found)} |"
            )
            continue
        difference = paired(values(found, "knn_top1"), values(results[b], "knn_top1"))
        direction = {"higher": "a > b", "lower": "a < b", "close": f"|a - b| ≤ {CLOSE:g}"}[kind]
        rows.append(
            f"| {claim} | {paper} | {a} | {b} | {direction} | {0 if difference is None else difference.n} | "
            f"{show_mean(difference, sign=True)} | {show_interval(difference, sign=True)} | "
            f"{verdict(difference, kind)} | {provenance_of(seeds_of_both(found, results[b]))} |"
        )
    path = Path(args.claims_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"\nwrote {path}")


def save_table(args, experiment, name, rows):
    """Write <name>.md beside the experiment's runs and print it."""
    path = Path(args.out_root) / scale_name(args, experiment) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"\nwrote {path}")


def claim_rows(experiment):
    """The laptop rows the claims table reads."""
    labels = {label for _, _, a, b, _ in CLAIMS for label in (a, b) if label}
    return [run for run in experiment.runs if run.label in labels]


def main(argv=None):
    args = parse_args(argv)
    given_epochs = args.epochs
    if args.list:
        for name, experiment in EXPERIMENTS.items():
            args.epochs = given_epochs or experiment.epochs
            print(f"{name}: {experiment.title} (paper dataset: {experiment.dataset})")
            for run in experiment.runs:
                print(f"    {show(command(args, experiment, run, args.seeds[0]))}")
        print("claims: the paper's claims at the laptop scale (docs/claims.md), from the laptop runs they need")
        return 0
    name = "laptop" if args.experiment == "claims" else args.experiment
    experiment = EXPERIMENTS[name]
    args.epochs = given_epochs or experiment.epochs
    wanted = [w.strip().lower() for w in (args.only or "").split(",") if w.strip()]
    runs = claim_rows(experiment) if args.experiment == "claims" else experiment.runs
    runs = [r for r in runs if not wanted or any(w in r.label.lower() for w in wanted)]
    if not runs:
        print(f"error: no row of {args.experiment} has '{args.only}' in its label; see --list", file=sys.stderr)
        return 2
    jobs = [(run, seed) for seed in args.seeds for run in runs]  # seed by seed: a first seed of every row first
    failed = []
    if args.table:
        complete = [True]
    elif args.jobs == 1:
        complete = [run_one(args, name, experiment, run, seed) for run, seed in jobs]
    else:
        try:
            failed = run_many(args, name, experiment, jobs)
        except KeyboardInterrupt:  # Ctrl-C: run_many has stopped the runs
            return 130
        complete = [not failed]
    if args.experiment == "claims":
        write_claims(args, experiment)
    elif name in ("laptop", "search"):
        write_laptop_table(args, name, experiment, runs)
    else:
        write_table(args, name, experiment, runs)
    if failed:
        print(
            f"\n{len(failed)} of {len(jobs)} runs failed; fix the cause and run this command again to resume "
            f"them. Their logs:"
        )
        print("\n".join(f"    {log}" for log in failed))
    return 0 if all(complete) else 1


if __name__ == "__main__":
    sys.exit(main())
