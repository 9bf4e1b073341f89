"""Run: everything around a method's training step, so that a method file's loop is its method."""

import torch

from engine.checkpoint import checkpoint_due, exit_if_stopped, save_checkpoint, start_or_resume
from engine.data import make_views, steps_per_epoch
from engine.device import compile_stages, eager, timer, to_device
from engine.distributed import (
    WORLD,
    check_processes_agree,
    check_world,
    data_parallel,
    mean_over_processes,
    on_rank_0,
    sync_batch_norm,
)
from engine.errors import ConfigError
from engine.log import RunLogger, summary_line
from engine.measure import ForwardCounter, Instruments, epoch_metrics


class Run:
    """Everything around a method's training step. A method file writes

        run = common.Run(args, data, view_recipes, optimizer, online=online, target=target, probe=probe)
        for step, (x_1, x_2), y in run.batches():
            common.set_learning_rate(optimizer, lr_factors[step])  # the schedules: values indexed by step
            ...                                                    # the method's step
            target.update(betas[step])                             # Eq. (6)
            run.end_step(loss)

    and Run does the rest. At the start it moves the models to the device in channels_last, counts
    backbone forwards (Table 4's #Fwd), takes the run directory and resumes from last.pt (--resume).
    batches() draws each epoch's image order from one generator and yields each step's index (from 0,
    over the whole run: what the schedules are indexed by), views and labels. end_step() adds the loss to
    the epoch's tally, records the instruments and draws the progress line. Between steps Run writes the
    mid-epoch checkpoints (--checkpoint-every, SIGTERM, Ctrl-C); at each epoch's end it evaluates (probe,
    kNN every --eval-every epochs), saves last.pt and logs metrics.jsonl and the epoch line, whose lr and
    beta are the last step's (the optimiser's and the target's); at the end it prints the summary line.
    The models it holds are the ones last.pt saves: online, target, probe and the method's others.

    Under torchrun (engine/distributed.py) each of the N processes takes batch / N images of every global
    batch; the step's index is the global step; rank 0 alone evaluates, writes the run directory and
    prints. The method file wraps what trains in DDP with run.data_parallel(...).

    Four parts of a run are the paper's and live in common.py, which this package never imports:
    common.Run is this class with them filled in (augment, augment_crops, evaluate, outputs below).
    """

    def augment(self, images, recipe, mean, std, generator):
        """One view of a batch of uint8 images, normalised (common.augment)."""
        raise NotImplementedError("use common.Run, which has the augmentations")

    def evaluate(self, knn):
        """The epoch's evaluation: the probe's accuracy, kNN when `knn`, the collapse monitor (common.evaluate)."""
        raise NotImplementedError("use common.Run, which has the evaluation")

    def augment_crops(self, crops, recipe, mean, std, generator):
        """The rest of a view after its crop and flip, on crops cut by --loader stream (common.augment_crops)."""
        raise NotImplementedError("use common.Run, which has the augmentations")

    def outputs(self, images):
        """The online network's and the target's l2-normalised outputs on uint8 images, leaving no trace
        (--log-target-drift)."""
        raise NotImplementedError("use common.Run, which has the encoder")

    def eager_outputs(self, images):
        """outputs(), eagerly in a compiled run (engine.device.eager)."""
        with eager(self.args.compile):
            return self.outputs(images)

    def __init__(self, args, data, view_recipes, optimizer, *, online, target, probe, **others):
        self.args, self.data, self.optimizer = args, data, optimizer
        self.online, self.target, self.probe = online, target, probe
        self.models = {"online": online, "target": target, "probe": probe, **others}  # what last.pt holds
        self.device = data.train_labels.device
        to_device(self.models.values(), self.device)  # in place, channels_last: the optimiser keeps its parameters
        check_world(args)  # under torchrun: the global batch divides among the processes
        self.steps_per_epoch = steps_per_epoch(data, args.batch_size)  # (refuses a batch larger than the data)
        sync_batch_norm(args, self.models.values(), self.device)  # under torchrun on GPUs: SyncBatchNorm
        self.counter = ForwardCounter(online, target, data.image_size)  # measures "#Fwd" of Table 4
        compile_stages(self.models.values(), args.compile, self.device)  # --compile: each stage in place
        # One generator draws all randomness: each epoch's order and every augmentation. Under torchrun every
        # process draws the same order from it, and its augmentations from a generator of its own.
        self.generator = torch.Generator(self.device).manual_seed(args.seed)
        self.augment_generator = self.generator
        if WORLD.size > 1:
            own_seed = (args.seed + 104729 * (WORLD.rank + 1)) % 2**63  # the seed shifted by a prime per rank
            self.augment_generator = torch.Generator(self.device).manual_seed(own_seed)
        # the step, this epoch's image order and loss tally, the metrics history; with --resume from last.pt
        self.progress = start_or_resume(
            args, self.models, optimizer, self.augment_generator, self.device, self.generator
        )
        if args.resume and len(self.progress.order) != len(data.train_labels):  # (the order: one per image)
            raise ConfigError(
                f"last.pt in {args.out_dir} was trained on {len(self.progress.order)} images, but the training "
                f"split now holds {len(data.train_labels)}; resume on the images the run started with (args.json "
                f"names its --data-dir), or start a new run"
            )
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, args.max_steps or self.total_steps)
        if self.progress.step > self.last_step:  # a --resume with a --max-steps below its checkpoint's step
            raise ConfigError(
                f"last.pt in {args.out_dir} holds step {self.progress.step}, past --max-steps {args.max_steps}; a run "
                f"cannot go back: raise --max-steps, or leave it out to run to the end"
            )
        # batch i's views (this process's share of it), augmented --aug-chunk batches at a time
        self.views = make_views(
            data,
            view_recipes,
            args.batch_size,
            args.aug_chunk,
            self.augment_generator,
            self.augment,
            self.augment_crops,
            WORLD,
            args.seed,
        )
        # --log-grad-norms, --track-weights, --log-target-drift (measured on rank 0's share of each batch)
        fixed = data.fixed_batch(Instruments.DRIFT_IMAGES) if args.log_target_drift else None
        self.instruments = Instruments(
            args,
            online,
            target,
            enabled=WORLD.main,
            fixed_images=fixed,
            outputs=self.eager_outputs,
            counter=self.counter,
        )
        self.logger = on_rank_0(lambda: RunLogger(args, self.progress, self.instruments))
        self.warmup_steps = args.warmup_epochs * self.steps_per_epoch

    def batches(self):
        """Yield (step, views, labels) for every step left in the run: the step's index from 0, the views as
        the recipes list them, the labels."""
        try:
            yield from self._batches()
        finally:  # however the run ends: --loader stream's workers stop
            self.views.close()

    def _batches(self):
        progress, args = self.progress, self.args
        while progress.step < self.last_step:
            epoch, first_batch = divmod(progress.step, self.steps_per_epoch)
            if first_batch == 0:  # a new epoch: a new order of the training images, and a fresh loss tally
                progress.order = torch.randperm(
                    len(self.data.train_labels), generator=self.generator, device=self.device
                )
                progress.loss_sum.zero_()
            for model in self.models.values():
                model.train()
            self.counter.reset()
            start = timer(self.device)
            for i in range(first_batch, self.steps_per_epoch):
                self.batch = i
                views, labels = self.views.batch(progress.order, epoch, i)
                yield progress.step, views, labels
                if progress.step >= self.last_step:
                    break
                if checkpoint_due(args, progress.step) and i + 1 < self.steps_per_epoch:  # --checkpoint-every
                    self.save()  # inside the epoch
                    exit_if_stopped(args, progress.step)  # after SIGTERM or Ctrl-C: last.pt holds this step; exit
            self.end_epoch(epoch, first_batch, start)
        check_processes_agree(self.models)  # under torchrun: every process holds the same model
        if WORLD.main:
            print(summary_line(args, self.logger.last))

    def data_parallel(self, *modules):
        """The modules that train, for the method's step: in DDP under torchrun, themselves otherwise."""
        return data_parallel(self.device, *modules)

    def end_step(self, loss):
        """After the method's step: the loss into the epoch's tally, the instruments, the progress line."""
        self.progress.loss_sum += loss.detach()  # summed on the device: no host synchronisation per step
        self.progress.step += 1
        self.instruments.record(self.progress.step)  # does nothing unless an instrument is on
        if WORLD.main:
            self.logger.progress(self.batch, self.steps_per_epoch, loss)

    def end_epoch(self, epoch, first_batch, start):
        """End of the epoch (or of --max-steps): evaluate, save last.pt, log."""
        progress = self.progress
        steps_this_epoch = progress.step - epoch * self.steps_per_epoch  # including those before a resume
        loss = mean_over_processes(progress.loss_sum) / steps_this_epoch  # over every process's share of the batches
        epoch_complete = progress.step % self.steps_per_epoch == 0  # False when --max-steps stopped it inside
        if WORLD.main:  # (under torchrun, rank 0 alone evaluates and logs)
            seconds = timer(self.device) - start  # the epoch's training time: before the evaluation
            run_knn = (epoch + 1) % self.args.eval_every == 0 or progress.step == self.last_step
            with eager(self.args.compile):  # a compiled run evaluates eagerly: no graphs for evaluation's shapes
                evaluation = self.evaluate(run_knn)
            metrics = epoch_metrics(
                epoch=epoch + 1,
                step=progress.step,
                loss=loss.item(),
                lr=self.optimizer.param_groups[0]["lr"],  # the last step's (set by the method's loop)
                beta=self.target.beta,  # the last step's Eq. (6) coefficient
                seconds=seconds,
                images_seen=(steps_this_epoch - first_batch) * self.args.batch_size,
                evaluation=evaluation,
                online=self.online,
                target=self.target,
                counter=self.counter,
            )
            if epoch_complete:
                progress.history.append(metrics)
        self.save()  # refuses a NaN loss
        if WORLD.main:
            self.logger.log_epoch(metrics, progress.history, provisional=not epoch_complete)
        if progress.step < self.last_step:
            exit_if_stopped(self.args, progress.step)

    def save(self):
        save_checkpoint(
            self.args, self.progress, self.models, self.optimizer, self.views, self.instruments, self.generator
        )
        if WORLD.main:  # last.pt now holds this run's flags: so does args.json (after a --resume, from here on)
            self.logger.write_args()
