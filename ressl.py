"""ReSSL with a momentum (EMA) teacher on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". ReSSL (Zheng et al. 2021) matches relations: the student's
similarity distribution between a strongly augmented view and a queue of past keys should
follow the teacher's, computed on a weakly augmented view with a sharper temperature.

    python ressl.py                                   # Table 1 "Baseline": EMA on every stage (54.66)
    python ressl.py --ema-stages none                 # Table 1 "Remove": collapses (1.56)
    python ressl.py --ema-stages backbone             # Table 3: 29.79
    python ressl.py --ema-stages projector            # Table 3: 53.51

Recipe: solo-learn's CIFAR ReSSL as its scripts ran at the paper's time (Appendix A):
projector 512-4096-256 without BN, l2-normalised; a queue of 65536 keys; student temperature
0.1, teacher 0.04; the strong view (crop, colour jitter, grayscale; no blur in those scripts)
to the student, the weak view (crop, flip, grayscale 0.2) to the teacher; SGD lr 0.05, wd 1e-4,
momentum 0.9; beta 0.99 rising to 1.0 on a cosine schedule (solo-learn's default).

Projector-only EMA saves memory here, not backbone compute. The teacher sees a view the
student never sees, so no online activation can be reused: with --ema-stages projector the
online backbone still runs on the weak view (without gradients, so without storing its
activations) before the EMA projector. backbone_forwards_per_image is 2 for every stage set.

Deviations from the paper's runs, this method's own (those common to every method file are in
docs/deviations.md): the online probe trains on the strong view's features only (solo-learn also fed
it the weak view, which only the teacher sees here).
Expected result: see README.md ("Measured results") -- only numbers we measured are there.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --preset laptop (common.LAPTOP adds the scale): CIFAR values as in MoCo's demo, which the CIFAR
# copies of ReSSL's code also use (lr 0.06, weight decay 5e-4, a queue of 4,096 keys).
LAPTOP = {"lr": 0.06, "weight_decay": 5e-4, "queue_size": 4096}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="ReSSL with named-stage EMA", formatter_class=common.HelpFormatter)
    common.add_common_args(
        parser, lr=0.05, weight_decay=1e-4, ema_stages="all", beta=0.99, beta_schedule="cosine", beta_final=1.0
    )
    parser.add_argument(
        "--proj-hidden-dim",
        type=common.positive(int, at_most=2**16),
        default=4096,
        help="hidden width of the projector g",
    )
    parser.add_argument("--proj-dim", type=common.positive(int, at_most=2**16), default=256, help="output width of g")
    parser.add_argument(
        "--bn-proj", action="store_true", help="BN2 of Table C.8: a BatchNorm on the projector's output"
    )
    parser.add_argument("--student-temp", type=common.positive(float), default=0.1)
    parser.add_argument("--teacher-temp", type=common.positive(float), default=0.04)
    parser.add_argument(
        "--queue-size",
        type=common.positive(int, at_most=2**21),
        default=65536,
        help="keys in the queue; a multiple of --batch-size",
    )
    args = common.parse_method_args(parser, argv, "ressl", laptop=LAPTOP)
    common.check_queue_size(args)
    return args


# ---------------------------------------------------------------------------------------
# The method: relational distillation against a queue of past keys
# ---------------------------------------------------------------------------------------


class KeyQueue(nn.Module):
    """A FIFO queue of the teacher's past keys: the reference points of the relations."""

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x d
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # where the next batch goes

    @torch.no_grad()
    def push(self, keys):
        """Replace the oldest N keys with this batch's (N x d)."""
        n = keys.shape[0]
        slots = (self.pointer + torch.arange(n, device=self.keys.device)) % self.keys.shape[0]  # N
        self.keys.index_copy_(0, slots, F.normalize(keys.float(), dim=1))
        self.pointer.copy_((self.pointer + n) % self.keys.shape[0])


def ressl_loss(q, k, queue, student_temp, teacher_temp):
    """H(p_t, p_s): p_t = softmax(k Q^T / T_t) from the teacher's weak view (no gradient),
    p_s = softmax(q Q^T / T_s) from the student's strong view, Q the queue."""
    q = F.normalize(q.float(), dim=1)  # N x d
    k = F.normalize(k.detach().float(), dim=1)  # N x d
    p_t = F.softmax(k @ queue.T / teacher_temp, dim=1)  # N x K, the teacher's relations (sharper)
    log_p_s = F.log_softmax(q @ queue.T / student_temp, dim=1)  # N x K
    return -(p_t * log_p_s).sum(dim=1).mean()


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: a strong one for the student and a weak one (crop, flip, grayscale) for the teacher.
    strong = common.ViewRecipe(size=data.image_size)
    weak = common.ViewRecipe(size=data.image_size, jitter_p=0.0)
    view_recipes = [strong, weak]

    # Model: online (student) encoder E = g o b, target (teacher) with EMA stages, the key queue.
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4)
    # the projector g (--bn-proj: Table C.8's BN2 on its output)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, bn=False, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    ema_stages = common.parse_ema_stages(args.ema_stages)  # e.g. 'projector' -> ['projector']
    target = common.NamedStageEMA(online, ema_stages)  # EMA copies of the listed stages, the online rest
    queue = KeyQueue(args.queue_size, args.proj_dim)  # part of the checkpoint
    probe = nn.Linear(backbone.feature_dim, data.num_classes)  # online linear probe on sg(f)
    models = {"online": online, "target": target, "queue": queue, "probe": probe}
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
    for (x_s, x_w), y in run.batches():
        with common.autocast(device):
            f_s, q, _ = online(x_s)  # f = b(x); q = g(f)
            k = target.from_image(x_w)  # the teacher runs from the weak image: nothing to reuse
            loss = ressl_loss(q, k, queue.keys, args.student_temp, args.teacher_temp)  # the queue as it was
            loss_probe = common.probe_loss(probe, (f_s,), y)  # trained on sg(f): no gradient reaches b
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(run.beta)  # Eq. (6) on the listed stages
        queue.push(common.gather(k))  # only now: every process's keys join the queue, in rank order
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
