"""Measurement: backbone forwards per image (Table 4's #Fwd, measured), the paper's per-step instruments
(Fig. 2's weight paths, Fig. 5's gradients, the target's drift), peak memory, an epoch's metrics."""

import functools
import json
import os
import resource
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from engine.errors import ConfigError
from engine.files import atomic_write, write_failed


def read_records(path):
    """[(line, record)] of an instrument's JSON-lines file, its whole lines (a killed run's cut last line goes); a
    line that is not one of its records (the file edited, or damaged) ends the resume in one line, before
    anything is written."""
    try:
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
        records = [json.loads(line) for line in lines]
        if all(isinstance(record.get("step"), (int, float)) for record in records):
            return list(zip(lines, records))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        pass
    raise ConfigError(
        f"cannot resume {path.name}: {path} is not a file of records this code wrote; restore a good copy, or "
        f"delete it to restart its records at the checkpoint's step"
    )


class Instruments:
    """The paper's per-step instruments, written to the run directory beside metrics.jsonl.

    --log-grad-norms  -> grad_norms.jsonl, Fig. 5: each step, the l-inf norm of the gradient of
        the loss with respect to the output of conv1, block1..block4 (before pooling) and the
        projector; the largest over all of the step's online forward passes (both views).
    --track-weights K -> weights.jsonl, Fig. 2 and Appendix E: rows 0..K-1 of the projector's
        last linear layer, online and target, after each step's EMA update (step 0: at start).
        With --proj-hidden-dim 2 each row is a point in the plane. Where the projector is
        shared (not an EMA stage), the target's rows are the online rows.
    --log-target-drift -> target_drift.jsonl, the stability the paper's thesis names: after each
        step's EMA update, how far the outputs of the online network and of the target moved
        since the step before, on one fixed batch (the first DRIFT_IMAGES training images, not
        augmented): the mean over the images of ||z_t/|z_t| - z_(t-1)/|z_(t-1)|||, in [0, 2].
        Both run in training mode (BatchNorm on the batch's statistics, as the loss sees them)
        without touching any running statistic, gradient, random generator or the forward
        counter, so a run with it trains exactly as one without (test_all.py checks).
    Records stay on the device during an epoch (no host synchronisation per step) and are
    written just before each checkpoint; on resume the files are cut back to the checkpoint's
    step, so a resumed run writes what an uninterrupted one would. Off, they cost nothing:
    no hooks are registered and nothing is copied.
    """

    FILES = {"grad_norms": "grad_norms.jsonl", "weights": "weights.jsonl", "target_drift": "target_drift.jsonl"}
    DRIFT_IMAGES = 64

    def __init__(self, args, online, target, enabled=True, fixed_images=None, outputs=None, counter=None):
        """fixed_images, outputs and counter serve --log-target-drift: outputs(images) gives the online
        network's and the target's l2-normalised outputs without side effects (common.Run.outputs); the
        forward counter is paused meanwhile, since these passes are not training work."""
        self.log_grad_norms, self.rows = (args.log_grad_norms, args.track_weights) if enabled else (False, 0)
        self.drift = enabled and args.log_target_drift
        self.stage_names = list(online.stages())  # the paper's stages, input to output
        self.outputs, self.counter = outputs, counter
        self.fixed_images = None if fixed_images is None else fixed_images[: self.DRIFT_IMAGES]
        self.pending = {"grad_norms": [], "weights": [], "target_drift": []}  # (step, tensor) since the last write
        self.current = {}  # stage -> l-inf norm of the gradient so far in this step
        if self.log_grad_norms:  # a forward hook on each online stage watches its output's gradient
            for stage, module in online.stages().items():
                module.register_forward_hook(functools.partial(self._watch, stage))
        if self.rows:
            last_linear = lambda stage: next(
                (m for m in reversed(list(stage.modules())) if isinstance(m, nn.Linear)), None
            )
            self.layers = [last_linear(online.projector), last_linear(target.stages()["projector"])]  # online, target
            if self.layers[0] is None:
                raise ConfigError("--track-weights needs a linear layer in the projector; this one has none")
            out_dim, in_dim = self.layers[0].weight.shape
            if in_dim > 3 or self.rows > out_dim:
                raise ConfigError(
                    f"--track-weights {self.rows} records rows of the projector's last linear layer, "
                    f"{out_dim} rows of {in_dim} weights here; pass --proj-hidden-dim 2 (Fig. 2) and "
                    f"K <= {out_dim}"
                )

    def _watch(self, stage, module, inputs, output):
        """After each online stage's forward: read the gradient of its output in backward (online passes only:
        the target's passes through shared stages carry no gradient)."""
        if output.requires_grad:
            output.register_hook(functools.partial(self._saw, stage))

    def _saw(self, stage, grad):
        norm = grad.detach().abs().amax().float()
        self.current[stage] = torch.maximum(self.current[stage], norm) if stage in self.current else norm

    @torch.no_grad()
    def record(self, step):
        """After optimiser step number `step` (1-based) and its EMA update."""
        if self.log_grad_norms:
            self.pending["grad_norms"].append((step, torch.stack([self.current[s] for s in self.stage_names])))
            self.current = {}
        if self.rows:
            self._record_weights(step)
        if self.drift:
            with self.counter.paused():
                now = self.outputs(self.fixed_images)
            moved = [(n - before).norm(dim=1).mean() for n, before in zip(now, self.before)]  # online, target
            self.pending["target_drift"].append((step, torch.stack(moved)))
            self.before = now

    def _record_weights(self, step):
        self.pending["weights"].append(
            (step, torch.stack([l.weight[: self.rows].detach().float() for l in self.layers]))
        )

    def enabled(self):
        on = {"grad_norms": self.log_grad_norms, "weights": self.rows, "target_drift": self.drift}
        return [key for key in self.FILES if on[key]]

    def open(self, out_dir, step, resume):
        """Start the files: a resumed run keeps the lines up to its checkpoint's step."""
        self.out_dir = Path(out_dir)
        paths = [self.out_dir / self.FILES[key] for key in self.enabled()]
        records = {path: read_records(path) if resume and path.exists() else [] for path in paths}  # all read first
        for path, lines in records.items():
            keep = [line for line, record in lines if record["step"] <= step]
            atomic_write(path, lambda f: f.write("".join(keep).encode()))
        if self.rows and not resume:
            self._record_weights(0)  # the starting point of each trajectory
        if self.drift:  # the outputs the first step's drift is measured from (at a resume: the checkpoint's)
            with self.counter.paused():
                self.before = self.outputs(self.fixed_images)

    def write(self):
        """Append the records since the last write (called just before a checkpoint is saved)."""
        for key in self.enabled():
            if not self.pending[key]:
                continue
            steps = [s for s, _ in self.pending[key]]
            values = torch.stack([v for _, v in self.pending[key]]).cpu().tolist()  # one transfer per epoch
            if key == "grad_norms":
                lines = [{"step": s, **dict(zip(self.stage_names, v))} for s, v in zip(steps, values)]
            else:  # weights and target_drift: the online network's row and the target's
                lines = [{"step": s, "online": v[0], "target": v[1]} for s, v in zip(steps, values)]
            path = self.out_dir / self.FILES[key]
            try:
                with open(path, "a") as f:
                    f.write("".join(json.dumps(line) + "\n" for line in lines))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as error:  # a full disk: a cut last line is dropped on --resume (open, above)
                raise write_failed(path, error, "last.pt") from None
            self.pending[key] = []


class ForwardCounter:
    """Counts the backbone work a training run does: Table 4's "#Fwd" column, measured.

    backbone forwards per image = all backbone FLOPs run (online and target branches) divided by
    the backbone FLOPs run with gradients (the online network's own passes). Each stage's FLOPs
    are measured once with torch's counter and scaled by the size of its input, so a stage
    run on a smaller crop or a part of the network counts for what it costs. A forward hook on
    every backbone stage, online and EMA copy, counts the passes made in training mode.
    BYOL: 2 with EMA on every stage, 1 on the projector only, between 1 and 2 for block4,projector.
    """

    def __init__(self, online, target, image_size):
        from torch.utils.flop_counter import FlopCounterMode

        backbone = online.backbone
        stages = {name: module for name, module in online.stages().items() if name != "projector"}  # conv1..block4
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        self.flops, self.input_numel = {}, {}  # per stage, for one image of image_size
        h = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad():
            for name, module in stages.items():
                self.input_numel[name] = h.numel()
                with FlopCounterMode(display=False) as counter:
                    h = module(h)
                self.flops[name] = counter.get_total_flops()
        backbone.train(was_training)
        for name, module in stages.items():
            modules = [module] + ([target.ema[name]] if name in target.ema else [])
            for module in modules:
                module.register_forward_pre_hook(functools.partial(self._ran, name))
        self.reset()

    def reset(self):
        self.flops_run, self.flops_with_grad = 0.0, 0.0
        self.counting = True

    @contextmanager
    def paused(self):
        """Passes made inside are not training work (--log-target-drift's measurement)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def _ran(self, stage, module, inputs):
        if not module.training or not self.counting:  # evaluation passes are not training work
            return
        flops = self.flops[stage] * inputs[0].numel() / self.input_numel[stage]
        self.flops_run += flops
        if torch.is_grad_enabled():
            self.flops_with_grad += flops

    def forwards_per_image(self):
        return self.flops_run / self.flops_with_grad if self.flops_with_grad else 0.0


def operations_dispatched(fn):
    """How many tensor operations fn() runs, as torch's dispatcher sees them. On a GPU most of them are one
    kernel launch each (views and allocations launch nothing): when the GPU waits for Python, what a step costs
    grows with this count, not with its FLOPs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.count += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.count


def peak_memory_mb(device):
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def epoch_metrics(*, epoch, step, loss, lr, beta, seconds, images_seen, evaluation, online, target, counter):
    """One line of metrics.jsonl: training state, the evaluation's results, and the cost columns of Table 4."""
    ema_params = target.num_parameters()
    return {
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "lr": lr,
        "beta": beta,
        **evaluation,
        "epoch_seconds": seconds,
        "images_per_second": images_seen / seconds,
        "backbone_forwards_per_image": counter.forwards_per_image(),
        "ema_params": ema_params,
        "ema_params_mb": ema_params * 4 / 2**20,  # float32
        "peak_memory_mb": peak_memory_mb(next(online.parameters()).device),
    }
