"""BYOL with a momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". BYOL (Grill et al. 2020) is its running example: Eq. (1)-(6) and
Algorithm 1 are written for it, and this file follows them line by line (see `main`).

    python byol.py                                    # Table 1 "Baseline": EMA on every stage
    python byol.py --ema-stages projector             # Table 3 / Algorithm 1: EMA projector only
    python byol.py --ema-stages none                  # Table 1 "Remove" (beta = 0, weights shared)
    python byol.py --ema-stages block4,projector      # Fig. 4: any comma list of stages

The paper's numbers for these rows (CIFAR-100, ResNet-18, 200 epochs, online linear top-1): Table 1
62.01 / 43.48, Table 3 62.17 backbone / 59.61 projector; Fig. 4; Table 7 (--ema-stages projector
--beta 1). What this code measured is in README.md ("Measured results"), with how and where.

Deviations from the paper's runs, this method's own (those common to every method file -- CIFAR stem,
batched augmentation, schedules, BatchNorm in shared stages -- are listed in docs/deviations.md):
  * loss: 2 - 2cos per direction, averaged over the two directions as Eq. 5 averages them (solo-learn's
    code of the paper's time sums them: twice our gradient); Eq. 5 and Algorithm 1 write D = -cos: the
    same minimiser, half our gradient.
"""

import torch  # (unused by the reference: there for an answer to the course's exercises that needs it)
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# BYOL's recipe: every default of byol.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive = common.positive
RECIPE = common.Recipe(
    "byol",
    "BYOL with named-stage EMA",
    # solo-learn's CIFAR BYOL, which the paper ran (its Appendix A): LARS lr 1.0, wd 1e-5, eta 0.02, 10 warm-up
    # epochs then cosine, batch 256; beta 0.99 (the paper's, Table 1) rising to 1.0 by cosine (solo-learn's)
    lr=1.0,
    weight_decay=1e-5,
    probe_lr=0.1,
    ema_stages="all",
    beta=0.99,
    beta_schedule="cosine",
    beta_final=1.0,
    flags=[  # projector 512-4096-256 and predictor 256-4096-256, with BN
        common.Flag(
            "--proj-hidden-dim", 4096, "hidden width of the projector g (Table 2 uses 2)", positive(int, 2**16)
        ),
        common.Flag("--proj-dim", 256, "output width of g and h", positive(int, 2**16)),
        common.Flag("--bn-proj", False, "BN2 of Table C.8: a BatchNorm on the projector's output"),
        common.Flag("--pred-hidden-dim", 4096, "hidden width of the predictor h", positive(int, 2**16)),
        common.Flag("--lars-eta", 0.02, "LARS trust coefficient", positive(float)),
        common.Flag(  # solo-learn's CIFAR recipe blurs neither view; its ImageNet-100 recipe: 1.0 and 0.1
            "--blur-p",
            [0.0, 0.0],
            "probability of a Gaussian blur on view 1 and on view 2",
            common.fraction(),
            options={"nargs": 2, "metavar": ("P1", "P2")},
        ),
    ],
    # --preset laptop (the scale: engine/cli.py's LAPTOP_SCALE): LARS lr 0.3 in place of 1.0. With a warm-up of 39
    # steps in place of 1,950, lr 1.0 did not learn in 10 epochs (docs/small-scale.md).
    laptop={"lr": 0.3},
)


def parse_args(argv=None):
    return common.parse_args(RECIPE, argv)


# ---------------------------------------------------------------------------------------
# The method: BYOL's loss, Eq. (5)
# ---------------------------------------------------------------------------------------


def D(p, z):
    """BYOL's distance 2 - 2 cos(p, sg(z)), batch mean. Algorithm 1's D is -cos: same minimiser."""
    p = F.normalize(p.float(), dim=1)  # N x d, l2-normalised prediction
    z = F.normalize(z.detach().float(), dim=1)  # N x d, stop-gradient: z is a target, not trained through
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def byol_loss(p_1, p_2, z_1m, z_2m):
    """Eq. (5), symmetric: each view's prediction regresses the other view's momentum projection."""
    return D(p_1, z_2m) / 2 + D(p_2, z_1m) / 2


def build(args, num_classes):
    """The networks and their optimiser (tools/bench.py times a step of these): the online encoder E = g o b,
    the predictor h (online only, Eq. 4), the target with EMA stages, the online probe; LARS."""
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4, stem=args.stem)
    # the projector g (--bn-proj: Table C.8's BN2 on its output)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    predictor = common.mlp(args.proj_dim, args.pred_hidden_dim, args.proj_dim)  # h
    target = common.NamedStageEMA(online, args.stages)  # EMA copies of the listed stages, the online rest
    probe = nn.Linear(backbone.feature_dim, num_classes)  # the online linear probe, on sg(f)
    optimizer = common.LARS(
        common.param_groups([online, predictor], args.weight_decay)
        + [{"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0, "lars": False}],
        lr=args.lr,
        weight_decay=args.weight_decay,
        eta=args.lars_eta,
    )
    return online, predictor, target, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's asymmetric CIFAR recipe -- the second view is solarised with p = 0.2.
    view_1 = common.ViewRecipe(size=data.image_size, blur_p=args.blur_p[0])
    view_2 = common.ViewRecipe(size=data.image_size, blur_p=args.blur_p[1], solarize_p=0.2)

    online, predictor, target, probe, optimizer = build(args, data.num_classes)
    # common.Run does the rest: resume, each epoch's image order, checkpoints, evaluation and logs.
    run = common.Run(
        args, data, [view_1, view_2], optimizer, online=online, predictor=predictor, target=target, probe=probe
    )
    online, predictor, probe = run.data_parallel(online, predictor, probe)  # under torchrun: DDP, averaged gradients
    # The schedules, one value per step of the run: the learning rate's factor (warm-up, then cosine) and
    # Eq. (6)'s beta (constant, or rising by cosine to --beta-final: common.beta_at).
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_1, x_2), y in run.batches():  # the step's index, two random views of each image, the labels
        common.set_learning_rate(optimizer, lr_factors[step])
        # ---- Algorithm 1 (Appendix B), for any set of EMA stages ----
        with common.autocast(device):  # the networks' forward passes (bf16 on a GPU); the losses after it
            f_1, z_1, activations_1 = online(x_1)  # f = b(x): Eq. (1); z = g(f): Eq. (3); each stage's input
            f_2, z_2, activations_2 = online(x_2)
            # momentum projections: Eq. (2)-(3), or Eq. (7) if only g has EMA
            z_1m, z_2m = target(activations_1), target(activations_2)
            p_1, p_2 = predictor(z_1), predictor(z_2)  # Eq. (4)
        loss = byol_loss(p_1, p_2, z_1m, z_2m)  # Eq. (5), in float32
        loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()  # update(f, g, h) and the probe
        target.update(betas[step])  # Eq. (6): xi <- beta * xi + (1 - beta) * theta, listed stages only
        # ---------------------------------------------------------------
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
