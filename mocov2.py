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
are in README.md). Like solo-learn, and unlike the official MoCo, there is no shuffled BN.
Expected result: see README.md ("Measured results") -- only numbers we measured are there.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# --preset laptop (common.LAPTOP adds the scale): the values of MoCo's own CIFAR-10 demo (lr 0.06,
# temperature 0.1, weight decay 5e-4, a queue of 4,096 keys: fewer than the 10,000 training images, and
# no blur, which at 32 pixels smears most of an image away).
LAPTOP = {"lr": 0.06, "temperature": 0.1, "weight_decay": 5e-4, "queue_size": 4096, "blur_p": 0.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="MoCo v2 with named-stage EMA", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    parser.add_argument("--proj-hidden-dim", type=int, default=2048, help="hidden width of the projector g")
    parser.add_argument("--proj-dim", type=int, default=128, help="output width of g (the key dimension)")
    parser.add_argument(
        "--bn-proj", action="store_true", help="BN2 of Table C.8: a BatchNorm on the projector's output"
    )
    parser.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature")
    parser.add_argument("--queue-size", type=int, default=32768, help="keys per queue; a multiple of --batch-size")
    parser.add_argument("--blur-p", type=float, default=0.5, help="probability of a Gaussian blur on each view")
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
    data = common.load_dataset(
        args.dataset,
        args.data_dir,
        device,
        image_size=args.image_size,
        train_subset=args.train_subset,
        eval_split=args.eval_split,
        val_size=args.val_size,
        download=not args.no_download,
        synthetic_size=args.synthetic_size,
        seed=args.seed,
    )
    steps_per_epoch = common.steps_per_epoch(data, args.batch_size)

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
    counter = common.ForwardCounter(online, target, data.image_size)  # measures "#Fwd" of Table 4
    common.compile_stages(models.values(), args.compile)  # --compile: torch.compile each stage in place
    optimizer = torch.optim.SGD(
        [{"params": online.parameters()}, {"params": probe.parameters(), "lr": args.probe_lr, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
    )

    # Run state (common.RunState): the step, this epoch's image order and loss sum, the metrics history;
    # with --resume it comes back from last.pt. One generator draws all randomness.
    generator = torch.Generator(device).manual_seed(args.seed)
    run = common.start_or_resume(args, models, optimizer, generator, device)
    # batch i's views, augmented --aug-chunk batches at a time
    views = common.Views(data, view_recipes, args.batch_size, args.aug_chunk, generator)
    instruments = common.Instruments(args, online, target)  # --log-grad-norms (Fig. 5), --track-weights (Fig. 2)
    logger = common.RunLogger(args, run, instruments)
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    warmup_steps = args.warmup_epochs * steps_per_epoch

    while run.step < last_step:
        epoch, first_batch = divmod(run.step, steps_per_epoch)
        if first_batch == 0:  # a new epoch: a new order of the training images, and a fresh loss tally
            run.order = torch.randperm(len(data.train_images), generator=generator, device=device)
            run.loss_sum.zero_()
        for model in models.values():
            model.train()
        counter.reset()
        start = common.timer(device)
        for i in range(first_batch, steps_per_epoch):
            (x_1, x_2), y = views.batch(run.order, epoch, i)  # two random views of batch i, and its labels
            lr = common.set_learning_rate(optimizer, run.step, total_steps, warmup_steps)

            with common.autocast(device):
                f_1, q_1, acts_1 = online(x_1)  # f = b(x); queries q = g(f); acts: each stage's input
                f_2, q_2, acts_2 = online(x_2)
                k_1, k_2 = target(acts_1), target(acts_2)  # keys from the momentum encoder (sg(q) without EMA)
                loss = moco_loss(q_1, q_2, k_1, k_2, queues, args.temperature)  # negatives: the queues as they were
                loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
            optimizer.zero_grad(set_to_none=True)
            (loss + loss_probe).backward()
            optimizer.step()
            beta = common.beta_at(run.step, total_steps, args.beta, args.beta_final, args.beta_schedule)
            target.update(beta)  # Eq. (6) on the listed stages
            queues.push(k_1, k_2)  # only now do this batch's keys join the negatives

            run.loss_sum += loss.detach()  # summed on the device: no host synchronisation per step
            run.step += 1
            instruments.record(run.step)  # does nothing unless an instrument is on
            logger.progress(i, steps_per_epoch, loss)
            if run.step >= last_step:
                break
            if common.checkpoint_due(args, run.step) and i + 1 < steps_per_epoch:  # --checkpoint-every, SIGTERM
                common.save_checkpoint(args, run, models, optimizer, views, instruments)  # inside the epoch
                common.exit_if_stopped(args, run)  # after a SIGTERM: last.pt holds this step; exit for --resume

        # End of the epoch (or of --max-steps): evaluate, save last.pt, log.
        steps_this_epoch = run.step - epoch * steps_per_epoch  # including those before a resume
        metrics = common.epoch_metrics(
            epoch=epoch + 1,
            step=run.step,
            loss=(run.loss_sum / steps_this_epoch).item(),
            lr=lr,
            beta=beta,
            seconds=common.timer(device) - start,
            images_seen=(steps_this_epoch - first_batch) * args.batch_size,
            online=online,
            target=target,
            probe=probe,
            data=data,
            counter=counter,
            run_knn=(epoch + 1) % args.eval_every == 0 or run.step == last_step,
        )
        epoch_complete = run.step % steps_per_epoch == 0  # False when --max-steps stopped the run inside it
        if epoch_complete:
            run.history.append(metrics)
        common.save_checkpoint(args, run, models, optimizer, views, instruments)  # refuses a NaN loss
        logger.log_epoch(metrics, run.history, provisional=not epoch_complete)  # metrics.jsonl, the epoch line
        if run.step < last_step:
            common.exit_if_stopped(args, run)

    print(common.summary_line(args, logger.last))


if __name__ == "__main__":
    common.run_cli(main)
