"""What the six method files share -- and nothing that is a method.

Read a method file (byol.py first) next to the paper; come here when it calls something. The file has
two parts. Part I is the paper, written to be read:

    1. the encoder      CIFAR ResNet-18/50 whose stages carry the paper's names (Fig. 1), MLP heads
    2. the EMA          --ema-stages, the target network with activation reuse (Eq. 7, Algorithm 1),
                        Eq. (6), the beta schedule
    3. evaluation       the online linear probe, weighted kNN

Part II is machinery, not needed to follow the paper:

    4. setup            errors, the device, seeding, autocast, --compile, the timer
    5. the run          common.Run: everything around a method's step (resume, schedules, checkpoints, logs)
    6. data             datasets held in memory as uint8 tensors on the run device
    7. augmentation     batched, per-sample random augmentations in plain torch
    8. optimisation     LARS, parameter groups, warm-up + cosine learning rate
    9. measurement      the instruments (Fig. 2, 5), backbone forwards per image (Table 4), the
                        collapse monitor, an epoch's metrics
   10. arguments        the shared flags, --preset laptop, range checks
   11. checkpoints      RunState, last.pt and exact resume, metrics.jsonl, the epoch line

The paper: "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual
Representation Learning" (Pham et al.). Its stage names (Fig. 1, Sec. 4) are used throughout.
"""

import argparse
import copy
import functools
import io
import json
import math
import os
import pickle
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ========================================================================================
# Part I: the paper
# ========================================================================================

# ----------------------------------------------------------------------------------------
# 1. The encoder: CIFAR ResNet with named stages, MLP heads
# ----------------------------------------------------------------------------------------
BACKBONE_STAGES = ("conv1", "block1", "block2", "block3", "block4")
STAGES = BACKBONE_STAGES + ("projector",)  # the paper's names, input to output (Fig. 1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNetCIFAR(nn.Module):
    """ResNet with the CIFAR stem: conv1 = 3x3 conv (stride 1, padding 1) + BN + ReLU, no max-pool.

    Stages conv1, block1..block4 are attributes under the paper's names. Global average pooling
    follows block4 (in `run_stages`); it has no parameters and is not a stage. bn_block4 adds
    Table C.8's BN1, a BatchNorm on block4's output (before pooling), to the block4 stage.
    `width` (--width) narrows every stage alike: 16 gives a quarter-width ResNet for CPUs (a
    teaching setting; the paper's is 64).
    Deviation: solo-learn, which the paper ran, pads conv1 by 2 (34x34 maps); we pad by 1 as
    the MoCo CIFAR demo and the original ResNet do.
    """

    def __init__(self, arch="resnet18", width=64, zero_init_residual=False, bn_block4=False):
        super().__init__()
        block, depths = ARCHS[arch]  # (checked by check_arch when the arguments were parsed)
        # width W: conv1 and block1 have W channels, block k has W * 2^(k-1) (W = 64: the paper's ResNet)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        in_planes, stages = width, []
        for planes, depth, stride in zip((width, 2 * width, 4 * width, 8 * width), depths, (1, 2, 2, 2)):
            layers = []
            for s in [stride] + [1] * (depth - 1):
                layers.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3, self.block4 = stages
        self.feature_dim = in_planes  # 8W for ResNet-18, 32W for ResNet-50: 512 and 2048 at the paper's W = 64
        if bn_block4:  # BN1 of Table C.8: BatchNorm on block4's output, part of the block4 stage
            self.block4.append(nn.BatchNorm2d(in_planes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each residual branch starts as the identity (SimSiam's setting)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x):
        """f = b(x), Eq. (1): the pooled features."""
        inputs = run_stages({s: getattr(self, s) for s in BACKBONE_STAGES}, x, "conv1")
        return inputs["output"]  # the stages end at block4 and its pooling: the output is f


def mlp(in_dim, hidden_dim, out_dim, num_layers=2, bn=True, last_bn=False, last_bn_affine=True, bias=True):
    """Linear -> [BN] -> ReLU, repeated, then Linear [-> BN]: the projector g and predictor h."""
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=bias or not bn)]
        layers += [nn.BatchNorm1d(hidden_dim)] if bn else []
        layers += [nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias or not last_bn))  # a bias before BN would be cancelled
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


def run_stages(modules, h, start):
    """Run the encoder from stage `start` to its end with the given {stage name: module}.

    Returns `inputs`, the activation entering each stage that ran, plus "output": inputs["projector"]
    is the pooled backbone feature f, inputs["output"] the projection z (or f when no projector ran).
    """
    inputs = {}
    for name in STAGES[STAGES.index(start) :]:
        if name not in modules:
            break
        inputs[name] = h
        h = modules[name](h)
        if name == "block4":
            h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # global average pooling: N x C x H x W -> N x C
    inputs["output"] = h
    return inputs


class Encoder(nn.Module):
    """The online encoder E = g o b: backbone stages conv1..block4, pooling, projector g.

    forward(x) returns (f, z, inputs): f = b(x) (Eq. 1), z = g(f) (Eq. 3), and inputs, the
    activation entering each stage -- what the target branch starts from (activation reuse).
    """

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def stages(self):
        """{stage name: module}, input to output."""
        return {**{s: getattr(self.backbone, s) for s in BACKBONE_STAGES}, "projector": self.projector}

    def forward(self, x):
        inputs = run_stages(self.stages(), x, "conv1")
        f = inputs["projector"]  # what enters the projector: the pooled backbone feature
        return f, inputs["output"], inputs


# ----------------------------------------------------------------------------------------
# 2. The EMA: --ema-stages, the target network, Eq. (6), the beta schedule
# ----------------------------------------------------------------------------------------
STAGE_ALIASES = {"all": STAGES, "backbone": BACKBONE_STAGES, "none": ()}


def parse_ema_stages(text):
    """'all' | 'backbone' | 'projector' | 'none' | a comma list such as 'block4,projector'.

    Returns the stage names in input-to-output order.
    """
    names = [t.strip() for t in str(text).split(",")]
    if not any(names):
        raise ConfigError(
            "--ema-stages is empty; give all, backbone, projector, none or a comma list such as block4,projector"
        )
    if not all(names):
        raise ConfigError(f"--ema-stages {text!r} has an empty item; write the stages with single commas, no spaces")
    for whole in ("none", "all"):
        if whole in names and len(names) > 1:
            raise ConfigError(f"--ema-stages {text!r} combines '{whole}' with other stages; give '{whole}' alone")
    if len(set(names)) < len(names):
        raise ConfigError(f"--ema-stages {text!r} names a stage twice; name each once")
    chosen = set()
    for name in names:
        if name in STAGE_ALIASES:
            chosen.update(STAGE_ALIASES[name])
        elif name in STAGES:
            chosen.add(name)
        else:
            raise ConfigError(
                f"unknown stage '{name}' in --ema-stages; choose from {', '.join(STAGES)} or all, backbone, none"
            )
    return [s for s in STAGES if s in chosen]


def beta_at(step, total_steps, base, final, schedule):
    """The EMA coefficient for optimiser step `step` (0-based).

    'constant': beta = base.  'cosine' (solo-learn, which the paper ran, and the BYOL paper):
    beta rises from base to final, beta = final - (final - base) * (cos(pi * step / total) + 1) / 2.
    beta = 0 (no momentum) and beta = 1 (frozen target) stay what they say whatever the schedule.
    """
    if schedule == "constant" or base in (0.0, 1.0):
        return base
    return final - (final - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


@contextmanager
def running_stats_frozen(modules):
    """BatchNorm in these modules uses batch statistics but leaves its running statistics alone.

    Used when the target branch runs a *shared* stage: the online network's running mean and
    variance (used by evaluation) should describe the online network's own forward passes only.
    """
    bns = [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class NamedStageEMA(nn.Module):
    """The target network: EMA copies of the listed stages, the online modules for the rest.

    * A stage not listed is *shared*: the target uses the online network's very module, under
      stop-gradient (Fig. 1b). Only EMA copies are parameters of this module (and of its
      state_dict); they never receive gradients.
    * forward(inputs) -- activation reuse. Shared stages in front of the first EMA stage would
      compute exactly what the online network computed on the same view, so the target branch
      starts from the online activation entering the first EMA stage (detached) and runs only
      the stages from there on. With --ema-stages projector this is Eq. (7), z_m = g_m(f), and
      the backbone runs once per view (Algorithm 1); with all it is Eq. (2)-(3), twice.
      from_image(x) runs the target from an image the online network did not see (ReSSL).
    * update(beta) -- Eq. (6), xi <- beta * xi + (1 - beta) * theta, on the EMA stages' parameters
      only, called after the optimiser step. BatchNorm running statistics are buffers, not
      parameters: they are not averaged; each EMA copy keeps its own, from its own train-mode
      forward passes (as in solo-learn and BYOL).
    """

    def __init__(self, online: Encoder, ema_stages):
        super().__init__()
        self.ema_stages = list(ema_stages)
        # The online stages, by reference: a plain dict, so they are not submodules of the target
        # (not saved twice, not moved twice); nn.ModuleDict below registers the EMA copies.
        self.online_stages = online.stages()
        self.ema = nn.ModuleDict({s: copy.deepcopy(self.online_stages[s]) for s in self.ema_stages})
        self.ema.requires_grad_(False)

    def stages(self):
        """{stage name: module} as the target sees it: the EMA copy if listed, else the online module."""
        return {s: self.ema[s] if s in self.ema else m for s, m in self.online_stages.items()}

    @torch.no_grad()
    def forward(self, inputs):
        """The target's output for one view, from `inputs`, the online network's activations on that
        view (the third value `Encoder.forward` returns)."""
        if not self.ema_stages:  # --ema-stages none: the target is the online output under stop-gradient
            return inputs["output"].detach()
        start = self.ema_stages[0]  # every stage before the first EMA stage is shared: reuse its input
        return self._run_from(start, inputs[start].detach())

    @torch.no_grad()
    def from_image(self, x):
        """The target's output for an image the online network did not see: every stage runs."""
        return self._run_from("conv1", x)

    def _run_from(self, start, h):
        stages = self.stages()
        shared = [m for s, m in stages.items() if s not in self.ema and STAGES.index(s) >= STAGES.index(start)]
        with running_stats_frozen(shared):  # the target's passes leave the online BatchNorm statistics alone
            return run_stages(stages, h, start)["output"]

    def parameter_pairs(self):
        """(xi, theta) for every parameter of every EMA stage: two lists, in the same order."""
        xi = [p for s in self.ema_stages for p in self.ema[s].parameters()]
        theta = [p for s in self.ema_stages for p in self.online_stages[s].parameters()]
        return xi, theta

    @torch.no_grad()
    def update(self, beta):
        """Eq. (6): xi <- beta * xi + (1 - beta) * theta, for the listed stages only."""
        if beta == 1.0:  # a frozen target, left bit-identical
            return
        xi, theta = self.parameter_pairs()  # empty with --ema-stages none: nothing to average
        for xi_p, theta_p in zip(xi, theta):
            xi_p.mul_(beta).add_(theta_p, alpha=1.0 - beta)

    def num_parameters(self):
        return sum(p.numel() for p in self.ema.parameters())


# ----------------------------------------------------------------------------------------
# 3. Evaluation: the online linear probe, weighted kNN
# ----------------------------------------------------------------------------------------
def probe_loss(probe, features, labels):
    """Cross-entropy of the online linear probe on *detached* backbone features of each view,
    averaged over views (solo-learn). Unlabelled images (label -1) are skipped."""
    labelled = labels >= 0
    losses = [F.cross_entropy(probe(f.detach().float()), labels.clamp(min=0), reduction="none") for f in features]
    return sum((loss * labelled).sum() for loss in losses) / (len(features) * labelled.sum().clamp(min=1))


@torch.no_grad()
def extract_features(backbone, images, mean, std, batch_size=1024):
    """Backbone features of un-augmented images, backbone in eval mode. N x D float32."""
    was_training = backbone.training
    backbone.eval()
    device = images.device
    features = []
    for chunk in images.split(batch_size):
        x = normalize(chunk.float() / 255, mean, std).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            features.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1, chunk=1024):
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T)."""
    train_features = F.normalize(train_features, dim=1)
    k = min(k, len(train_features))
    predictions = []
    for test in F.normalize(test_features, dim=1).split(chunk):
        sim, idx = (test @ train_features.T).topk(k, dim=1)  # B x k
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


@torch.no_grad()
def evaluate(backbone, probe, data, knn=True, projector=None):
    """Test-set top-1 (%) of the online linear probe and, if knn, of weighted kNN (k=200, T=0.1) and 1-NN;
    with a projector, the collapse monitor on the test images too (output_spread, effective_rank)."""
    test_features = extract_features(backbone, data.test_images, data.mean, data.std)
    was_training = probe.training
    probe.eval()
    logits = probe(test_features)
    probe.train(was_training)
    result = {
        "linear_top1": 100.0 * (logits.argmax(1) == data.test_labels).float().mean().item(),
        "knn_top1": None,
        "knn1_top1": None,
    }
    if projector is not None:
        was_training = projector.training
        projector.eval()
        with autocast(data.test_images.device):
            z = torch.cat([projector(f) for f in test_features.split(1024)])
        projector.train(was_training)
        result["output_spread"] = output_spread(z)  # ~1 spread out, 0 collapsed
        result["feature_rank"] = effective_rank(test_features)  # dimensions in use, of backbone.feature_dim
    if knn:
        labelled = data.train_labels >= 0
        train_features = extract_features(backbone, data.train_images[labelled], data.mean, data.std)
        result.update(
            knn_accuracies(
                train_features, data.train_labels[labelled], test_features, data.test_labels, data.num_classes
            )
        )
    return result


def knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes):
    """Test top-1 (%) of weighted kNN (k = 200, T = 0.1) and of 1-NN, with the training features as memory bank."""
    result = {}
    for key, k in (("knn_top1", 200), ("knn1_top1", 1)):
        predicted = knn_predict(train_features, train_labels, test_features, num_classes, k=k)
        result[key] = 100.0 * (predicted == test_labels).float().mean().item()
    return result


# ========================================================================================
# Part II: machinery, not needed to follow the paper
# ========================================================================================


# ----------------------------------------------------------------------------------------
# 4. Setup: errors, the device, seeding
# ----------------------------------------------------------------------------------------
class ConfigError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class DivergedError(Exception):
    """The training loss became NaN or infinite; last.pt still holds the last state with a finite loss."""


class Preempted(Exception):
    """SIGTERM (a scheduler's notice before it kills a job): last.pt was saved at the end of a step."""


def run_cli(main):
    """Run `main()`; a ConfigError or DivergedError ends the program with one line on stderr and exit code 2.
    Under torchrun every process meets the same one (the same flags, files and averaged gradients), and rank
    0 alone prints it; every process leaves the process group on the way out, whatever ends it."""
    code = 0
    try:
        main()
    except (ConfigError, DivergedError) as error:
        if WORLD.main:
            print(f"error: {error}", file=sys.stderr)
        code = 2
    except Preempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        code = 143  # 128 + SIGTERM, as if the signal had ended the process
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint (last.pt) is intact; rerun with --resume", file=sys.stderr)
        code = 130
    finally:
        end_distributed()
    leave(code)


def leave(code):
    """End the program with exit code `code`. Under torchrun the process ends here, without the interpreter's
    finalisation: DistributedDataParallel keeps the (already destroyed) gloo group alive until then, and its
    teardown at that point can abort a finished run ("terminate called without an active exception", seen
    once in CI). Every file of the run is closed by now; the two streams are flushed first."""
    if WORLD.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def check_device(name):
    """--device must name a CPU or a CUDA GPU (cuda, cuda:1) that torch can use here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name} is not a device this code runs on; choose cpu or cuda (or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA GPU is visible; pass --device cpu")


def setup(device, seed, deterministic=False):
    """Check and return the device (under torchrun: this process's, init_distributed), seed torch, and
    switch on deterministic kernels if asked. Every process draws the same initial weights."""
    check_device(device)
    device = init_distributed(torch.device(device))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    return device


def to_device(modules, device):
    """Move modules to the device, in channels_last: the fast layout for convolutions on CUDA (cuDNN) and
    on the CPU (oneDNN; 1.3x the laptop step on 2 cores, tools/bench.py --efficiency, docs/small-scale.md).
    In place: an optimiser built before the move still holds the same parameters."""
    for m in modules:
        m.to(device)
        m.to(memory_format=torch.channels_last)


def autocast(device):
    """bf16 autocast on CUDA; a no-op on CPU (exact float32, for tests and determinism)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compile_stages(models, enabled=True, **compile_options):
    """--compile: torch.compile each stage of the encoders (online stages and EMA copies) and each
    other module with a forward (predictor, probe), one module at a time, in place.

    Stage by stage, so that the named stages and activation reuse work as without it; in place
    (each module's forward is replaced by its compiled version), so that state_dict keys stay as
    they are and a checkpoint loads with or without --compile; the forward hooks of
    `ForwardCounter` and `Instruments` stay outside the compiled code.
    """
    if not enabled:
        return
    # Modules of one class share one forward code object (nn.Sequential's), and dynamo caps the variants
    # of one code object at 8: stages x train/eval x with/without gradients need more.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for model in models:
        if isinstance(model, Encoder):
            modules = model.stages().values()
        elif isinstance(model, NamedStageEMA):
            modules = model.ema.values()
        else:  # queues and centres have no forward to compile
            modules = [model] if type(model).forward is not nn.Module.forward else []
        for module in modules:
            module.forward = torch.compile(module.forward, **compile_options)


def timer(device):
    """A timestamp in seconds, taken after the device has finished its queued work (so GPU work is counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------
# 5. The run: what every method file's loop needs and a reader of the paper does not
# ----------------------------------------------------------------------------------------
def load_data(args, device):
    """The dataset the flags name (--dataset, --data-dir, --train-subset, --eval-split, ...): load_dataset."""
    return load_dataset(
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


class Run:
    """Everything around a method's training step: a method file writes

        run = common.Run(args, data, view_recipes, models, optimizer)
        for (x_1, x_2), y in run.batches():
            ...                       # the method's step: forward, loss, backward, optimizer.step()
            target.update(run.beta)   # Eq. (6)
            run.end_step(loss)

    and Run does the rest, in this order: it counts backbone forwards (Table 4's #Fwd), takes the run
    directory and resumes from last.pt (--resume); batches() draws each epoch's image order from one
    generator, sets the learning rate of each step (warm-up, cosine) and the step's beta (run.beta, the
    --beta-schedule), yields the step's views; end_step() adds the loss to the epoch's tally, records the
    instruments and draws the progress line; between steps it writes mid-epoch checkpoints
    (--checkpoint-every, SIGTERM); at each epoch's end it evaluates (probe, kNN every --eval-every
    epochs), saves last.pt and logs metrics.jsonl and the epoch line; at the end it prints the summary.
    run.epoch is the current epoch (from 0), for methods whose step depends on it (DINO).

    Under torchrun (section 12) each of the N processes takes batch / N images of every global batch;
    the schedules follow the global step; rank 0 alone evaluates, writes the run directory and prints.
    The method file wraps what trains in DDP with run.data_parallel(...)."""

    def __init__(self, args, data, view_recipes, models, optimizer):
        self.args, self.data, self.models, self.optimizer = args, data, models, optimizer
        self.online, self.target, self.probe = models["online"], models["target"], models["probe"]
        self.device = data.train_images.device
        check_world(args)  # under torchrun: the global batch divides among the processes
        sync_batch_norm(args, models.values(), self.device)  # under torchrun on GPUs: SyncBatchNorm
        self.counter = ForwardCounter(self.online, self.target, data.image_size)  # measures "#Fwd" of Table 4
        compile_stages(models.values(), args.compile)  # --compile: torch.compile each stage in place
        # the step, this epoch's image order and loss sum, the metrics history; with --resume from last.pt.
        # One generator draws all randomness: the epoch's order and every augmentation. Under torchrun every
        # process draws the same order from it, and its augmentations from a generator of its own.
        self.generator = torch.Generator(self.device).manual_seed(args.seed)
        self.augment_generator = self.generator
        if WORLD.size > 1:
            own_seed = (args.seed + 104729 * (WORLD.rank + 1)) % 2**63  # the seed shifted by a prime per rank
            self.augment_generator = torch.Generator(self.device).manual_seed(own_seed)
        self.state = start_or_resume(args, models, optimizer, self.augment_generator, self.device, self.generator)
        # batch i's views (this process's share of it), augmented --aug-chunk batches at a time
        self.views = Views(data, view_recipes, args.batch_size, args.aug_chunk, self.augment_generator, WORLD)
        # --log-grad-norms, --track-weights (measured on rank 0's share of each batch)
        fixed = None
        if args.log_target_drift:  # the fixed batch of --log-target-drift: the first training images, as evaluated
            fixed = normalize(data.train_images[: Instruments.DRIFT_IMAGES].float() / 255, data.mean, data.std)
            fixed = fixed.contiguous(memory_format=torch.channels_last)
        self.instruments = Instruments(
            args, self.online, self.target, enabled=WORLD.main, fixed_images=fixed, counter=self.counter
        )
        self.logger = on_rank_0(lambda: RunLogger(args, self.state, self.instruments))
        self.steps_per_epoch = steps_per_epoch(data, args.batch_size)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, args.max_steps or self.total_steps)
        self.warmup_steps = args.warmup_epochs * self.steps_per_epoch
        self.epoch = self.state.step // self.steps_per_epoch
        self.lr = self.beta = None

    def batches(self):
        """Yield (views, labels) for every step left in the run: the views as the recipes list them."""
        run, args = self.state, self.args
        while run.step < self.last_step:
            self.epoch, first_batch = divmod(run.step, self.steps_per_epoch)
            if first_batch == 0:  # a new epoch: a new order of the training images, and a fresh loss tally
                run.order = torch.randperm(len(self.data.train_images), generator=self.generator, device=self.device)
                run.loss_sum.zero_()
            for model in self.models.values():
                model.train()
            self.counter.reset()
            start = timer(self.device)
            for i in range(first_batch, self.steps_per_epoch):
                self.batch = i
                views, labels = self.views.batch(run.order, self.epoch, i)
                self.lr = set_learning_rate(self.optimizer, run.step, self.total_steps, self.warmup_steps)
                self.beta = beta_at(run.step, self.total_steps, args.beta, args.beta_final, args.beta_schedule)
                yield views, labels
                if run.step >= self.last_step:
                    break
                if checkpoint_due(args, run.step) and i + 1 < self.steps_per_epoch:  # --checkpoint-every, SIGTERM
                    self.save()  # inside the epoch
                    exit_if_stopped(args, run)  # after a SIGTERM: last.pt holds this step; exit for --resume
            self.end_epoch(first_batch, start)
        check_processes_agree(self.models)  # under torchrun: every process holds the same model
        if WORLD.main:
            print(summary_line(args, self.logger.last))

    def data_parallel(self, *modules):
        """The modules that train, for the method's step: in DDP under torchrun, themselves otherwise."""
        return data_parallel(self.device, *modules)

    def end_step(self, loss):
        """After the method's step: the loss into the epoch's tally, the instruments, the progress line."""
        self.state.loss_sum += loss.detach()  # summed on the device: no host synchronisation per step
        self.state.step += 1
        self.instruments.record(self.state.step)  # does nothing unless an instrument is on
        if WORLD.main:
            self.logger.progress(self.batch, self.steps_per_epoch, loss)

    def end_epoch(self, first_batch, start):
        """End of the epoch (or of --max-steps): evaluate, save last.pt, log."""
        run, epoch = self.state, self.epoch
        steps_this_epoch = run.step - epoch * self.steps_per_epoch  # including those before a resume
        loss = mean_over_processes(run.loss_sum) / steps_this_epoch  # over every process's share of the batches
        epoch_complete = run.step % self.steps_per_epoch == 0  # False when --max-steps stopped the run inside it
        if WORLD.main:  # (under torchrun, rank 0 alone evaluates and logs)
            metrics = epoch_metrics(
                epoch=epoch + 1,
                step=run.step,
                loss=loss.item(),
                lr=self.lr,
                beta=self.beta,
                seconds=timer(self.device) - start,
                images_seen=(steps_this_epoch - first_batch) * self.args.batch_size,
                online=self.online,
                target=self.target,
                probe=self.probe,
                data=self.data,
                counter=self.counter,
                run_knn=(epoch + 1) % self.args.eval_every == 0 or run.step == self.last_step,
            )
            if epoch_complete:
                run.history.append(metrics)
        self.save()  # refuses a NaN loss
        if WORLD.main:
            self.logger.log_epoch(metrics, run.history, provisional=not epoch_complete)  # metrics.jsonl, epoch line
        if run.step < self.last_step:
            exit_if_stopped(self.args, run)

    def save(self):
        save_checkpoint(
            self.args, self.state, self.models, self.optimizer, self.views, self.instruments, self.generator
        )


# ----------------------------------------------------------------------------------------
# 6. Data: whole datasets as uint8 tensors (N, 3, H, W) on the run device
# ----------------------------------------------------------------------------------------
DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "synthetic")


@dataclass
class Data:
    train_images: torch.Tensor  # N x 3 x H x W, uint8
    train_labels: torch.Tensor  # N, int64; -1 marks an unlabelled image (STL-10's unlabeled split)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # 3, per-channel mean of the training images in [0, 1]
    std: torch.Tensor

    @property
    def image_size(self):
        return self.train_images.shape[-1]


def _torchvision_dataset(name, root, download):
    import torchvision

    try:
        if name == "stl10":
            train = torchvision.datasets.STL10(root, split="train+unlabeled", download=download)
            test = torchvision.datasets.STL10(root, split="test", download=download)
            return (
                torch.from_numpy(train.data),
                torch.from_numpy(train.labels).long(),
                torch.from_numpy(test.data),
                torch.from_numpy(test.labels).long(),
                10,
            )
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        hint = "drop --no-download to fetch it" if not download else "check the folder"
        raise ConfigError(
            f"{name} not found under --data-dir {root} ({error}); {hint}, or point --data-dir at a copy"
        ) from None
    except OSError as error:  # no network, DNS failure, refused connection, disk full
        raise ConfigError(
            f"could not download {name} into {root} ({error.__class__.__name__}: {error}); "
            f"copy the dataset there from a machine with internet and pass --no-download"
        ) from None
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # N x H x W x 3 -> N x 3 x H x W
    return (
        to_tensor(train.data),
        torch.tensor(train.targets),
        to_tensor(test.data),
        torch.tensor(test.targets),
        len(train.classes),
    )


def images_per_class(size, num_classes, flag):
    """size / num_classes, for a flag that takes the same number of images of every class."""
    if size % num_classes or size < num_classes:
        raise ConfigError(
            f"{flag} {size} is not a positive multiple of the {num_classes} classes; "
            f"choose e.g. {num_classes * max(size // num_classes, 1)}"
        )
    return size // num_classes


def first_per_class(labels, subset, num_classes):
    """Indices of the first subset / num_classes images of each class, in dataset order (--train-subset).
    Unlabelled images (label -1) are never chosen."""
    labels = torch.as_tensor(labels)
    per_class = images_per_class(subset, num_classes, "--train-subset")
    chosen = []
    for c in range(num_classes):
        of_class = (labels == c).nonzero().flatten()
        if len(of_class) < per_class:
            raise ConfigError(
                f"--train-subset {subset} asks for {per_class} images of class {c}, which has only "
                f"{len(of_class)}; choose at most {num_classes * len(of_class)}"
            )
        chosen.append(of_class[:per_class])
    return torch.cat(chosen).sort().values  # dataset order, not class order


def split_train_val(labels, num_classes, train_subset=None, val_size=None):
    """Indices (train, val) into a training split: --train-subset and --eval-split val.

    val (None without val_size): the *last* val_size / classes images of each class, in dataset
    order, so that they never overlap the training subset, which takes the first ones. Without a
    subset, training uses every image that is not a validation image. Unlabelled images (-1) are
    never validation images and train only when there is no subset."""
    labels = torch.as_tensor(labels)
    if val_size is None:
        train = first_per_class(labels, train_subset, num_classes) if train_subset else torch.arange(len(labels))
        return train, None
    per_class = images_per_class(val_size, num_classes, "--val-size")
    val = []
    for c in range(num_classes):
        of_class = (labels == c).nonzero().flatten()
        taken = (train_subset // num_classes) if train_subset else 1  # at least one image of each class trains
        if len(of_class) < taken + per_class:
            raise ConfigError(
                f"--val-size {val_size} and --train-subset {train_subset} need {taken + per_class} images of "
                f"class {c}, which has {len(of_class)}; lower --val-size or --train-subset"
            )
        val.append(of_class[len(of_class) - per_class :])
    val = torch.cat(val).sort().values
    if train_subset:
        train = first_per_class(labels, train_subset, num_classes)
    else:
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[val] = False
        train = keep.nonzero().flatten()
    return train, val


def _image_folder(root, image_size, subset=None, val_size=None):
    """train/<class>/*.{jpg,png}, and val/<class>/... or test/<class>/..., resized to image_size.
    Only the images a run uses are decoded (see split_train_val). With val_size, the held-out
    training images take the place of the test split, and the test folder is not read."""
    import torchvision
    from PIL import Image

    root = Path(root)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ConfigError(
            f"--data-dir {root} needs train/ and val/ (or test/) sub-folders, each with one folder of images per class"
        )

    def folder_of(split_dir):
        try:
            return torchvision.datasets.ImageFolder(str(split_dir))
        except (FileNotFoundError, RuntimeError) as error:
            raise ConfigError(f"no images in {split_dir} ({error}); put images in {split_dir}/<class>/") from None

    def decode(samples):
        images = []
        for path, _ in samples:
            try:
                with Image.open(path) as opened:
                    img = opened.convert("RGB")
            except OSError as error:  # a corrupt, empty or unreadable file (PIL's UnidentifiedImageError too)
                reason = error.strerror or "not an image that PIL can decode"
                raise ConfigError(f"cannot read the image {path} ({reason}); delete or replace it") from None
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BICUBIC)
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3))
        return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([label for _, label in samples])

    train = folder_of(root / "train")
    train_idx, val_idx = split_train_val(train.targets, len(train.classes), subset, val_size)
    train_x, train_y = decode([train.samples[i] for i in train_idx.tolist()])
    if val_idx is not None:  # --eval-split val
        test_x, test_y = decode([train.samples[i] for i in val_idx.tolist()])
        return train_x, train_y, test_x, test_y, len(train.classes)
    test = folder_of(test_dir)
    if test.classes != train.classes:
        raise ConfigError(
            f"the class folders of {root / 'train'} and {test_dir} differ; give both the same class names"
        )
    test_x, test_y = decode(test.samples)
    return train_x, train_y, test_x, test_y, len(train.classes)


def _synthetic(num_train, image_size, seed=0):
    """Random images whose colour depends on the class, so that kNN has something to find."""
    g = torch.Generator().manual_seed(seed)
    num_test, num_classes = max(num_train // 2, 10), 10
    colours = torch.rand(num_classes, 3, 1, 1, generator=g)

    def make(n):
        labels = torch.arange(n) % num_classes
        noise = torch.rand(n, 3, image_size, image_size, generator=g)
        return ((0.6 * colours[labels] + 0.4 * noise) * 255).round().to(torch.uint8), labels

    (train_x, train_y), (test_x, test_y) = make(num_train), make(num_test)
    return train_x, train_y, test_x, test_y, num_classes


def load_dataset(
    name,
    data_dir,
    device,
    *,
    image_size=None,
    train_subset=None,
    eval_split="test",
    val_size=10000,
    download=True,
    synthetic_size=512,
    seed=0,
):
    """Load a dataset (--dataset) into memory on `device`. Returns a Data.

    image_size: imagefolder and synthetic only (None: 32). train_subset: the first N / classes
    training images of each class. eval_split "val": evaluate on the last val_size / classes
    training images of each class instead of the test split (they are never trained on; choose
    recipes there, and report the test split once per chosen recipe). synthetic_size and seed:
    the synthetic dataset's size and seed."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if eval_split not in ("test", "val"):
        raise ConfigError(f"--eval-split {eval_split!r}: choose test or val")
    val = val_size if eval_split == "val" else None
    if name == "synthetic":
        parts = _synthetic(synthetic_size, image_size or 32, seed)
    elif name == "imagefolder":
        if not data_dir or not Path(data_dir).is_dir():
            raise ConfigError(
                f"--dataset imagefolder needs --data-dir pointing at a folder with train/ and val/ or test/ "
                f"(got {data_dir!r})"
            )
        parts = _image_folder(data_dir, image_size or 32, train_subset, val)
    else:
        parts = _torchvision_dataset(name, data_dir, download)
    train_x, train_y, test_x, test_y, num_classes = parts
    if name != "imagefolder" and (train_subset is not None or val is not None):  # (folders chose before decoding)
        keep, held_out = split_train_val(train_y, num_classes, train_subset, val)
        if held_out is not None:
            test_x, test_y = train_x[held_out], train_y[held_out]
        train_x, train_y = train_x[keep], train_y[keep]
    if len(train_x) == 0 or len(test_x) == 0:
        raise ConfigError(f"--dataset {name} has an empty train or test split; check --data-dir")
    # Per-channel statistics of the training images (for CIFAR these are solo-learn's constants).
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for chunk in train_x.split(8192):
        chunk = chunk.double() / 255
        total += chunk.sum((0, 2, 3))
        total_sq += (chunk**2).sum((0, 2, 3))
    count = train_x.numel() / 3
    mean = total / count
    std = (total_sq / count - mean**2).sqrt()
    return Data(
        train_x.to(device),
        train_y.long().to(device),
        test_x.to(device),
        test_y.long().to(device),
        num_classes,
        mean.float().to(device),
        std.float().to(device),
    )


def steps_per_epoch(data, batch_size):
    """Full batches per epoch (the last, incomplete batch is dropped, as solo-learn does)."""
    if batch_size > len(data.train_images):
        raise ConfigError(
            f"--batch-size {batch_size} is larger than the {len(data.train_images)} training images; lower --batch-size"
        )
    return len(data.train_images) // batch_size


# ----------------------------------------------------------------------------------------
# 7. Augmentation: batched, with per-sample random parameters, in plain torch
# ----------------------------------------------------------------------------------------
# torchvision.transforms.v2 draws one set of parameters per call, so it cannot augment a
# batch of SSL views. Each primitive below takes per-sample parameters and is tested against
# torchvision's per-image op with the same parameters (test_all.py). Images are floats in [0, 1].


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation, applied in solo-learn's order:
    crop -> colour jitter -> grayscale -> blur -> solarise -> flip -> normalise."""

    size: int = 32
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 13  # covers +-3 sigma for sigma <= 2
    solarize_p: float = 0.0
    flip_p: float = 0.5


def _uniform(low, high, n, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def sample_crop_params(n, height, width, scale, ratio, generator, device="cpu", attempts=10):
    """RandomResizedCrop's parameters for n images, drawn as torchvision draws them per image.

    Up to 10 attempts of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first
    that fits is used; otherwise a centre crop with the ratio clamped. Returns top, left,
    height, width: four int64 tensors of shape (n,).
    """
    area = height * width
    target_area = area * _uniform(scale[0], scale[1], n * attempts, generator, device).view(n, attempts)
    log_ratio = _uniform(math.log(ratio[0]), math.log(ratio[1]), n * attempts, generator, device).view(n, attempts)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first attempt that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # The fallback when no attempt fits: the largest centre crop with the ratio clamped into range.
    in_ratio = width / height
    fw, fh = (
        (width, round(width / ratio[0]))
        if in_ratio < ratio[0]
        else (round(height * ratio[1]), height)
        if in_ratio > ratio[1]
        else (width, height)
    )
    ok = fits.any(dim=1)
    w = torch.where(ok, w, torch.full_like(w, fw)).long()
    h = torch.where(ok, h, torch.full_like(h, fh)).long()
    u_top, u_left = torch.rand(2, n, generator=generator, device=device)
    top = torch.where(ok, (u_top * (height - h + 1)).floor().long(), (height - h) // 2)
    left = torch.where(ok, (u_left * (width - w + 1)).floor().long(), (width - w) // 2)
    return top, left, h, w


def _source_coords(start, length, size):
    """Bilinear source coordinates (align_corners=False) for resizing a 1-D window to `size`.

    start, length: (n,) window offsets and lengths. Returns low index, high index and the weight
    of the high one, each (n, size), as torch's bilinear interpolation computes them.
    """
    out = torch.arange(size, device=start.device, dtype=torch.float32)
    scale = length.float()[:, None] / size
    src = ((out + 0.5) * scale - 0.5).clamp(min=0)  # n x size, in window coordinates
    low = src.floor().long()
    low = torch.minimum(low, length[:, None] - 1)
    high = torch.minimum(low + 1, length[:, None] - 1)
    return start[:, None] + low, start[:, None] + high, src - low


def resize_matrices(start, length, size, in_size, flip=None):
    """n x size x in_size matrices M with (M @ v) = v[start:start + length] resized to `size` samples
    (bilinear): each row holds the two weights of one output sample. Where `flip` is True the rows
    come in reverse order, which mirrors the output."""
    low, high, w_high = _source_coords(start, length, size)  # n x size each
    if flip is not None:  # output sample j takes the coordinates of sample size - 1 - j
        low, high, w_high = (torch.where(flip[:, None], t.flip(1), t) for t in (low, high, w_high))
    matrices = torch.zeros(len(start), size, in_size, device=start.device)
    matrices.scatter_add_(2, low[..., None], (1 - w_high)[..., None])
    matrices.scatter_add_(2, high[..., None], w_high[..., None])  # adds up where low = high (the edge)
    return matrices


def resized_crop(images, top, left, height, width, size, flip=None):
    """Crop each image to its own window and resize it to size x size (bilinear), flipping where
    `flip` is True. Equals torchvision's resized_crop + hflip per image, for the same parameters.

    Bilinear resizing is linear along each axis, so it is two batched matrix products per image,
    out = R @ image @ C^T, with R and C from `resize_matrices` -- cheaper than gathering pixels.
    (TF32, which `setup` switches on for CUDA matmuls, keeps 10 mantissa bits: on a GPU the crop
    is then exact to about 1e-3, a quarter of one uint8 grey level.)
    """
    n, c, in_height, in_width = images.shape
    rows = resize_matrices(top, height, size, in_height)  # n x size x H
    cols = resize_matrices(left, width, size, in_width, flip)  # n x size x W
    x = torch.bmm(images.reshape(n, c * in_height, in_width), cols.transpose(1, 2))  # n x cH x size: columns resampled
    return rows[:, None] @ x.view(n, c, in_height, size)  # n x c x size x size: rows resampled


def to_grayscale(x):
    """ITU-R 601-2 luma, as torchvision, repeated over 3 channels."""
    gray = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return gray.expand_as(x)


def _blend(x, other, factor, in_place=False):
    """factor * x + (1 - factor) * other, clamped to [0, 1], one factor per image. Computed as
    torch.lerp does, x + (1 - factor) * (other - x): factor 1 leaves x exactly as it is.
    in_place=True overwrites x (color_jitter's own buffer) instead of allocating another image."""
    weight = (1 - factor).view(-1, 1, 1, 1)
    return (x.lerp_(other, weight) if in_place else torch.lerp(x, other, weight)).clamp_(0, 1)


def adjust_brightness_contrast_or_saturation(x, op, factor, in_place=False):
    """Per image, brightness (op 0), contrast (op 1) or saturation (op 2) -- in one pass, because
    all three blend the image with something: black, its mean grey, or its grey image."""
    gray = to_grayscale(x)[:, :1]  # n x 1 x H x W
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # n x 1 x 1 x 1
    is_op = lambda k: (op == k).to(x.dtype).view(-1, 1, 1, 1)  # 1.0 for the images doing op k, else 0.0
    return _blend(x, is_op(1) * mean + is_op(2) * gray, factor, in_place)


def adjust_hue(x, shift):
    """Rotate hue by `shift` (a fraction of the colour wheel, in [-0.5, 0.5]); value and chroma stay.

    RGB -> HSV's hexagonal hue (in sixths of the wheel), shift it, then HSV -> RGB in closed form:
    channel = value - chroma * clamp(min(k, 4 - k), 0, 1) with k = (offset + 6 * hue) mod 6 and
    offsets 5, 3, 1 for r, g, b. Equals torchvision's adjust_hue to float rounding.
    """
    r, g, b = x.unbind(1)  # n x H x W each
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)  # = value * saturation
    safe = chroma.clamp(min=1e-12)  # a grey pixel has no hue: any finite one will do, times chroma 0
    # Which channel is the largest, as 0/1 floats: cheaper than torch.where on the CPU. Ties go to r, then g.
    is_r = 1 - torch.sign(value - r)
    is_g = (1 - is_r) * (1 - torch.sign(value - g))
    hue = is_r * ((g - b) / safe) + is_g * (2 + (b - r) / safe) + (1 - is_r - is_g) * (4 + (r - g) / safe)  # in [-1, 5)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1 (no host-to-GPU copy)
    k = (offsets + (hue + 6 * shift.view(-1, 1, 1))[:, None]).remainder_(6)  # n x 3 x H x W
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(value[:, None], chroma[:, None], weight, value=-1)  # value - chroma * weight


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision's kernel)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c) x k
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x, threshold=128 / 255):
    """Invert pixels at or above the threshold (PIL's solarize at 128)."""
    return torch.where(x >= threshold, 1.0 - x, x)


def _apply_to(x, selected, op, *per_image_args, masked=None):
    """x[selected] = op(x[selected], ...) for the images picked by the boolean mask `selected`.

    On the CPU only the selected images are computed. On CUDA every image is computed and
    torch.where keeps the selected results: picking a subset would need its size on the host,
    a synchronisation that stalls the GPU; computing a little more does not. Same result.
    """
    use_mask = x.is_cuda if masked is None else masked
    if use_mask:
        return torch.where(selected.view(-1, 1, 1, 1), op(x, *per_image_args), x)
    index = selected.nonzero().squeeze(1)
    if len(index):
        x[index] = op(x[index], *(a[index] for a in per_image_args))
    return x


def color_jitter(x, recipe, generator):
    """Brightness, contrast, saturation and hue with probability p, in a random order per image.

    In each of the 4 slots every jittered image takes one op: the three blends run in one pass
    over the batch, then hue on the images whose op it is. Works on x in place (augment's own).
    """
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=generator, device=dev) < recipe.jitter_p
    b, c, s, hue = recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue
    factors = torch.stack(
        [
            _uniform(max(0.0, 1 - b), 1 + b, n, generator, dev),
            _uniform(max(0.0, 1 - c), 1 + c, n, generator, dev),
            _uniform(max(0.0, 1 - s), 1 + s, n, generator, dev),
            _uniform(-hue, hue, n, generator, dev),
        ],
        dim=1,
    )
    order = torch.rand(n, 4, generator=generator, device=dev).argsort(dim=1)  # a random order of the 4 ops per image
    for slot in range(4):
        op = order[:, slot]  # n: the op each image takes in this slot, 0..3 = brightness, contrast, saturation, hue
        # Blend every image, with factor 1 (no change) where this slot has no blend for it: cheaper than picking them.
        blend_factor = torch.where(apply & (op < 3), factors.gather(1, op[:, None]).squeeze(1), 1.0)
        x = adjust_brightness_contrast_or_saturation(x, op, blend_factor, in_place=True)
        if hue > 0:
            x = _apply_to(x, apply & (op == 3), adjust_hue, factors[:, 3])
    return x


def augment(images, recipe, mean, std, generator):
    """One view of a batch: uint8 N x 3 x H x W in, normalised float N x 3 x size x size out."""
    n, _, height, width = images.shape
    dev = images.device
    rand = lambda: torch.rand(n, generator=generator, device=dev)
    top, left, h, w = sample_crop_params(n, height, width, recipe.crop_scale, recipe.crop_ratio, generator, dev)
    flip = rand() < recipe.flip_p
    x = resized_crop(images.float().div_(255), top, left, h, w, recipe.size, flip)  # crop and flip in one resampling
    x = color_jitter(x, recipe, generator)
    x = _apply_to(x, rand() < recipe.gray_p, to_grayscale)
    sigma = _uniform(recipe.blur_sigma[0], recipe.blur_sigma[1], n, generator, dev)
    x = _apply_to(x, rand() < recipe.blur_p, lambda v, s: gaussian_blur(v, s, recipe.blur_kernel), sigma)
    x = _apply_to(x, rand() < recipe.solarize_p, solarize)
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))  # normalise in place: x is this function's own
    return x.contiguous(memory_format=torch.channels_last)  # the layout of the models (to_device)


def normalize(x, mean, std):
    return (x - mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


class Views:
    """The random views of each training batch, augmented --aug-chunk batches at a time.

    `batch(order, epoch, i)` gives batch i's views (one tensor per recipe, in the recipes' order)
    and its labels. Augmenting a chunk of batches in one go runs each of augment's few dozen
    small kernels once for the whole chunk instead of once per batch: on a GPU, where a batch of
    32x32 images is too small to keep the device busy, that saves most of the launch overhead.

    Every draw comes from the run's generator, chunk after chunk: with --aug-chunk 1 they are
    exactly the draws of augmenting each batch on its own. For an exact resume, a checkpoint
    taken inside a chunk stores the generator as it was at the chunk's start (`generator_state`):
    the resumed run draws that chunk again, identically, and goes on from the batch it stopped at.

    Under torchrun (world: WORLD) batch_size is the global batch, and each process augments and returns
    its own share of every batch: images rank * n .. (rank + 1) * n - 1 of it, n = batch_size / N.
    """

    def __init__(self, data, recipes, batch_size, chunk, generator, world=None):
        self.data, self.recipes, self.global_batch, self.chunk, self.generator = (
            data,
            list(recipes),
            batch_size,
            chunk,
            generator,
        )
        self.rank, self.world_size = (world.rank, world.size) if world is not None else (0, 1)
        self.batch_size = batch_size // self.world_size  # this process's images per batch
        self.span = None  # (epoch, first batch, end batch) of the chunk held in self.views
        self.views, self.labels = [], None
        self.state_at_chunk_start, self.next_batch = None, None

    def batch(self, order, epoch, i):
        if self.span is None or self.span[0] != epoch or not self.span[1] <= i < self.span[2]:
            self._augment_chunk(order, epoch, i // self.chunk * self.chunk)
        rows = slice((i - self.span[1]) * self.batch_size, (i - self.span[1] + 1) * self.batch_size)
        self.next_batch = i + 1
        return [view[rows] for view in self.views], self.labels[rows]

    def _augment_chunk(self, order, epoch, first):
        end = min(first + self.chunk, len(order) // self.global_batch)  # the last chunk of an epoch may be shorter
        self.views, self.labels = [], None  # free the last chunk before making the next
        self.state_at_chunk_start = self.generator.get_state()
        index = order[first * self.global_batch : end * self.global_batch]
        if self.world_size > 1:  # this process's share of each batch of the chunk
            n = self.batch_size
            index = index.view(end - first, self.global_batch)[:, self.rank * n : (self.rank + 1) * n].reshape(-1)
        images, mean, std = self.data.train_images[index], self.data.mean, self.data.std
        self.views = [augment(images, recipe, mean, std, self.generator) for recipe in self.recipes]
        self.labels, self.span = self.data.train_labels[index], (epoch, first, end)

    def generator_state(self):
        """The generator's state for a checkpoint: as at the start of the chunk in progress, if one is."""
        inside_chunk = self.span is not None and self.next_batch < self.span[2]
        return self.state_at_chunk_start if inside_chunk else self.generator.get_state()


# ----------------------------------------------------------------------------------------
# 8. Optimisation: LARS, parameter groups, warm-up + cosine learning rate
# ----------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), configured as solo-learn's CIFAR runs.

    For each parameter w of a group with lars=True: trust = eta * |w| / (|grad| + wd * |w|),
    clipped (clip=True) so that the step never exceeds plain SGD's: d = (grad + wd * w) * min(trust / lr, 1).
    Groups with lars=False (biases, BatchNorm, the probe) take plain SGD steps, d = grad.
    Then buf = momentum * buf + d and w <- w - lr * buf.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.02, clip=True):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip, lars=True)
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                wd, lr = group["weight_decay"], group["lr"]
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
                if group["clip"]:
                    trust = (trust / lr).clamp(max=1.0)
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                updates = torch._foreach_add(grads, params, alpha=wd)
                torch._foreach_mul_(updates, list(trust.unbind(0)))
            else:
                updates = grads
            buffers = []
            for p, d in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def param_groups(modules, weight_decay):
    """LARS's two groups: weights (decayed, LARS-scaled) and 1-D parameters -- biases and BatchNorm
    (no weight decay and no trust ratio: solo-learn's exclude_bias_n_norm)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars": False},
    ]


def learning_rate_factor(step, total_steps, warmup_steps):
    """Linear warm-up to 1 over warmup_steps, then cosine decay to 0, per step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_learning_rate(optimizer, step, total_steps, warmup_steps):
    """Every group's lr = its base_lr (default: the group's initial lr) x the schedule's factor."""
    factor = learning_rate_factor(step, total_steps, warmup_steps)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        if not group.get("fixed_lr", False):  # SimSiam's predictor keeps its lr
            group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ----------------------------------------------------------------------------------------
# 9. Measurement: the instruments (Fig. 2, 5), backbone forwards per image (Table 4), collapse, the epoch metrics
# ----------------------------------------------------------------------------------------
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

    def __init__(self, args, online, target, enabled=True, fixed_images=None, counter=None):
        self.log_grad_norms, self.rows = (args.log_grad_norms, args.track_weights) if enabled else (False, 0)
        self.drift = enabled and args.log_target_drift
        self.online, self.target, self.counter = online, target, counter
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
            self.pending["grad_norms"].append((step, torch.stack([self.current[s] for s in STAGES])))
            self.current = {}
        if self.rows:
            self._record_weights(step)
        if self.drift:
            now = self._outputs()
            moved = [(n - before).norm(dim=1).mean() for n, before in zip(now, self.before)]  # online, target
            self.pending["target_drift"].append((step, torch.stack(moved)))
            self.before = now

    @torch.no_grad()
    def _outputs(self):
        """The l2-normalised outputs of the online network and of the target on the fixed batch, in training
        mode, leaving every running statistic, the forward counter and the modules' modes as they were."""
        modules = [*self.online.stages().values(), *self.target.ema.values()]
        with running_stats_frozen(modules), self.counter.paused(), autocast(self.fixed_images.device):
            _, z, inputs = self.online(self.fixed_images)
            z_target = self.target(inputs)
        return F.normalize(z.float(), dim=1), F.normalize(z_target.float(), dim=1)

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
        for key in self.enabled():
            path = self.out_dir / self.FILES[key]
            lines = path.read_text().splitlines(keepends=True) if resume and path.exists() else []
            keep = [
                line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step
            ]  # a cut last line goes
            atomic_write(path, lambda f: f.write("".join(keep).encode()))
        if self.rows and not resume:
            self._record_weights(0)  # the starting point of each trajectory
        if self.drift:  # the outputs the first step's drift is measured from (at a resume: the checkpoint's)
            self.before = self._outputs()

    def write(self):
        """Append the records since the last write (called just before a checkpoint is saved)."""
        for key in self.enabled():
            if not self.pending[key]:
                continue
            steps = [s for s, _ in self.pending[key]]
            values = torch.stack([v for _, v in self.pending[key]]).cpu().tolist()  # one transfer per epoch
            if key == "grad_norms":
                lines = [{"step": s, **dict(zip(STAGES, v))} for s, v in zip(steps, values)]
            elif key == "target_drift":
                lines = [{"step": s, "online": v[0], "target": v[1]} for s, v in zip(steps, values)]
            else:
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
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        self.flops, self.input_numel = {}, {}  # per stage, for one image of image_size
        h = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad():
            for name in BACKBONE_STAGES:
                self.input_numel[name] = h.numel()
                with FlopCounterMode(display=False) as counter:
                    h = getattr(backbone, name)(h)
                self.flops[name] = counter.get_total_flops()
        backbone.train(was_training)
        for name in BACKBONE_STAGES:
            modules = [getattr(backbone, name)] + ([target.ema[name]] if name in target.ema else [])
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


@torch.no_grad()
def output_spread(z):
    """Collapse monitor 1: how spread out the l2-normalised outputs are (SimSiam's check, Chen & He
    2021, Sec. 4.1). The per-dimension standard deviation of z / ||z|| over the images, averaged
    over the d dimensions and scaled by sqrt(d): about 1 for outputs spread like random Gaussian
    vectors, 0 when every image gets the same output direction (complete collapse)."""
    z = F.normalize(z.float(), dim=1)  # N x d, each row on the unit sphere
    return (z.std(dim=0).mean() * math.sqrt(z.shape[1])).item()


@torch.no_grad()
def effective_rank(features):
    """Collapse monitor 2: the effective rank of the N x D features (Roy & Vetterli 2007; RankMe,
    Garrido et al. 2023): exp of the entropy of the singular values normalised to sum to 1. It
    counts the dimensions in use: 1 for features of rank 1, close to D for random Gaussian ones.
    NaN for non-finite features (a diverged run), which the run's own non-finite check then reports."""
    if not torch.isfinite(features).all():
        return float("nan")
    singular_values = torch.linalg.svdvals(features.double())
    p = singular_values / singular_values.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return torch.exp(-(p * p.log()).sum()).item()


def peak_memory_mb(device):
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def epoch_metrics(*, epoch, step, loss, lr, beta, seconds, images_seen, online, target, probe, data, run_knn, counter):
    """One line of metrics.jsonl: training state, evaluation, and the cost columns of Table 4."""
    ema_params = target.num_parameters()
    return {
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "lr": lr,
        "beta": beta,
        **evaluate(online.backbone, probe, data, knn=run_knn, projector=online.projector),
        "epoch_seconds": seconds,
        "images_per_second": images_seen / seconds,
        "backbone_forwards_per_image": counter.forwards_per_image(),
        "ema_params": ema_params,
        "ema_params_mb": ema_params * 4 / 2**20,  # float32
        "peak_memory_mb": peak_memory_mb(next(online.parameters()).device),
    }


# ----------------------------------------------------------------------------------------
# 10. Arguments: the shared flags, --preset laptop, range checks
# ----------------------------------------------------------------------------------------
MAY_CHANGE_ON_RESUME = set()  # the dests of the flags defined with resume_may_change=True


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, said once: not where the help already says it, nor for a flag
    without one (default None: 'none', or a value that depends on the run)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_common_args(parser, *, lr, weight_decay, ema_stages, beta, beta_schedule, beta_final, probe_lr=0.1):
    """The flags every method file shares; each method passes its defaults."""

    def a(*flags, resume_may_change=False, **options):
        """parser.add_argument; resume_may_change: a flag that --resume may change (where the run lives and
        runs, how often it evaluates, saves and measures, and --lr: lowering it is the way on after a
        diverged loss). Every other flag changes the training, so a resume must repeat it."""
        action = parser.add_argument(*flags, **options)
        if resume_may_change:
            MAY_CHANGE_ON_RESUME.add(action.dest)

    a(
        "--preset",
        choices=("paper", "laptop"),
        default="paper",
        help="paper: the paper's recipe (the defaults shown "
        "here); laptop: a 10-minute CPU run that learns (quarter width, 10,000 images, 10 epochs, short-run values)",
        resume_may_change=True,
    )
    a("--dataset", default="cifar100", help=f"one of {', '.join(DATASETS)}")
    a(
        "--data-dir",
        default="./data",
        help="where datasets live; torchvision downloads here (imagefolder: a folder with train/ and val/ or test/)",
        resume_may_change=True,
    )
    a(
        "--no-download",
        action="store_true",
        help="never download; fail with a message if the data is absent",
        resume_may_change=True,
    )
    a(
        "--image-size",
        type=positive(int, at_most=2**10),
        default=None,
        help="imagefolder and synthetic only: image side in pixels; None means 32",
    )
    a(
        "--synthetic-size",
        type=positive(int, at_most=10**6),
        default=512,
        help="number of synthetic training images (smoke runs, benchmarks)",
    )
    a("--arch", default="resnet18", help=f"backbone: {', '.join(ARCHS)} (paper Table 5 uses resnet50)")
    a(
        "--width",
        type=positive(int, at_most=2**10),
        default=64,
        help="channels of conv1 and block1; block k has width * 2^(k-1). 64 is the "
        "paper's ResNet; 16 is the quarter-width CPU and teaching setting",
    )
    a(
        "--train-subset",
        type=positive(int),
        default=None,
        metavar="N",
        help="train on the first N / classes images of each class, in the dataset's order (the test split stays whole)",
    )
    a(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="where kNN and the probe are scored: the test split, or val, the last --val-size / classes "
        "training images of each class, never trained on (choose recipes on val, report test once)",
    )
    a(
        "--val-size",
        type=positive(int),
        default=10000,
        metavar="N",
        help="images in the validation split of --eval-split val (N / classes of each class)",
    )
    a("--epochs", type=positive(int, at_most=10**5), default=200, help="the paper trains 200 epochs")
    a(
        "--warmup-epochs",
        type=non_negative(int, at_most=10**5),
        default=None,
        help="linear learning-rate warm-up, then cosine decay per step; None "
        "means the paper's 10 of 200 epochs scaled to --epochs: 5%%, at least 1, at most 10",
    )
    a(
        "--batch-size",
        type=positive(int, at_most=2**16),
        default=256,
        help="images per step; each gives two views (the paper: 256)",
    )
    a("--lr", type=positive(float), default=lr, help="base learning rate (batch 256, one GPU)", resume_may_change=True)
    a(
        "--weight-decay",
        type=non_negative(float),
        default=weight_decay,
        help="LARS methods skip biases and BatchNorm; SGD methods decay every parameter (as solo-learn)",
    )
    a("--probe-lr", type=positive(float), default=probe_lr, help="learning rate of the online linear probe")
    a(
        "--max-steps",
        type=positive(int),
        default=None,
        help="stop after this many optimiser steps in all (smoke tests, "
        "time-boxed runs); schedules still span --epochs",
        resume_may_change=True,
    )
    a(
        "--checkpoint-every",
        type=positive(int),
        default=None,
        metavar="STEPS",
        help="also save last.pt every STEPS optimiser "
        "steps inside an epoch (long epochs: ResNet-50, STL-10, ImageFolder); None means at the end of each epoch only",
        resume_may_change=True,
    )
    a(
        "--eval-every",
        type=positive(int),
        default=10,
        help="kNN evaluation every N epochs and at the end (the linear probe is evaluated every epoch)",
        resume_may_change=True,
    )
    a(
        "--seed",
        type=non_negative(int, at_most=2**63 - 1),
        default=0,
        help="seeds model initialisation, epoch order and augmentations",
    )
    a(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (bit-exact reruns on CPU; slower on GPU)",
        resume_may_change=True,
    )
    a(
        "--aug-chunk",
        type=positive(int, at_most=2**10),
        default=None,
        metavar="N",
        help="augment N batches at a time: fewer, larger kernel "
        "launches; None means 16 on a GPU and 1 (each batch on its own) on a CPU",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile each stage module and head in place: meant for GPUs, where it speeds up "
        "steps after a warm-up of a minute or more spent compiling; rarely worth it on a CPU",
        resume_may_change=True,
    )
    a(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (bf16 autocast, channels_last) or cpu (float32)",
        resume_may_change=True,
    )
    a(
        "--no-sync-bn",
        action="store_true",
        help="under torchrun on GPUs: BatchNorm over each process's share of the batch, not the global batch",
    )
    a(
        "--out-dir",
        default=None,
        help="run directory for args.json, metrics.jsonl, last.pt; "
        "None means runs/<method>-<stages>-b<beta>-s<seed>[-laptop]",
        resume_may_change=True,
    )
    a(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its last.pt: the run in RUN_DIR, or in --out-dir if no RUN_DIR is given",
        resume_may_change=True,
    )
    a(
        "--ema-stages",
        default=ema_stages,
        help="stages of the target network kept as EMA copies: all, backbone, "
        "projector, none, or a comma list of conv1,block1,block2,block3,block4,"
        "projector (the rest share the online weights)",
    )
    a("--beta", type=fraction(), default=beta, help="EMA coefficient of Eq. (6); 0 = no momentum, 1 = frozen target")
    a(
        "--beta-schedule",
        choices=("constant", "cosine"),
        default=beta_schedule,
        help="constant, or cosine from --beta up to --beta-final over training (solo-learn)",
    )
    a("--beta-final", type=fraction(), default=beta_final, help="final beta of the cosine schedule")
    a("--bn-block4", action="store_true", help="BN1 of Table C.8: a BatchNorm on block4's output")
    a(
        "--log-grad-norms",
        action="store_true",
        help="Fig. 5: write grad_norms.jsonl, the l-inf norm of the loss's "
        "gradient w.r.t. each stage's output, every step",
        resume_may_change=True,
    )
    a(
        "--log-target-drift",
        action="store_true",
        help="the paper's stability thesis: write target_drift.jsonl, how far the online network's and the "
        "target's outputs on one fixed batch moved at each step",
        resume_may_change=True,
    )
    a(
        "--track-weights",
        type=non_negative(int, at_most=2**16),
        default=0,
        metavar="K",
        help="Fig. 2: write weights.jsonl, K rows of the "
        "projector's last linear layer (online and target) every "
        "step; use with --proj-hidden-dim 2",
        resume_may_change=True,
    )


# --preset laptop: a run of about 10 minutes on 2 CPU cores that visibly learns (README, "Learn on a
# laptop"). A quarter-width ResNet-18 on 10,000 training images for 10 epochs (390 steps at batch
# 256). The beta schedule is constant because the cosine schedule to 1.0 (or 0.999) squeezed into 390
# steps passes beta = 0.995, a target that lags 200 steps -- half the run -- by the middle of it, and
# all but freezes the target for the second half. Each method file adds its own short-run values.
LAPTOP = {
    "width": 16,
    "train_subset": 10000,
    "epochs": 10,
    "warmup_epochs": 1,
    "eval_every": 5,
    "beta_schedule": "constant",
}


def parse_method_args(parser, argv, method, laptop):
    """Parse a method file's flags. --preset laptop makes LAPTOP and the method's `laptop` values the
    defaults; flags given on the command line still win. Then check them (check_ranges, check_args)."""
    if parser.parse_known_args(argv)[0].preset == "laptop":
        parser.set_defaults(**LAPTOP, **laptop)
    args = parser.parse_args(argv)
    check_ranges(args, parser)
    return check_args(args, method)


# Each numeric flag's range travels with its definition: its argparse type is a Range (positive(int),
# non_negative(float), fraction(), ...), which parses the text and knows the values allowed. check_ranges
# then refuses NaN, inf and anything outside the range, in one line naming the flag, the range and the
# default; a test checks that every numeric flag of every script has one.
POSITIVE, NON_NEGATIVE, FRACTION = "a positive number", "zero or more", "between 0 and 1"


class Range:
    """The argparse type of a numeric flag: `kind` (int or float) parses the text; `allowed` (POSITIVE,
    NON_NEGATIVE, FRACTION) and `at_most` are the values check_ranges accepts. An upper limit guards the sizes
    that would exhaust memory or overflow a random generator before a run could say so."""

    def __init__(self, kind, allowed, at_most=None):
        self.kind, self.allowed, self.at_most = kind, allowed, at_most
        self.__name__ = kind.__name__  # argparse's message for text that does not parse: "invalid int value"

    def __call__(self, text):
        return self.kind(text)

    def contains(self, value):
        if self.allowed == POSITIVE:
            return value > 0
        if self.allowed == NON_NEGATIVE:
            return value >= 0
        return 0 <= value <= 1


def positive(kind, at_most=None):
    return Range(kind, POSITIVE, at_most)


def non_negative(kind, at_most=None):
    return Range(kind, NON_NEGATIVE, at_most)


def fraction():
    return Range(float, FRACTION)


def check_ranges(args, parser):
    """One line for a numeric flag that is NaN, infinite, or outside the range its type (a Range) allows,
    with its default."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not isinstance(action.type, Range) or value is None:  # None: left at "none" (--max-steps, ...)
            continue
        flag = max(action.option_strings, key=len)
        default = parser.get_default(action.dest)
        fix = "leave it out" if default is None else f"the default is {default}"
        if not (math.isfinite(value) and action.type.contains(value)):
            raise ConfigError(f"{flag} must be {action.type.allowed} (got {value}); {fix}")
        if isinstance(value, float) and abs(value) > torch.finfo(torch.float32).max:  # the tensors are float32
            raise ConfigError(f"{flag} must be at most 3.4e38, float32's largest (got {value}); {fix}")
        if action.type.at_most is not None and value > action.type.at_most:
            raise ConfigError(f"{flag} must be at most {action.type.at_most} (got {value}); {fix}")


def check_queue_size(args):
    """MoCo's and ReSSL's queues are filled one whole batch at a time."""
    if args.queue_size < 1 or args.queue_size % args.batch_size:
        raise ConfigError(
            f"--queue-size {args.queue_size} is not a positive multiple of --batch-size "
            f"{args.batch_size}; choose e.g. {args.batch_size * max(args.queue_size // args.batch_size, 1)}"
        )


def check_args(args, method):
    """Validate the common flags before anything heavy happens; fill in derived values."""
    args.method = method
    if args.resume:  # --resume RUN_DIR names the run directory
        args.out_dir = args.resume
    args.resume = args.resume is not None
    parse_ema_stages(args.ema_stages)  # a bad --ema-stages fails here, before anything is loaded
    if args.aug_chunk is None:  # a GPU pays per kernel launch, so it augments 16 batches per call; a CPU does not
        args.aug_chunk = 16 if args.device.startswith("cuda") else 1
    if args.warmup_epochs is None:  # the paper's 10 of 200 epochs, scaled to shorter runs
        args.warmup_epochs = min(10, max(1, round(args.epochs / 20)))
    if args.warmup_epochs > args.epochs:
        raise ConfigError(
            f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}, so the learning "
            f"rate would never reach --lr; choose at most {args.epochs} (the paper: 10 of 200)"
        )
    check_arch(args.arch)  # (--dataset is checked by load_dataset, before it reads anything)
    if args.batch_size < 2:
        raise ConfigError(
            f"--batch-size {args.batch_size}: BatchNorm needs at least 2 images per step; choose 2 or more "
            f"(the paper: 256)"
        )
    if args.out_dir is not None and not str(args.out_dir).strip():
        raise ConfigError("--out-dir is empty; name a run directory, or leave the flag out for the default")
    if args.out_dir is None:
        stages = args.ema_stages.replace(",", "+").replace(" ", "")
        preset = "-laptop" if args.preset == "laptop" else ""
        args.out_dir = str(Path("runs") / f"{method}-{stages}-b{args.beta:g}-s{args.seed}{preset}")
    return args


def check_arch(name):
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------------------
# 11. Checkpoints and logging: last.pt, exact resume, metrics.jsonl, the epoch line
# ----------------------------------------------------------------------------------------
def git_revision():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path, write):
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a kill at any instant leaves either the old file or the new one, never half of one. A failed
    write (a full disk, a lost mount) removes the temporary file, keeps the old file, and ends the
    run with one line (ConfigError)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # (save_checkpoint serialises first, so torch.save's errors never land here)
        tmp.unlink(missing_ok=True)
        raise write_failed(path, error, path.name) from None


def write_failed(path, error, kept):
    """The one line for a failed write: what failed, that `kept` (a file beside it) is intact, what to do."""
    intact = f"the previous {kept} is intact" if (Path(path).parent / kept).exists() else f"no {kept} was written"
    reason = error.strerror or str(error)
    return ConfigError(f"could not write {path} ({reason}); {intact}; free some space (or fix the disk), then --resume")


@dataclass
class RunState:
    """Where a run is, besides its models, optimiser and random generators: last.pt stores all of it."""

    step: int  # optimiser steps taken since the start of the run
    order: torch.Tensor | None  # this epoch's order of the training images (None before the first epoch)
    loss_sum: torch.Tensor  # this epoch's loss summed over its steps, kept on the device (no sync per step)
    history: list = field(default_factory=list)  # one metrics dict per finished epoch: metrics.jsonl


CHECKPOINT_FIELDS = ("method", "arch", "args", "run", "models")  # what linear_eval.py and --resume read
RUN_FIELDS = ("step",)


def load_checkpoint(path, method=None, arch=None):
    """Load last.pt (a file or a run directory), checking it is whole and from the expected method/arch."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(
            f"no checkpoint at {path}; start without --resume or point to a run directory that has last.pt"
        )
    try:
        # weights_only: a checkpoint is data (tensors, dicts, lists, numbers, strings). Anything else in
        # the pickle -- which could run code as it loads -- is refused before it is built.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error):  # torch names the class or function the pickle would have called
            raise ConfigError(
                f"refused to load {path}: it holds objects other than tensors and plain data, which could run "
                f"code when loaded; use a last.pt written by these scripts"
            ) from None
        raise ConfigError(
            f"checkpoint {path} is unreadable ({error.__class__.__name__}); it is truncated or corrupt: "
            f"restore a good copy or start a new run"
        ) from None
    except Exception as error:  # truncated or corrupt file: pickle, zip and EOF errors alike
        raise ConfigError(
            f"checkpoint {path} is unreadable ({error.__class__.__name__}); it is truncated or corrupt: "
            f"restore a good copy or start a new run"
        ) from None
    if not isinstance(state, dict) or "method" not in state or "models" not in state:
        raise ConfigError(f"{path} is not a checkpoint written by these scripts; pass a last.pt from a run directory")
    if "run" not in state:  # last.pt from before common.RunState: the step and order were stored apart
        raise ConfigError(f"{path} was written by an older version of these scripts; start a new run")
    resuming = method is not None  # --resume needs all of it; linear_eval.py the model and the flags
    missing = [key for key in CHECKPOINT_FIELDS + (("optimizer", "rng") if resuming else ()) if key not in state]
    run_fields = RUN_FIELDS + (("order", "loss_sum", "history") if resuming else ())
    missing += [f"run.{key}" for key in run_fields if not isinstance(state["run"], dict) or key not in state["run"]]
    if missing or not isinstance(state["args"], dict) or "online" not in state["models"]:
        missing = missing or ["args", "models.online"]
        raise ConfigError(f"{path} lacks {', '.join(missing)}, which these scripts need; use a complete last.pt")
    if method is not None and state["method"] != method:
        raise ConfigError(
            f"{path} was written by {state['method']}.py, not {method}.py; resume it with "
            f"{state['method']}.py or choose another --out-dir"
        )
    if arch is not None and state["arch"] != arch:
        raise ConfigError(f"{path} holds a {state['arch']} backbone but --arch is {arch}; pass --arch {state['arch']}")
    return state


def restore(state, models, optimizer, generator, args):
    """Load a checkpoint's models, optimiser and random-number state, after checking it matches the run."""
    saved, saved_world = state["args"], state.get("world_size", 1)
    if saved_world != WORLD.size:
        launch = "plain python" if saved_world == 1 else f"torchrun --nproc_per_node {saved_world} (in all)"
        raise ConfigError(
            f"last.pt was written by {saved_world} process(es) but this run has {WORLD.size}; resume it with "
            f"{launch}: each process's random state is in the checkpoint"
        )
    for key, now in vars(args).items():
        was = saved.get(key, now)
        if key == "ema_stages":  # the same stages, however written: "all" = "backbone,projector"
            same = parse_ema_stages(was) == parse_ema_stages(now)
        else:
            same = was == now
        if same or key in MAY_CHANGE_ON_RESUME:
            continue
        flag = "--" + key.replace("_", "-")
        raise ConfigError(
            f"the checkpoint was trained with {flag} {was} but this run has {now}; "
            f"resume with the same {flag} (the run's args.json lists them all)"
        )
    try:
        for name, module in models.items():
            module.load_state_dict(state["models"][name])
        base_lrs = [group.get("base_lr", group["lr"]) for group in optimizer.param_groups]  # from this run's flags
        optimizer.load_state_dict(state["optimizer"])
        for group, base_lr in zip(optimizer.param_groups, base_lrs):  # so --lr may change on resume
            group["base_lr"] = base_lr
    except (KeyError, RuntimeError, ValueError) as error:
        raise ConfigError(
            f"the checkpoint does not fit this model ({str(error).splitlines()[0]}); resume with the flags "
            f"it was trained with (see args.json)"
        ) from None
    set_rng_state(state["rng"], generator)


_LOCKS = {}  # run directory -> the open lock file this process holds (the lock lasts as long as the process)


def lock_run_directory(out_dir):
    """Hold an OS lock (flock) on out_dir/.lock for as long as this process lives: a second run, or a
    --resume, in the same directory is refused in one line naming the live run's PID. The OS drops the
    lock when the process ends, however it ends (a SIGKILL too), so a dead run's lock is no obstacle."""
    import fcntl

    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _LOCKS:  # this process holds it already (a second main() in one process: the tests)
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".lock", "a+")
    except OSError as error:
        raise ConfigError(
            f"cannot write to --out-dir {out_dir} ({error.strerror}); choose a writable directory"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"{out_dir} is in use by a live run (pid {holder}); wait for it to end, stop it, or choose "
            f"another --out-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[key] = handle


_STOP = {"requested": False}  # set by the SIGTERM handler; the loop saves and exits at the end of the step


def stop_on_sigterm():
    """On SIGTERM, finish the current step, save last.pt and exit (exit_if_stopped), instead of dying
    mid-step: a cluster scheduler sends SIGTERM some time before it kills a job."""
    import signal
    import threading

    _STOP["requested"] = False
    if threading.current_thread() is threading.main_thread():  # (only the main thread may set a handler)
        signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.update(requested=True))


def checkpoint_due(args, step):
    """Save last.pt inside the epoch after this step: every --checkpoint-every steps, or after a SIGTERM
    (seen by any process, under torchrun: all of them save and stop at the same step)."""
    _STOP["requested"] = any_process(_STOP["requested"])
    return _STOP["requested"] or bool(args.checkpoint_every and step % args.checkpoint_every == 0)


def exit_if_stopped(args, run):
    """After a SIGTERM, once last.pt holds this step: end the run in one line, non-zero, for a --resume."""
    _STOP["requested"] = any_process(_STOP["requested"])
    if _STOP["requested"]:
        raise Preempted(
            f"SIGTERM: last.pt in {args.out_dir} holds step {run.step}; continue with the same command and --resume"
        )


def start_or_resume(args, models, optimizer, generator, device, order_generator):
    """The run state: from last.pt with --resume (models, optimiser and generators restored in place),
    fresh otherwise. First the run takes its directory (lock_run_directory, on rank 0) and SIGTERM
    (stop_on_sigterm). `generator` draws the augmentations, `order_generator` each epoch's order: one
    and the same generator in a single process."""
    on_rank_0(lambda: lock_run_directory(args.out_dir))
    stop_on_sigterm()
    if not args.resume:
        return RunState(step=0, order=None, loss_sum=torch.zeros((), device=device))
    state = load_checkpoint(args.out_dir, args.method, args.arch)
    restore(state, models, optimizer, generator, args)
    run, loss_sum = state["run"], state["run"]["loss_sum"]
    if WORLD.size > 1:  # each process's own generator and loss tally; the order's generator is shared
        set_rng_state(state["processes"][WORLD.rank]["rng"], generator)
        loss_sum = state["processes"][WORLD.rank]["loss_sum"]
        order_generator.set_state(state["order_generator"])
    return RunState(
        step=run["step"], order=run["order"].to(device), loss_sum=loss_sum.to(device), history=run["history"]
    )


def save_checkpoint(args, run, models, optimizer, views, instruments, order_generator):
    """Write last.pt, atomically: the run state, every model's weights and buffers (EMA target, queues,
    centre, probe), the optimiser and the random generators -- what --resume needs to go on bit-exactly.
    A run whose loss is no longer finite is not saved: last.pt keeps the last good state.
    Under torchrun every process calls it: rank 0 writes, with each process's generator and loss tally."""
    own = {"rng": rng_state(views), "loss_sum": run.loss_sum.cpu()}
    processes = gather_objects(own)
    for process in processes:
        if not torch.isfinite(process["loss_sum"]):
            raise DivergedError(
                f"the loss became {process['loss_sum'].item()} by step {run.step}; "
                f"{Path(args.out_dir) / 'last.pt'} still holds the last good state: lower --lr, then --resume"
            )
    if not WORLD.main:
        return
    instruments.write()  # before the checkpoint: a resume cuts the instrument files back to its step
    state = {
        "method": args.method,
        "arch": args.arch,
        "args": vars(args),
        "run": {"step": run.step, "order": run.order, "loss_sum": run.loss_sum, "history": run.history},
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizer": optimizer.state_dict(),
        "rng": own["rng"],
        "world_size": WORLD.size,
    }
    if WORLD.size > 1:
        state.update(processes=processes, order_generator=order_generator.get_state())
    serialized = io.BytesIO()  # in memory first, so that a full disk fails as a plain write (ENOSPC)
    torch.save(state, serialized)
    atomic_write(Path(args.out_dir) / "last.pt", lambda f: f.write(serialized.getbuffer()))


def rng_state(views):
    return {
        "torch": torch.get_rng_state(),
        "generator": views.generator_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunLogger:
    """args.json, metrics.jsonl (one JSON object per epoch) and the fixed-format epoch line.

    metrics.jsonl is always rewritten whole (atomically) from the run's history, which last.pt
    also holds: after a kill at any instant the file holds whole lines only, and on resume it
    matches the checkpoint the run continues from.
    """

    def __init__(self, args, run, instruments=None):
        self.args, self.out_dir = args, Path(args.out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"cannot write to --out-dir {self.out_dir} ({error.strerror}); choose a writable directory"
            ) from None
        if (self.out_dir / "last.pt").exists() and not args.resume:
            raise ConfigError(
                f"{self.out_dir} already holds a run (last.pt); pass --resume to continue it or choose "
                f"another --out-dir"
            )
        self.last = run.history[-1] if run.history else None  # the summary line's metrics
        info = {
            **vars(args),
            "git_revision": git_revision(),
            "torch": torch.__version__,
            "world_size": WORLD.size,  # processes under torchrun (1: plain python)
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        }
        atomic_write(self.out_dir / "args.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        self.write_metrics(run.history)
        if instruments is not None:
            instruments.open(self.out_dir, run.step, args.resume)
        self.progress_bar = sys.stdout.isatty()
        self.started, self.steps_done, self.steps_per_epoch = time.monotonic(), 0, None  # for the ETAs
        self.clock, self.last_plain = None, time.monotonic()  # (start, first step) of this epoch; last plain line
        print(f"{args.method}.py at git {info['git_revision']}, arguments: {json.dumps(vars(args))}")

    def progress(self, step_in_epoch, steps, loss):
        """The progress line: step, loss, steps per second and the epoch's ETA. In a terminal it is
        redrawn every 20 steps; otherwise (a log file) printed as a plain line at most once a minute.
        Only a shown line reads the loss: loss.item() waits for the GPU to finish the step, so reading it
        at every step would stall the GPU once per step."""
        now = time.monotonic()
        if self.clock is None or step_in_epoch <= self.clock[1]:  # the first step seen in this epoch
            self.clock = (now, step_in_epoch)
        self.steps_per_epoch, self.steps_done = steps, self.steps_done + 1
        started, first = self.clock
        if step_in_epoch == first:  # the rate needs a step timed from end to end
            return
        rate = (step_in_epoch - first) / max(now - started, 1e-9)
        if self.progress_bar:
            shown = (step_in_epoch + 1) % 20 == 0 or step_in_epoch + 1 == steps
        else:
            shown = now - self.last_plain >= 60 and step_in_epoch + 1 < steps
        if not shown:
            return
        line = (
            f"  step {step_in_epoch + 1}/{steps} loss {loss.item():.4f} | {rate:.2f} steps/s | "
            f"epoch ETA {format_duration((steps - step_in_epoch - 1) / rate)}"
        )
        if self.progress_bar:
            print(f"\r{line}", end="", flush=True)
        else:
            self.last_plain = now
            print(line, flush=True)

    def run_eta(self, step):
        """The time left to the end of the run at this process's pace so far (evaluations included)."""
        if self.steps_per_epoch is None or self.steps_done == 0:
            return "-"
        total = self.args.epochs * self.steps_per_epoch
        left = min(total, self.args.max_steps or total) - step
        return format_duration(left * (time.monotonic() - self.started) / self.steps_done)

    def log_epoch(self, metrics, history, provisional=False):
        """Rewrite metrics.jsonl from the history and print the epoch line. An epoch cut short by
        --max-steps is not in the history: its line is written after it, provisionally, and its resume
        replaces it with the whole epoch's."""
        self.write_metrics([*history, metrics] if provisional else history)
        self.last = metrics
        fmt = lambda v: "   -  " if v is None else f"{v:6.2f}"
        if self.progress_bar:
            print("\r", end="")
        print(
            f"epoch {metrics['epoch']:4d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.4f} | "
            f"beta {metrics['beta']:.5f} | probe top-1 {fmt(metrics['linear_top1'])} | "
            f"kNN top-1 {fmt(metrics['knn_top1'])} | spread {metrics['output_spread']:.2f} "
            f"rank {metrics['feature_rank']:.1f} | {metrics['epoch_seconds']:.1f} s/epoch | "
            f"{metrics['images_per_second']:.0f} img/s | run ETA {self.run_eta(metrics['step'])}",
            flush=True,
        )

    def write_metrics(self, lines):
        text = "".join(json.dumps(m) + "\n" for m in lines)
        atomic_write(self.out_dir / "metrics.jsonl", lambda f: f.write(text.encode()))


def format_duration(seconds):
    """'45s', '12m05s', '3h07m': for the ETAs of the progress and epoch lines."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary_line(args, metrics):
    """The one line a run ends with (tools parse it)."""
    if metrics is None:
        return (
            f"summary: method={args.method} nothing to do: the run in {args.out_dir} has no complete epoch left "
            f"to train"
        )
    keys = (
        "epoch",
        "step",
        "loss",
        "linear_top1",
        "knn_top1",
        "knn1_top1",
        "output_spread",
        "feature_rank",
        "backbone_forwards_per_image",
        "ema_params",
        "peak_memory_mb",
    )
    fields = " ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)
    return f"summary: method={args.method} ema_stages={args.ema_stages.replace(' ', '')} beta={args.beta:g} {fields}"


# ----------------------------------------------------------------------------------------
# 12. Several GPUs or nodes: torchrun, DDP, and the cross-process operations of the methods
# ----------------------------------------------------------------------------------------
# `torchrun --nproc_per_node N METHOD.py ...` starts N copies of the script; each reads its place from
# the environment (RANK, LOCAL_RANK, WORLD_SIZE). Without torchrun, WORLD stays rank 0 of 1 and every
# function below gives back its input: a plain `python METHOD.py` runs exactly as before.
@dataclass
class World:
    """This process's place among those torchrun started."""

    rank: int = 0  # 0 .. size - 1, across all nodes; rank 0 alone writes the run directory and prints
    local_rank: int = 0  # on this node: which GPU it takes
    size: int = 1  # the number of processes

    @property
    def main(self):
        return self.rank == 0


WORLD = World()
_HOST_GROUP = {"group": None}  # a gloo group for small host-side messages (stop flags, generator states)


def init_distributed(device):
    """Under torchrun (WORLD_SIZE above 1): join the process group -- NCCL on CUDA, gloo on the CPU -- and
    return this process's device, cuda:LOCAL_RANK on CUDA. Without torchrun: `device` unchanged."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():  # said by each process it concerns
        raise ConfigError(
            f"process {rank} wants GPU {local_rank} but this node has {torch.cuda.device_count()}; "
            f"pass --nproc_per_node {torch.cuda.device_count()} or fewer"
        )
    WORLD.rank, WORLD.local_rank, WORLD.size = rank, local_rank, size
    if device.type == "cuda":
        device = torch.device("cuda", WORLD.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
        _HOST_GROUP["group"] = dist.group.WORLD
    return device


def end_distributed():
    """Leave the process group (at the end of main, and on every error path: run_cli)."""
    if WORLD.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_world(args):
    """--batch-size is the global batch: each of the N processes takes batch / N images of it."""
    if args.batch_size % WORLD.size:
        raise ConfigError(
            f"--batch-size {args.batch_size} does not divide among {WORLD.size} processes; pass a multiple of "
            f"{WORLD.size} (the batch is global: each process takes batch / {WORLD.size} images)"
        )


def data_parallel(device, *modules):
    """The modules that train, in DistributedDataParallel under torchrun: backward averages their
    gradients over the processes, so each takes the same optimiser step. One process: the modules."""
    if WORLD.size == 1:
        return modules if len(modules) > 1 else modules[0]
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    wrapped = [DistributedDataParallel(m, device_ids=ids) for m in modules]
    return wrapped if len(wrapped) > 1 else wrapped[0]


def sync_batch_norm(args, models, device):
    """On several GPUs, BatchNorm normalises with the statistics of the global batch (SyncBatchNorm), as
    one GPU would; --no-sync-bn keeps each process's own. The CPU has no SyncBatchNorm: said at start-up."""
    if WORLD.size == 1:
        return
    if device.type == "cuda" and not args.no_sync_bn:
        for model in models:
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root: same parameters
    elif WORLD.main:
        print(
            f"note: BatchNorm uses each process's own {args.batch_size // WORLD.size} images "
            f"({'--no-sync-bn' if device.type == 'cuda' else 'the CPU has no SyncBatchNorm'})"
        )


def gather(x):
    """Every process's x, concatenated in rank order along dim 0, without gradient (MoCo's and ReSSL's keys,
    before they enter the queue). One process: x."""
    if WORLD.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(WORLD.size)]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(WORLD.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every process's loss used this process's x: sum their gradients, and keep this process's rows.
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad.chunk(WORLD.size)[WORLD.rank]


def gather_with_gradient(x):
    """Every process's x, concatenated in rank order along dim 0, with gradient (SimCLR's negatives).

    Backward sums the gradients every process's loss sends to this process's rows, so each process gets
    N times its share of the gradient of the global mean loss; DDP's mean over the N processes then
    gives exactly the one-process gradient. One process: x."""
    return x if WORLD.size == 1 else _GatherWithGradient.apply(x)


def mean_over_processes(x):
    """The mean of x over the processes (DINO's centre: the mean of the global batch). One process: x."""
    if WORLD.size == 1:
        return x
    x = x.clone()
    torch.distributed.all_reduce(x)
    return x / WORLD.size


def any_process(flag):
    """True on every process if `flag` is True on any (a SIGTERM seen by one process stops them all at the
    same step). One process: flag."""
    if WORLD.size == 1:
        return flag
    t = torch.tensor([int(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_HOST_GROUP["group"])
    return bool(t.item())


def gather_objects(obj):
    """A list of every process's obj (picklable, on the host), in rank order. One process: [obj]."""
    if WORLD.size == 1:
        return [obj]
    objs = [None] * WORLD.size
    torch.distributed.all_gather_object(objs, obj, group=_HOST_GROUP["group"])
    return objs


def on_rank_0(make):
    """make() on rank 0 alone (what writes the run directory); its ConfigError is raised on every process,
    so that all of them stop together instead of the others waiting for rank 0. Returns make()'s value
    on rank 0, None on the others."""
    value, message = None, None
    if WORLD.main:
        try:
            value = make()
        except ConfigError as error:
            message = str(error)
    message = gather_objects(message)[0]
    if message is not None:
        raise ConfigError(message)
    return value


def check_processes_agree(models):
    """At the end of a run under torchrun: every process must hold the same weights, EMA targets, queues
    and centre (DDP's averaged gradients, then the same optimiser step and Eq. (6) on each). BatchNorm's
    running statistics are left out: without SyncBatchNorm each process's are its own."""
    if WORLD.size == 1:
        return
    import hashlib

    digest = hashlib.sha256()
    for name, model in models.items():
        for key, value in model.state_dict().items():
            if key.rsplit(".", 1)[-1] not in ("running_mean", "running_var", "num_batches_tracked"):
                digest.update(
                    f"{name}.{key}".encode() + value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
    digests = gather_objects(digest.hexdigest())
    if len(set(digests)) > 1:
        raise DivergedError(
            f"the processes ended with different weights ({len(set(digests))} versions among {WORLD.size}); "
            f"this is a bug: please report it with the command"
        )
