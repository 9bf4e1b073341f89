"""SimCLR with an optional momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". SimCLR (Chen et al. 2020) has no momentum encoder; the paper adds
one (Table 1, "SimCLR + EMA", beta = 0.90).

    python simclr.py                                  # Table 1 "Baseline": no EMA (60.45)
    python simclr.py --ema-stages all --beta 0.9      # Table 1 "Add": EMA on every stage (61.97)
    python simclr.py --ema-stages projector --beta 0.9

NT-Xent over 2N views: each anchor has 2N-2 negatives.

Which branch gives what. Without EMA (the default) this is plain SimCLR: the 2N online
projections are anchors, positives and negatives at once, and gradients flow through all of
them. With a target network, the anchors are the online projections z_1, z_2 and the
positives and negatives are the target's projections z_1m, z_2m, under stop-gradient: the
anchor z_1^i has the positive z_2m^i and the negatives z_1m^k, z_2m^k for k != i (its own
view's target projection z_1m^i is left out, as the anchor itself is in plain SimCLR).
The paper does not say how it paired them.

Deviations from the paper's runs, this method's own: none beyond the pairing above, which the
paper leaves open (those common to every method file are in docs/deviations.md).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# SimCLR's recipe: every default of simclr.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive = common.positive
RECIPE = common.Recipe(
    "simclr",
    "SimCLR with named-stage EMA",
    # solo-learn's CIFAR SimCLR (the paper's Appendix A): LARS lr 0.4, wd 1e-5 (the scripts of the paper's time;
    # 1e-4 today), eta 0.02. Beta is constant at 0.90, the paper's value for SimCLR + EMA (Table 1).
    lr=0.4,
    weight_decay=1e-5,
    probe_lr=0.1,
    ema_stages="none",
    beta=0.9,
    beta_schedule="constant",
    beta_final=1.0,
    flags=[  # projector 512-2048-256 without BN; NT-Xent at temperature 0.2
        common.Flag("--proj-hidden-dim", 2048, "hidden width of the projector g", positive(int, 2**16)),
        common.Flag("--proj-dim", 256, "output width of g", positive(int, 2**16)),
        common.Flag("--bn-proj", False, "BN2 of Table C.8: a BatchNorm on the projector's output"),
        common.Flag("--temperature", 0.2, "NT-Xent temperature", positive(float)),
        common.Flag("--lars-eta", 0.02, "LARS trust coefficient", positive(float)),
        # no blur: solo-learn's simclr.sh in the paper's time, 2021-08 to 2022-09 (July 2021: 0.5; docs/deviations.md)
        common.Flag("--blur-p", 0.0, "probability of a Gaussian blur on each view", common.fraction()),
        # two of lightly's CIFAR-10 settings, to test them (docs/small-scale.md); the defaults are the paper's
        common.Flag(
            "--optimizer",
            "lars",
            "lars: LARS, as the paper; sgd: momentum SGD 0.9 with weight decay on every parameter (lightly's, "
            "with --lr 0.06 --weight-decay 5e-4)",
            ("lars", "sgd"),
        ),
        common.Flag(
            "--jitter-strength",
            1.0,
            "scales the colour jitter's 0.8/0.8/0.8/0.2 (lightly's CIFAR-10 benchmark: 0.5)",
            positive(float, 1.25),
        ),
    ],
    # --preset laptop: lightly's CIFAR-10 settings, chosen on the validation split (docs/small-scale.md): momentum
    # SGD lr 0.06 (lightly's at batch 128, not scaled up to the preset's 256), weight decay 5e-4 (the paper: LARS
    # lr 0.4, 1e-5), colour jitter at half strength (0.4/0.4/0.4/0.1; the paper: 0.8/0.8/0.8/0.2).
    laptop={"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "jitter_strength": 0.5},
)


def parse_args(argv=None):
    return common.parse_args(RECIPE, argv)


# ---------------------------------------------------------------------------------------
# The method: NT-Xent
# ---------------------------------------------------------------------------------------


def nt_xent(anchors, candidates, temperature, first=0):
    """NT-Xent over 2N views. anchors, candidates: 2N x d, view 1 of all N images, then view 2.

    Anchor i's positive is candidate (i + N) mod 2N; its negatives are the other 2N - 2
    candidates; candidate i (the anchor itself in plain SimCLR) is left out. Mean over anchors.

    Under torchrun the candidates are every process's 2N, in rank order, and this process's own
    start at column first = rank * 2N: each index above is offset by first.
    """
    a = F.normalize(anchors.float(), dim=1)  # 2N x d
    c = F.normalize(candidates.float(), dim=1)  # 2N x d, times the number of processes
    n2 = a.shape[0]
    logits = a @ c.T / temperature  # cosine similarities / T
    itself = first + torch.arange(n2, device=a.device)
    columns = torch.arange(c.shape[0], device=a.device)
    logits = logits.masked_fill(itself[:, None] == columns[None], float("-inf"))  # drop i = i (no host sync)
    positives = first + (torch.arange(n2, device=a.device) + n2 // 2) % n2  # the other view of the same image
    return F.cross_entropy(logits, positives)


def build(args, num_classes):
    """The online encoder E = g o b, the target with EMA stages (none by default), the probe; LARS (the paper's)
    or momentum SGD (--optimizer sgd)."""
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4, stem=args.stem)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, bn=False, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    target = common.NamedStageEMA(online, args.stages)
    probe = nn.Linear(backbone.feature_dim, num_classes)
    probe_group = {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0}
    if args.optimizer == "lars":
        optimizer = common.LARS(
            common.param_groups([online], args.weight_decay) + [{**probe_group, "lars": False}],
            lr=args.lr,
            weight_decay=args.weight_decay,
            eta=args.lars_eta,
        )
    else:
        optimizer = torch.optim.SGD(
            [{"params": online.parameters()}, probe_group], lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
    return online, target, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's symmetric recipe (strong colour jitter), the same for both views.
    strength = args.jitter_strength  # 1: the paper's
    jitter = dict(brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength, hue=0.2 * strength)
    view_recipes = [common.ViewRecipe(size=data.image_size, blur_p=args.blur_p, **jitter)] * 2

    online, target, probe, optimizer = build(args, data.num_classes)
    run = common.Run(args, data, view_recipes, optimizer, online=online, target=target, probe=probe)
    online, probe = run.data_parallel(online, probe)
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_1, x_2), y in run.batches():
        common.set_learning_rate(optimizer, lr_factors[step])
        with common.autocast(device):
            f_1, z_1, activations_1 = online(x_1)  # f = b(x), z = g(f)
            f_2, z_2, activations_2 = online(x_2)
            anchors = torch.cat([z_1, z_2])  # 2N x d
            if target.ema_stages:  # positives and negatives from the momentum target, under stop-gradient
                candidates = torch.cat([target(activations_1), target(activations_2)])
            else:  # plain SimCLR: the online projections themselves, with gradient
                candidates = anchors
            # under torchrun: the candidates of every process (with gradient), and where this one's start
            candidates = common.gather_with_gradient(candidates)
        loss = nt_xent(anchors, candidates, args.temperature, first=common.WORLD.rank * len(anchors))
        loss_probe = common.probe_loss(probe, (f_1, f_2), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(betas[step])  # Eq. (6) on the listed stages (nothing to do with --ema-stages none)
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
