"""MoCo v2 with a momentum (EMA) target on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". MoCo v2 (Chen et al. 2020) keeps a momentum key encoder and a queue
of past keys as negatives.

    python mocov2.py                                  # Table 1 "Baseline": EMA on every stage (62.34)
    python mocov2.py --ema-stages none                # Table 1 "Remove": collapses (2.22)
    python mocov2.py --ema-stages backbone            # Table 3: 45.84
    python mocov2.py --ema-stages projector           # Table 3: 60.39

Recipe: solo-learn's CIFAR MoCo V2+ (the paper's Appendix A): projector 512-2048-128 without
BN (output 128 in the scripts of the paper's time, 256 today), l2-normalised; one queue of
32768 keys per view; symmetric InfoNCE with temperature 0.2; SGD lr 0.3, wd 1e-4, momentum
0.9; probe lr 0.3; beta 0.99 rising to 0.999 on a cosine schedule (solo-learn's default).
Negatives come from the queue *before* this batch's keys are added; keys are enqueued after
the optimiser step.

Deviations from the paper's runs, this method's own: none (those common to every method file
are in docs/deviations.md). Like solo-learn, and unlike the official MoCo, there is no shuffled BN.
Expected result: see README.md ("Measured results") -- only numbers we measured are there.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --preset laptop (common.LAPTOP adds the scale): the values of MoCo's own CIFAR-10 demo (lr 0.06,
# temperature 0.1, weight decay 5e-4, a queue of 4,096 keys: fewer than the 10,000 training images, and
# no blur, which at 32 pixels smears most of an image away), and a projector 512 wide (lightly's CIFAR
# width; chosen on the validation split, docs/small-scale.md: +3.0 kNN over 2,048 in 10 epochs).
LAPTOP = {
    "lr": 0.06,
    "temperature": 0.1,
    "weight_decay": 5e-4,
    "queue_size": 4096,
    "blur_p": 0.0,
    "proj_hidden_dim": 512,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MoCo v2 with named-stage EMA", formatter_class=common.HelpFormatter)
    common.add_common_args(
        parser,
        lr=0.3,
        weight_decay=1e-4,
        ema_stages="all",
        beta=0.99,
        beta_schedule="cosine",
        beta_final=0.999,
        probe_lr=0.3,
    )
    parser.add_argument(
        "--proj-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=2048,
        help="hidden width of the projector g",
    )
    parser.add_argument(
        "--proj-dim",
        type=common.positive(int, at_most=2**16),
        default=128,
        help="output width of g (the key dimension)",
    )
    parser.add_argument(
        "--bn-proj", action="store_true", help="BN2 of Table C.8: a BatchNorm on the projector's output"
    )
    parser.add_argument("--temperature", type=common.positive(float), default=0.2, help="InfoNCE temperature")
    parser.add_argument(
        "--queue-size",
        type=common.positive(int, at_most=2**21),
        default=32768,
        help="keys per queue; a multiple of --batch-size",
    )
    parser.add_argument(
        "--blur-p", type=common.fraction(), default=0.5, help="probability of a Gaussian blur on each view"
    )
    args = common.parse_method_args(parser, argv, "mocov2", laptop=LAPTOP)
    common.check_queue_size(args)
    return args


# ---------------------------------------------------------------------------------------
# The method: InfoNCE against a queue of past keys
# ---------------------------------------------------------------------------------------


class KeyQueues(nn.Module):
    """One FIFO queue of past keys per view: keys[v] holds the last K keys of view v."""

    def __init__(self, num_views, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(num_views, size, dim), dim=2))  # V x K x d
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # where the next batch goes

    @torch.no_grad()
    def push(self, *keys):
        """Replace the oldest N keys of each queue with this batch's (one N x d tensor per view)."""
        n = keys[0].shape[0]
        slots = (self.pointer + torch.arange(n, device=self.keys.device)) % self.keys.shape[1]  # N
        self.keys.index_copy_(1, slots, F.normalize(torch.stack(keys).float(), dim=2))
        self.pointer.copy_((self.pointer + n) % self.keys.shape[1])


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


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: solo-learn's symmetric_weak recipe, the same for both views.
    view_recipes = [common.ViewRecipe(size=data.image_size, saturation=0.4, blur_p=args.blur_p)] * 2

    # Model: online (query) encoder E = g o b, target (key encoder) with EMA stages, the key queues.
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4)
    # the projector g (--bn-proj: Table C.8's BN2 on its output)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, bn=False, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    ema_stages = common.parse_ema_stages(args.ema_stages)  # e.g. 'projector' -> ['projector']
    target = common.NamedStageEMA(online, ema_stages)  # EMA copies of the listed stages, the online rest
    queues = KeyQueues(2, args.queue_size, args.proj_dim)  # part of the checkpoint
    probe = nn.Linear(backbone.feature_dim, data.num_classes)  # online linear probe on sg(f)
    models = {"online": online, "target": target, "queues": queues, "probe": probe}
    common.to_device(models.values(), device)
    optimizer = torch.optim.SGD(
        [{"params": online.parameters()}, {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )

    # common.Run does the rest: resume, each epoch's order, the lr and beta schedules, checkpoints, logging.
    run = common.Run(args, data, view_recipes, models, optimizer)
    online, probe = run.data_parallel(online, probe)  # under torchrun: DDP averages the gradients
    for (x_1, x_2), y in run.batches():  # two random views of each image of the batch, and its labels
        with common.autocast(device):
            f_1, q_1, inputs_1 = online(x_1)  # f = b(x); queries q = g(f); inputs: each stage's input
            f_2, q_2, inputs_2 = online(x_2)
            k_1, k_2 = target(inputs_1), target(inputs_2)  # keys from the momentum encoder (sg(q) without EMA)
            loss = moco_loss(q_1, q_2, k_1, k_2, queues, args.temperature)  # negatives: the queues as they were
            loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(run.beta)  # Eq. (6) on the listed stages
        queues.push(common.gather(k_1), common.gather(k_2))  # only now: every process's keys, in rank order
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
