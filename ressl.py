"""ReSSL with a momentum (EMA) teacher on any named stage of the encoder.

Paper: Pham et al., "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning". ReSSL (Zheng et al. 2021) matches relations: the student's
similarity distribution between a strongly augmented view and a queue of past keys should
follow the teacher's, computed on a weakly augmented view with a sharper temperature.

    python ressl.py                                   # Table 1 "Baseline": EMA on every stage (54.66)
    python ressl.py --ema-stages none                 # Table 1 "Remove": collapses (1.56)
    python ressl.py --ema-stages backbone             # Table 3: 29.79
    python ressl.py --ema-stages projector            # Table 3: 53.51

The strong view (crop, colour jitter, grayscale; no blur in solo-learn's scripts of the paper's time)
goes to the student, the weak view (crop, flip, grayscale 0.2) to the teacher.

Projector-only EMA saves memory here, not backbone compute. The teacher sees a view the
student never sees, so no online activation can be reused: with --ema-stages projector the
online backbone still runs on the weak view (without gradients, so without storing its
activations) before the EMA projector. backbone_forwards_per_image is 2 for every stage set.

Deviations from the paper's runs, this method's own (those common to every method file are in
docs/deviations.md): the online probe trains on the strong view's features only (solo-learn also fed
it the weak view, which only the teacher sees here), and so the online backbone's BatchNorm running
statistics, which the evaluation uses, come from strong views only (solo-learn's saw both).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------
# ReSSL's recipe: every default of ressl.py, its --preset laptop values, and where they come from
# ---------------------------------------------------------------------------------------
positive = common.positive
RECIPE = common.Recipe(
    "ressl",
    "ReSSL with named-stage EMA",
    # solo-learn's CIFAR ReSSL as its scripts ran at the paper's time (Appendix A): SGD lr 0.05, wd 1e-4, momentum
    # 0.9; beta 0.99 rising to 1.0 by cosine (solo-learn's default)
    lr=0.05,
    weight_decay=1e-4,
    probe_lr=0.1,
    ema_stages="all",
    beta=0.99,
    beta_schedule="cosine",
    beta_final=1.0,
    flags=[  # projector 512-4096-256 without BN, l2-normalised; temperatures 0.1 (student) and 0.04 (teacher)
        common.Flag("--proj-hidden-dim", 4096, "hidden width of the projector g", positive(int, 2**16)),
        common.Flag("--proj-dim", 256, "output width of g", positive(int, 2**16)),
        common.Flag("--bn-proj", False, "BN2 of Table C.8: a BatchNorm on the projector's output"),
        common.Flag("--student-temp", 0.1, "student temperature", positive(float)),
        common.Flag("--teacher-temp", 0.04, "teacher temperature (sharper)", positive(float)),
        common.Flag("--queue-size", 65536, "keys in the queue; a multiple of --batch-size", positive(int, 2**21)),
        # the strong view of solo-learn's CIFAR scripts of the paper's time; its ImageNet-100 script: 0.4 and 0.5
        common.Flag("--strong-saturation", 0.2, "colour jitter's saturation on the strong view", common.fraction()),
        common.Flag("--strong-blur-p", 0.0, "probability of a Gaussian blur on the strong view", common.fraction()),
    ],
    # --preset laptop: CIFAR values as in MoCo's demo (lr 0.06, weight decay 5e-4, a queue of 4,096 keys), which
    # third-party CIFAR copies said to be ReSSL's authors' code also use (their provenance is unverified).
    laptop={"lr": 0.06, "weight_decay": 5e-4, "queue_size": 4096},
)


def parse_args(argv=None):
    args = common.parse_args(RECIPE, argv)
    common.check_queue_size(args)
    return args


# ---------------------------------------------------------------------------------------
# The method: relational distillation against a queue of past keys
# ---------------------------------------------------------------------------------------


def ressl_loss(q, k, queue, student_temp, teacher_temp):
    """H(p_t, p_s): p_t = softmax(k Q^T / T_t) from the teacher's weak view (no gradient),
    p_s = softmax(q Q^T / T_s) from the student's strong view, Q the queue."""
    q = F.normalize(q.float(), dim=1)  # N x d
    k = F.normalize(k.detach().float(), dim=1)  # N x d
    p_t = F.softmax(k @ queue.T / teacher_temp, dim=1)  # N x K, the teacher's relations (sharper)
    log_p_s = F.log_softmax(q @ queue.T / student_temp, dim=1)  # N x K
    return -(p_t * log_p_s).sum(dim=1).mean()


def build(args, num_classes):
    """The online (student) encoder E = g o b, the target (teacher) with EMA stages, the key queue, the probe;
    SGD."""
    backbone = common.ResNetCIFAR(args.arch, width=args.width, bn_block4=args.bn_block4, stem=args.stem)
    projector = common.mlp(backbone.feature_dim, args.proj_hidden_dim, args.proj_dim, bn=False, last_bn=args.bn_proj)
    online = common.Encoder(backbone, projector)
    target = common.NamedStageEMA(online, args.stages)
    queue = common.KeyQueue(args.queue_size, args.proj_dim)  # K x d, part of the checkpoint
    probe = nn.Linear(backbone.feature_dim, num_classes)
    optimizer = torch.optim.SGD(
        [{"params": online.parameters()}, {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )
    return online, target, queue, probe, optimizer


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args.device, args.seed, args.deterministic)
    data = common.load_data(args, device)

    # Views: a strong one for the student and a weak one (crop, flip, grayscale) for the teacher.
    strong = common.ViewRecipe(size=data.image_size, saturation=args.strong_saturation, blur_p=args.strong_blur_p)
    weak = common.ViewRecipe(size=data.image_size, jitter_p=0.0)

    online, target, queue, probe, optimizer = build(args, data.num_classes)
    run = common.Run(args, data, [strong, weak], optimizer, online=online, target=target, probe=probe, queue=queue)
    online, probe = run.data_parallel(online, probe)
    lr_factors = common.learning_rate_schedule(run.total_steps, run.warmup_steps)
    betas = common.beta_schedule(run.total_steps, args.beta, args.beta_final, args.beta_schedule)
    for step, (x_s, x_w), y in run.batches():
        common.set_learning_rate(optimizer, lr_factors[step])
        with common.autocast(device):
            f_s, q, _ = online(x_s)  # f = b(x); q = g(f)
            k = target.from_image(x_w)  # the teacher runs from the weak image: nothing to reuse
        # the losses in float32, outside autocast: bf16 would round each similarity to 1 part in 256 before / T
        loss = ressl_loss(q, k, queue.keys, args.student_temp, args.teacher_temp)  # the queue as it was
        loss_probe = common.probe_loss(probe, (f_s,), y)
        optimizer.zero_grad(set_to_none=True)
        (loss + loss_probe).backward()
        optimizer.step()
        target.update(betas[step])
        queue.push(common.gather(k))  # only now: every process's keys join the queue, in rank order
        run.end_step(loss)


if __name__ == "__main__":
    common.run_cli(main)
