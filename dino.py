"""DINO with a momentum (EMA) teacher on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". DINO (Caron et al. 2021) distils a momentum teacher into a student:
cross-entropy between the teacher's centred, sharpened distribution over prototypes and the
student's. Its head (MLP + weight-normalised prototype layer) is the `projector` stage.

    python dino.py                                    # Table 1 "Baseline": EMA on every stage (58.12)
    python dino.py --ema-stages none                  # Table 1 "Remove": collapses (1.08)
    python dino.py --ema-stages backbone              # Table 3: 8.11
    python dino.py --ema-stages projector             # Table 3: 58.14

Only the two global views go to the teacher; optional local crops (--num-local-crops, default 0
as in solo-learn's CIFAR runs) go to the student only.

The head has no BatchNorm, as in solo-learn's scripts of the paper's time; --head-bn puts it back
(its CIFAR runs of July 2021, and --preset laptop, whose kept runs were made with it).

Deviations from the paper's runs, this method's own (those common to every method file are in
docs/deviations.md): local crops, when asked for, are --local-crop-size pixels (16) from scale
(0.05, 0.4) -- solo-learn's CIFAR runs used none, so there is no reference setting.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# DINO's recipe: every default of dino.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive, non_negative = common.positive, common.non_negative
LOCAL_CROP_SIZE = 16  # the local crops' side when --local-crop-size is not given: half a CIFAR image, ours
RECIPE = common.Recipe(
    "dino",
    "DINO with named-stage EMA",
    # solo-learn's CIFAR DINO as its scripts ran at the paper's time (Appendix A): LARS lr 0.3, wd 1e-6, eta 0.02.
    # Beta 0.99, the paper's value for every method (solo-learn starts DINO at 0.9995), rising to 1.0 by cosine.
    lr=0.3,
    weight_decay=1e-6,
    probe_lr=0.1,
    ema_stages="all",
    beta=0.99,
    beta_schedule="cosine",
    beta_final=1.0,
    flags=[  # head 512-2048-2048-256 with GELU, l2-normalised, then 4096 prototypes of weight norm 1
        common.Flag("--proj-hidden-dim", 2048, "hidden width of the head's MLP", positive(int, 2**16)),
        common.Flag("--bottleneck-dim", 256, "output width of the MLP, before the prototypes", positive(int, 2**16)),
        common.Flag("--num-prototypes", 4096, "K, the number of prototypes (outputs)", positive(int, 2**17)),
        # student temperature 0.1; the teacher's rises linearly from 0.04 to 0.07 over the first 50 epochs
        common.Flag("--student-temp", 0.1, "student temperature", positive(float)),
        common.Flag("--teacher-temp", 0.07, "teacher temperature after the warm-up", positive(float)),
        common.Flag("--warmup-teacher-temp", 0.04, "teacher temperature at epoch 0", positive(float)),
        common.Flag(
            "--warmup-teacher-temp-epochs", 50, "epochs of the teacher temperature's warm-up", non_negative(int)
        ),
        common.Flag(
            ("--centre-momentum", "--center-momentum"),  # the second: the spelling of DINO's own code; both work
            0.9,
            "momentum of the centre of the teacher's outputs",
            common.fraction(),
        ),
        # no BatchNorm in the head's MLP: solo-learn's --use_bn_in_head, False from 2021-09-13 on (docs/deviations.md);
        # our runs made before the flag had it (before=True: what --resume compares their checkpoints with)
        common.Flag(
            "--head-bn",
            False,
            "BatchNorm after each hidden layer of the head (solo-learn's July 2021 head; --preset laptop turns it on)",
            bool,
            before=True,
        ),
        common.Flag("--freeze-last-layer-epochs", 1, "epochs without updates to the prototypes", non_negative(int)),
        common.Flag("--num-local-crops", 0, "small crops for the student only", non_negative(int, 2**5)),
        common.Flag(
            "--local-crop-size",
            None,
            f"side of the local crops, at most the global views' (the image size); None means {LOCAL_CROP_SIZE}",
            positive(int, 2**10),
        ),
        common.Flag("--lars-eta", 0.02, "LARS trust coefficient", positive(float)),
        common.Flag(  # solo-learn's CIFAR recipe blurs neither view; its ImageNet-100 recipe: 1.0 and 0.1
            "--blur-p",
            [0.0, 0.0],
            "probability of a Gaussian blur on view 1 and on view 2",
            common.fraction(),
            options={"nargs": 2, "metavar": ("P1", "P2")},
        ),
    ],
    # --preset laptop: the teacher at 0.04 throughout, the warm-up's own start (the paper: 0.04 rising to 0.07 over
    # 50 epochs), chosen on the validation split (docs/small-scale.md): at 0.07 the loss stays at log(4,096) for
    # the whole 10-epoch run. And BatchNorm in the head: the preset's runs kept in docs/results/ were made with it, and
    # without it the loss stays at log(4,096) for all 10 epochs, and for 30 (one seed on the validation split; the
    # head without BatchNorm maps every image to nearly one direction at the start: docs/small-scale.md).
    laptop={"teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0, "head_bn": True},
)


def parse_args(argv=None):
    args = common.parse_args(RECIPE, argv)
    if not args.num_local_crops and args.local_crop_size is not None:
        raise common.ConfigError(
            f"--local-crop-size {args.local_crop_size} has no effect without local crops: "
            "add --num-local-crops N (N small crops per image, for the student only)"
        )
    if args.local_crop_size is None:
        args.local_crop_size = LOCAL_CROP_SIZE
    return args


# ---------------------------------------------------------------------------------------
# The method: the DINO head, centring, and the distillation loss
# ---------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """The projector stage g: MLP (GELU; BN with --head-bn) -> l2-normalise -> weight-normalised prototypes.

    Weight normalisation with its norm g frozen at 1 (DINO's norm_last_layer) leaves each
    prototype's direction to learn and fixes its length: the layer is x -> x V^T / |V_rows|.
    """

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, num_prototypes, bn=False):
        super().__init__()
        self.mlp = common.mlp(in_dim, hidden_dim, bottleneck_dim, num_layers=3, bn=bn, gelu=True)
        for m in self.mlp:  # DINO's initialisation
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))  # K x d, V
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # torch's default Linear init

    def forward(self, f):
        x = F.normalize(self.mlp(f), dim=1)  # N x d
        return x @ F.normalize(self.prototypes, dim=1).T  # N x K logits


class Centre(nn.Module):
    """The running mean c of the teacher's outputs, subtracted before its softmax (avoids collapse
    to one prototype); c <- m c + (1 - m) mean(teacher logits), after each step."""

    def __init__(self, num_prototypes, momentum):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(1, num_prototypes))  # 1 x K

    @torch.no_grad()
    def update(self, teacher_logits):
        batch_mean = torch.cat(teacher_logits).float().mean(dim=0, keepdim=True)  # 1 x K, over both global views
        batch_mean = common.mean_over_processes(batch_mean)  # under torchrun: the mean of the global batch
        self.value.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)


def dino_loss(student_logits, teacher_logits, centre, student_temp, teacher_temp):
    """H(P_t^a, P_s^b) averaged over pairs of views a != b; a runs over the teacher's global
    views, b over all of the student's. P_t = softmax((g_m(x) - c) / T_t), P_s = softmax(g(x) / T_s)."""
    teacher = [F.softmax((t.detach().float() - centre) / teacher_temp, dim=1) for t in teacher_logits]  # N x K each
    student = [F.log_softmax(s.float() / student_temp, dim=1) for s in student_logits]  # N x K each
    losses = [-(t * s).sum(dim=1).mean() for a, t in enumerate(teacher) for b, s in enumerate(student) if a != b]
    return sum(losses) / len(losses)


def teacher_temperature(epoch, args):
    """Linear warm-up from --warmup-teacher-temp at epoch 0 to --teacher-temp at the warm-up's last epoch W - 1
    (DINO's and solo-learn's np.linspace(warm-up temperature, temperature, W)), then constant."""
    warmup_epochs = args.warmup_teacher_temp_epochs
    if epoch >= warmup_epochs:
        return args.teacher_temp
    fraction = epoch / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0  # 0 at epoch 0, 1 at epoch W - 1
    return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * fraction


def build(args, num_classes):
    """The online (student) encoder E = g o b with the DINO head as g, the target (teacher) with EMA stages, the
    centre, the probe; LARS."""
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4, stem=args.stem)
    head = DINOHead(  # g
        backbone.feature_dim, args.proj_hidden_dim, args.bottleneck_dim, args.num_prototypes, bn=args.head_bn
    )
    online = common.Encoder(backbone, head)
    target = common.NamedStageEMA(online, args.stages)
    centre = Centre(args.num_prototypes, args.centre_momentum)  # part of the checkpoint
    probe = nn.Linear(backbone.feature_dim, num_classes)
    optimizer = common.LARS(
        common.param_groups([online], args.weight_decay)
        + [{"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0, "lars": False}],
        lr=args.lr,
        weight_decay=args.weight_decay,
        eta=args.lars_eta,
    )
    return online, target, centre, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)
    if args.num_local_crops and args.local_crop_size > data.image_size:
        raise common.ConfigError(
            f"--local-crop-size {args.local_crop_size} is larger than the global views ({data.image_size} pixels): "
            f"a local crop is a small part of the image; choose at most {data.image_size}"
        )

    # Views: solo-learn's asymmetric CIFAR recipe (the second view is solarised), and optional local crops.
    view_1 = common.ViewRecipe(size=data.image_size, blur_p=args.blur_p[0])
    view_2 = common.ViewRecipe(size=data.image_size, blur_p=args.blur_p[1], solarize_p=0.2)
    local_view = common.ViewRecipe(size=args.local_crop_size, crop_scale=(0.05, 0.4))
    view_recipes = [view_1, view_2] + [local_view] * args.num_local_crops

    online, target, centre, probe, optimizer = build(args, data.num_classes)
    run = common.Run(args, data, view_recipes, optimizer, online=online, target=target, probe=probe, centre=centre)
    prototypes = online.projector.prototypes  # frozen for the first epochs
    online, probe = run.data_parallel(online, probe)
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_1, x_2, *local), y in run.batches():  # two global views, the local crops, the labels
        common.set_learning_rate(optimizer, lr_factors[step])
        epoch = step // run.steps_per_epoch  # the teacher's temperature and the prototypes' freeze go by epoch
        with common.autocast(device):
            f_1, s_1, activations_1 = online(x_1)  # f = b(x); student logits s = g(f)
            f_2, s_2, activations_2 = online(x_2)
            s_local = []
            for x_local in local:  # local crops: the student's only
                _, s, _ = online(x_local)
                s_local.append(s)
            t_1, t_2 = target(activations_1), target(activations_2)  # teacher logits, global views only
        loss = dino_loss(
            [s_1, s_2, *s_local], [t_1, t_2], centre.value, args.student_temp, teacher_temperature(epoch, args)
        )
        loss_probe = common.probe_loss(probe, (f_1, f_2), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        if epoch < args.freeze_last_layer_epochs:  # DINO keeps the prototypes fixed at first
            prototypes.grad = None
        optimizer.step()
        target.update(betas[step])
        centre.update([t_1, t_2])
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
