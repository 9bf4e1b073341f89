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
listed in README.md, "Deviations from the paper"):
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
    parser = argparse.ArgumentParser(
        description="SimSiam with named-stage EMA", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_common_args(
        parser, lr=0.5, weight_decay=1e-5, ema_stages="none", beta=0.99, beta_schedule="constant", beta_final=1.0
    )
    parser.add_argument("--proj-hidden-dim", type=int, default=2048, help="hidden width of the projector g")
    parser.add_argument("--proj-dim", type=int, default=2048, help="output width of g and h")
    parser.add_argument("--pred-hidden-dim", type=int, default=512, help="hidden (bottleneck) width of the predictor h")
    parser.add_argument("--blur-p", type=float, default=0.5, help="probability of a Gaussian blur on each view")
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
    counter = common.ForwardCounter(online, target, data.image_size)  # measures "#Fwd" of Table 4
    common.compile_stages(models.values(), args.compile)  # --compile: torch.compile each stage in place
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
                f_1, z_1, acts_1 = online(x_1)  # f = b(x), z = g(f); acts: each stage's input
                f_2, z_2, acts_2 = online(x_2)
                z_1m, z_2m = target(acts_1), target(acts_2)  # sg(z) without EMA; momentum projections with it
                p_1, p_2 = predictor(z_1), predictor(z_2)
                loss = simsiam_loss(p_1, p_2, z_1m, z_2m)
                loss_probe = common.probe_loss(probe, (f_1, f_2), y)  # trained on sg(f): no gradient reaches b
            optimizer.zero_grad(set_to_none=True)
            (loss + loss_probe).backward()
            optimizer.step()
            beta = common.beta_at(run.step, total_steps, args.beta, args.beta_final, args.beta_schedule)
            target.update(beta)  # Eq. (6) on the listed stages (nothing to do with --ema-stages none)

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
