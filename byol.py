"""BYOL with a momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". BYOL (Grill et al. 2020) is its running example: Eq. (1)-(6) and
Algorithm 1 are written for it, and this file follows them line by line (see `main`).

    python byol.py                                    # Table 1 "Baseline": EMA on every stage
    python byol.py --ema-stages projector             # Table 3 / Algorithm 1: EMA projector only
    python byol.py --ema-stages none                  # Table 1 "Remove" (beta = 0, weights shared)
    python byol.py --ema-stages block4,projector      # Fig. 4: any comma list of stages

Reproduces (CIFAR-100, ResNet-18, 200 epochs, online linear top-1): Table 1 (62.01 / 43.48),
Table 3 (62.17 backbone / 59.61 projector), Fig. 4, Table 7 (--ema-stages projector --beta 1).

Recipe: solo-learn's CIFAR BYOL, which the paper ran (its Appendix A): projector
512-4096-256 and predictor 256-4096-256 with BN, LARS lr 1.0, wd 1e-5, eta 0.02,
10 warm-up epochs then cosine, batch 256; beta 0.99 rising to 1.0 on a cosine schedule
(solo-learn's default; --beta-schedule constant keeps it at --beta).

Deviations from the paper's runs, this method's own (those common to every method file --
CIFAR stem, batched augmentation, schedules, BatchNorm in shared stages -- are listed in
docs/deviations.md):
  * loss: 2 - 2cos per direction, averaged over the two directions (solo-learn's form when the
    paper ran it); Algorithm 1 writes D = -cos: the same minimiser, twice the gradient.
Expected result: see README.md ("Measured results") -- only numbers we measured are there.
"""

import argparse

import torch.nn as nn
import torch.nn.functional as F

import common


# --preset laptop (common.LAPTOP adds the scale): LARS lr 0.3 in place of 1.0. With a warm-up of 39
# steps in place of 1,950, lr 1.0 did not learn in 10 epochs (docs/small-scale.md).
LAPTOP = {"lr": 0.3}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="BYOL with named-stage EMA", formatter_class=common.HelpFormatter)
    common.add_common_args(
        parser, lr=1.0, weight_decay=1e-5, ema_stages="all", beta=0.99, beta_schedule="cosine", beta_final=1.0
    )
    parser.add_argument(
        "--proj-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=4096,
        help="hidden width of the projector g (Table 2 uses 2)",
    )
    parser.add_argument(
        "--proj-dim", type=common.positive(int, at_most=2**16), default=256, help="output width of g and h"
    )
    parser.add_argument(
        "--bn-proj", action="store_true", help="BN2 of Table C.8: a BatchNorm on the projector's output"
    )
    parser.add_argument(
        "--pred-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=4096,
        help="hidden width of the predictor h",
    )
    parser.add_argument("--lars-eta", type=common.positive(float), default=0.02, help="LARS trust coefficient")
    return common.parse_method_args(parser, argv, "byol", laptop=LAPTOP)


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
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4)
    # the projector g (--bn-proj: Table C.8's BN2 on its output)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    predictor = common.mlp(args.proj_dim, args.pred_hidden_dim, args.proj_dim)  # h
    ema_stages = common.parse_ema_stages(args.ema_stages)  # e.g. 'projector' -> ['projector']
    target = common.NamedStageEMA(online, ema_stages)  # EMA copies of the listed stages, the online rest
    probe = nn.Linear(backbone.feature_dim, num_classes)  # online linear probe on sg(f)
    optimizer = common.LARS(
        common.param_groups([online, predictor], args.weight_decay)
        + [{"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0, "lars": False}],
        lr=args.lr,
        weight_decay=args.weight_decay,
        eta=args.lars_eta,
    )
    return {"online": online, "predictor": predictor, "target": target, "probe": probe}, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's asymmetric CIFAR recipe -- the second view is solarised with p = 0.2.
    view_1 = common.ViewRecipe(size=data.image_size)
    view_2 = common.ViewRecipe(size=data.image_size, solarize_p=0.2)

    models, optimizer = build(args, data.num_classes)
    online, predictor, target, probe = models["online"], models["predictor"], models["target"], models["probe"]
    common.to_device(models.values(), device)

    # common.Run does the rest: resume, each epoch's order, the lr and beta schedules, checkpoints, logging.
    run = common.Run(args, data, [view_1, view_2], models, optimizer)
    online, predictor, probe = run.data_parallel(online, predictor, probe)  # under torchrun: DDP, averaged gradients
    for (x_1, x_2), y in run.batches():  # two random views of each image of the batch, and its labels
        # ---- Algorithm 1 (Appendix B), for any set of EMA stages ----
        with common.autocast(device):
            f_1, z_1, inputs_1 = online(x_1)  # f = b(x): Eq. (1); z = g(f): Eq. (3); inputs: each stage's input
            f_2, z_2, inputs_2 = online(x_2)
            # momentum projections: Eq. (2)-(3), or Eq. (7) if only g has EMA
            z_1m, z_2m = target(inputs_1), target(inputs_2)
            p_1, p_2 = predictor(z_1), predictor(z_2)  # Eq. (4)
            loss = byol_loss(p_1, p_2, z_1m, z_2m)  # Eq. (5)
            loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()  # update(f, g, h) and the probe
        target.update(run.beta)  # Eq. (6): xi <- beta * xi + (1 - beta) * theta, listed stages only
        # ---------------------------------------------------------------
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
