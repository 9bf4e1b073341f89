"""MoCo v2 with a momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". MoCo v2 (Chen et al. 2020) keeps a momentum key encoder and a queue
of past keys as negatives.

    python mocov2.py                                  # Table 1 "Baseline": EMA on every stage (62.34)
    python mocov2.py --ema-stages none                # Table 1 "Remove": collapses (2.22)
    python mocov2.py --ema-stages backbone            # Table 3: 45.84
    python mocov2.py --ema-stages projector           # Table 3: 60.39

Negatives come from the queues *before* this batch's keys are added; keys are enqueued after the
optimiser step. Deviations from the paper's runs, this method's own: none (those common to every
method file are in docs/deviations.md). Like solo-learn, and unlike the official MoCo, there is no
shuffled BN.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# MoCo v2's recipe: every default of mocov2.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive = common.positive
RECIPE = common.Recipe(
    "mocov2",
    "MoCo v2 with named-stage EMA",
    # solo-learn's CIFAR MoCo V2+ (the paper's Appendix A): SGD lr 0.3, wd 1e-4, momentum 0.9; probe lr 0.3;
    # beta 0.99 rising to 0.999 by cosine (solo-learn's default)
    lr=0.3,
    weight_decay=1e-4,
    probe_lr=0.3,
    ema_stages="all",
    beta=0.99,
    beta_schedule="cosine",
    beta_final=0.999,
    flags=[  # projector 512-2048-128 without BN (128 in the scripts of the paper's time, 256 today), l2-normalised
        common.Flag("--proj-hidden-dim", 2048, "hidden width of the projector g", positive(int, 2**16)),
        common.Flag("--proj-dim", 128, "output width of g (the key dimension)", positive(int, 2**16)),
        common.Flag("--bn-proj", False, "BN2 of Table C.8: a BatchNorm on the projector's output"),
        common.Flag("--temperature", 0.2, "InfoNCE temperature", positive(float)),
        common.Flag("--queue-size", 32768, "keys per queue; a multiple of --batch-size", positive(int, 2**21)),
        # no blur: solo-learn's mocov2plus.sh, 2021-08 to 2022-09 (the paper's time; July 2021: 0.5; docs/deviations.md)
        common.Flag("--blur-p", 0.0, "probability of a Gaussian blur on each view", common.fraction()),
    ],
    # --preset laptop: the values of MoCo's own CIFAR-10 demo (lr 0.06, its value at batch 512, kept at the preset's
    # 256, where the demo says 0.03; temperature 0.1, weight decay 5e-4, a queue of 4,096 keys: fewer than the 10,000
    # training images), and a projector 512 wide (lightly's CIFAR width; chosen on the validation split,
    # docs/small-scale.md).
    laptop={
        "lr": 0.06,
        "temperature": 0.1,
        "weight_decay": 5e-4,
        "queue_size": 4096,
        "proj_hidden_dim": 512,
    },
)


def parse_args(argv=None):
    args = common.parse_args(RECIPE, argv)
    common.check_queue_size(args)
    return args


# ---------------------------------------------------------------------------------------
# The method: InfoNCE against a queue of past keys
# ---------------------------------------------------------------------------------------


def info_nce(q, k, queue, temperature):
    """InfoNCE: the query q should pick its key k out of k and the K queued negatives."""
    q = F.normalize(q.float(), dim=1)  # N x d
    k = F.normalize(k.detach().float(), dim=1)  # N x d, keys carry no gradient
    positive = (q * k).sum(dim=1, keepdim=True)  # N x 1
    negatives = q @ queue.T  # N x K
    logits = torch.cat([positive, negatives], dim=1) / temperature  # N x (1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))  # the positive is class 0


def moco_loss(q_1, q_2, k_1, k_2, queues, temperature):
    """Symmetric: view 1's query against view 2's key and queue, and the other way round."""
    return (info_nce(q_1, k_2, queues.keys[1], temperature) + info_nce(q_2, k_1, queues.keys[0], temperature)) / 2


def build(args, num_classes):
    """The online (query) encoder E = g o b, the target (key encoder) with EMA stages, one key queue per view,
    the probe; SGD."""
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4, stem=args.stem)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, bn=False, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    target = common.NamedStageEMA(online, args.stages)
    queues = common.KeyQueue(args.queue_size, args.proj_dim, views=2)  # 2 x K x d, part of the checkpoint
    probe = nn.Linear(backbone.feature_dim, num_classes)
    optimizer = torch.optim.SGD(
        [{"params": online.parameters()}, {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )
    return online, target, queues, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's symmetric_weak recipe, the same for both views.
    view_recipes = [common.ViewRecipe(size=data.image_size, saturation=0.4, blur_p=args.blur_p)] * 2

    online, target, queues, probe, optimizer = build(args, data.num_classes)
    run = common.Run(args, data, view_recipes, optimizer, online=online, target=target, probe=probe, queues=queues)
    online, probe = run.data_parallel(online, probe)
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_1, x_2), y in run.batches():
        common.set_learning_rate(optimizer, lr_factors[step])
        with common.autocast(device):
            f_1, q_1, activations_1 = online(x_1)  # f = b(x); queries q = g(f)
            f_2, q_2, activations_2 = online(x_2)
            k_1, k_2 = target(activations_1), target(activations_2)  # keys: the momentum encoder's (sg(q) without)
        # the losses in float32, outside autocast: bf16 would round each similarity to 1 part in 256 before / T
        loss = moco_loss(q_1, q_2, k_1, k_2, queues, args.temperature)  # negatives: the queues as they were
        loss_probe = common.probe_loss(probe, (f_1, f_2), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(betas[step])
        queues.push(common.gather(k_1), common.gather(k_2))  # only now: every process's keys, in rank order
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
