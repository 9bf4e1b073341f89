"""SimSiam with an optional momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". SimSiam (Chen & He 2021) has no momentum encoder: its target is the
online network under stop-gradient. The paper adds one (Table 1, "SimSiam + EMA").

    python simsiam.py                                 # Table 1 "Baseline": no EMA (51.41)
    python simsiam.py --ema-stages all --beta 0.99    # Table 1 "Add": EMA on every stage (53.66)
    python simsiam.py --ema-stages projector          # EMA on the projector only

Recipe: solo-learn's CIFAR SimSiam (the paper's Appendix A): projector 512-2048-2048-2048 with
BN after every layer (the last without affine), predictor 2048-512-2048, SGD lr 0.5, wd 1e-5
on all parameters, momentum 0.9; the predictor keeps lr 0.5 throughout (no warm-up, no
cosine); zero-initialised residual branches, as in solo-learn's scripts of the paper's time.
With EMA added, beta is constant at --beta: the paper states 0.99 and solo-learn has no
schedule for SimSiam.

Deviations from the paper's runs, this method's own (those common to every method file are
listed in docs/deviations.md):
  * the projector's last linear layer has no bias; solo-learn's has one but freezes it, and a
    bias in front of BatchNorm is cancelled anyway.
Expected result: see README.md ("Measured results") -- only numbers we measured are there.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --preset laptop (common.LAPTOP adds the scale): SimSiam's own CIFAR-10 values (Chen & He 2021,
# Appendix: SGD, lr 0.03 x batch / 256 at batch 512, i.e. 0.06, weight decay 5e-4), and no blur, as in
# MoCo's CIFAR-10 demo: at 32 pixels a blur of sigma up to 2 smears most of an image away.
LAPTOP = {"lr": 0.06, "weight_decay": 5e-4, "blur_p": 0.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SimSiam with named-stage EMA", formatter_class=common.HelpFormatter)
    common.add_common_args(
        parser, lr=0.5, weight_decay=1e-5, ema_stages="none", beta=0.99, beta_schedule="constant", beta_final=1.0
    )
    parser.add_argument(
        "--proj-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=2048,
        help="hidden width of the projector g",
    )
    parser.add_argument(
        "--proj-dim", type=common.positive(int, at_most=2**16), default=2048, help="output width of g and h"
    )
    parser.add_argument(
        "--pred-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=512,
        help="hidden (bottleneck) width of the predictor h",
    )
    parser.add_argument(
        "--blur-p", type=common.fraction(), default=0.5, help="probability of a Gaussian blur on each view"
    )
    return common.parse_method_args(parser, argv, "simsiam", laptop=LAPTOP)


# ---------------------------------------------------------------------------------------
# The method: SimSiam's loss
# ---------------------------------------------------------------------------------------


def D(p, z):
    """Negative cosine similarity -cos(p, sg(z)), batch mean (SimSiam's D)."""
    p = F.normalize(p.float(), dim=1)  # N x d
    z = F.normalize(z.detach().float(), dim=1)  # N x d, stop-gradient
    return -(p * z).sum(dim=1).mean()


def simsiam_loss(p_1, p_2, z_1m, z_2m):
    """L = D(p_1, z_2)/2 + D(p_2, z_1)/2; z_m is the target's projection (the online one without EMA)."""
    return D(p_1, z_2m) / 2 + D(p_2, z_1m) / 2


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's symmetric_weak recipe, the same for both views.
    view_recipes = [common.ViewRecipe(size=data.image_size, saturation=0.4, blur_p=args.blur_p)] * 2

    # Model: online encoder E = g o b, predictor h (online only), target with EMA stages (none by default).
    backbone = common.ResNetCIFAR(args.arch, width=args.width, zero_init_residual=True, bn_block4=args.bn_block4)
    # the projector g
    projector = common.mlp(
        backbone.feature_dim,
        args.proj_hidden_dim,
        args.proj_dim,
        num_layers=3,
        bias=False,
        last_bn=True,
        last_bn_affine=False,
    )
    online = common.Encoder(backbone, projector)
    predictor = common.mlp(args.proj_dim, args.pred_hidden_dim, args.proj_dim, bias=False)  # h
    ema_stages = common.parse_ema_stages(args.ema_stages)  # e.g. 'projector' -> ['projector']
    target = common.NamedStageEMA(online, ema_stages)  # EMA copies of the listed stages, the online rest
    probe = nn.Linear(backbone.feature_dim, data.num_classes)  # online linear probe on sg(f)
    models = {"online": online, "predictor": predictor, "target": target, "probe": probe}
    common.to_device(models.values(), device)
    optimizer = torch.optim.SGD(
        [
            {"params": online.parameters()},
            {"params": predictor.parameters(), "fixed_lr": True},  # SimSiam's fixed predictor lr
            {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0},
        ],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )

    # common.Run does the rest: resume, each epoch's order, the lr and beta schedules, checkpoints, logging.
    run = common.Run(args, data, view_recipes, models, optimizer)
    online, predictor, probe = run.data_parallel(online, predictor, probe)  # under torchrun: DDP, averaged gradients
    for (x_1, x_2), y in run.batches():  # two random views of each image of the batch, and its labels
        with common.autocast(device):
            f_1, z_1, inputs_1 = online(x_1)  # f = b(x), z = g(f); inputs: each stage's input
            f_2, z_2, inputs_2 = online(x_2)
            z_1m, z_2m = target(inputs_1), target(inputs_2)  # sg(z) without EMA; momentum projections with it
            p_1, p_2 = predictor(z_1), predictor(z_2)
            loss = simsiam_loss(p_1, p_2, z_1m, z_2m)
            loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(run.beta)  # Eq. (6) on the listed stages (nothing to do with --ema-stages none)
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
