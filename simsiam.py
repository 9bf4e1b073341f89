"""SimSiam with an optional momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". SimSiam (Chen & He 2021) has no momentum encoder: its target is the
online network under stop-gradient. The paper adds one (Table 1, "SimSiam + EMA").

    python simsiam.py                                 # Table 1 "Baseline": no EMA (51.41)
    python simsiam.py --ema-stages all --beta 0.99    # Table 1 "Add": EMA on every stage (53.66)
    python simsiam.py --ema-stages projector          # EMA on the projector only

Deviations from the paper's runs, this method's own (those common to every method file are
listed in docs/deviations.md):
  * the projector's last linear layer has no bias; solo-learn's has one but freezes it, and a
    bias in front of BatchNorm is cancelled anyway.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# SimSiam's recipe: every default of simsiam.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive = common.positive
RECIPE = common.Recipe(
    "simsiam",
    "SimSiam with named-stage EMA",
    # solo-learn's CIFAR SimSiam (the paper's Appendix A): SGD lr 0.5, wd 1e-5 on all parameters, momentum 0.9;
    # the predictor keeps lr 0.5 throughout (no warm-up, no cosine). With EMA added, beta is constant: the paper
    # states 0.99 and solo-learn has no schedule for SimSiam.
    lr=0.5,
    weight_decay=1e-5,
    probe_lr=0.1,
    ema_stages="none",
    beta=0.99,
    beta_schedule="constant",
    beta_final=1.0,
    flags=[  # projector 512-2048-2048-2048 with BN after every layer (the last without affine), predictor 2048-512-2048
        common.Flag("--proj-hidden-dim", 2048, "hidden width of the projector g", positive(int, 2**16)),
        common.Flag("--proj-dim", 2048, "output width of g and h", positive(int, 2**16)),
        common.Flag("--pred-hidden-dim", 512, "hidden (bottleneck) width of the predictor h", positive(int, 2**16)),
        # no blur: solo-learn's simsiam.sh in the paper's time, 2021-08 to 2022-09 (July 2021: 0.5; docs/deviations.md)
        common.Flag("--blur-p", 0.0, "probability of a Gaussian blur on each view", common.fraction()),
    ],
    # --preset laptop: SimSiam's own CIFAR-10 values (Chen & He 2021, Appendix: SGD, lr 0.03 x batch / 256 at
    # their batch of 512, i.e. 0.06, weight decay 5e-4; kept at the preset's batch of 256, where the rule gives
    # 0.03).
    laptop={"lr": 0.06, "weight_decay": 5e-4},
)


def parse_args(argv=None):
    return common.parse_args(RECIPE, argv)


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


def build(args, num_classes):
    """The online encoder E = g o b (zero-initialised residual branches, as solo-learn's scripts of the paper's
    time), the predictor h (online only), the target with EMA stages (none by default), the probe; SGD."""
    backbone = common.ResNetCIFAR(
        args.arch, width=args.width, zero_init_residual=True, bn_block4=args.bn_block4, stem=args.stem
    )
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
    target = common.NamedStageEMA(online, args.stages)
    probe = nn.Linear(backbone.feature_dim, num_classes)
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
    return online, predictor, target, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's symmetric_weak recipe, the same for both views.
    view_recipes = [common.ViewRecipe(size=data.image_size, saturation=0.4, blur_p=args.blur_p)] * 2

    online, predictor, target, probe, optimizer = build(args, data.num_classes)
    run = common.Run(
        args, data, view_recipes, optimizer, online=online, predictor=predictor, target=target, probe=probe
    )
    online, predictor, probe = run.data_parallel(online, predictor, probe)
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_1, x_2), y in run.batches():
        common.set_learning_rate(optimizer, lr_factors[step])
        with common.autocast(device):
            f_1, z_1, activations_1 = online(x_1)  # f = b(x), z = g(f)
            f_2, z_2, activations_2 = online(x_2)
            z_1m, z_2m = target(activations_1), target(activations_2)  # sg(z) without EMA; momentum ones with it
            p_1, p_2 = predictor(z_1), predictor(z_2)
        loss = simsiam_loss(p_1, p_2, z_1m, z_2m)
        loss_probe = common.probe_loss(probe, (f_1, f_2), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(betas[step])  # Eq. (6) on the listed stages (nothing to do with --ema-stages none)
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
