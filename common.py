"""The paper's shared parts, read whole: what every method file builds its method from.

Read a method file (byol.py first) next to the paper; come here when it calls something. In the order
a method file meets them:

    1. the encoder      the ResNet-18/50 whose stages carry the paper's names (Fig. 1, Sec. 4), with
                        the CIFAR stem or the ImageNet one; the MLP heads; the encoder E = g o b
                        with activation reuse
    2. the EMA          --ema-stages, the target network (Eq. 2-3, Eq. 7, Algorithm 1), Eq. (6) and
                        beta's schedule
    3. the views        batched augmentation with per-sample random parameters, in plain torch
    4. the key queue    MoCo v2's and ReSSL's queue of past keys
    5. evaluation       the online linear probe, weighted kNN, the collapse monitor

Everything else a run needs -- flags, checkpoints, data loading, logging, several GPUs, measurement --
is machinery, in the engine/ package; the last section here hands on the few names of it that the
method files use, and plugs sections 3, 5 and the encoder into its run loop (Run). Sections 1-5 use nothing but
torch and each other, in the order written.

The paper: "On the Pros and Cons of Momentum Encoder in Self-Supervised Visual Representation
Learning" (Pham et al.). Its stage names (Fig. 1, Sec. 4) are used throughout.
"""

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# 1. The encoder: the ResNet with named stages, MLP heads
# ----------------------------------------------------------------------------------------
BACKBONE_STAGES = ("conv1", "block1", "block2", "block3", "block4")
STAGES = BACKBONE_STAGES + ("projector",)  # the paper's names, input to output (Fig. 1)


def run_stages(modules, h, start):
    """Run the encoder from stage `start` to its end with the given {stage name: module}.

    Returns the activations along the way: the one entering each stage that ran, under the stage's
    name, and the last one, under "output". activations["projector"] is the pooled backbone feature f,
    activations["output"] the projection z (or f when no projector ran).
    """
    activations = {}
    for name in STAGES[STAGES.index(start) :]:
        if name not in modules:
            break
        activations[name] = h
        h = modules[name](h)
        if name == "block4":
            h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # global average pooling: N x C x H x W -> N x C
    activations["output"] = h
    return activations


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
    """ResNet with the CIFAR stem: conv1 = 3x3 conv (stride 1, padding 1) + BN + ReLU, no max-pool; or, with
    stem="imagenet" (--stem, for 224-pixel views: Table 6), the ImageNet ResNet's: 7x7 conv (stride 2, padding 3)
    + BN + ReLU + 3x3 max-pool (stride 2), which shrinks a 224-pixel image to 56 x 56 before block1. (The class
    keeps the name of its default stem, which courses know it by.)

    Stages conv1, block1..block4 are attributes under the paper's names. Global average pooling
    follows block4 (in `run_stages`); it has no parameters and is not a stage. bn_block4 adds
    Table C.8's BN1, a BatchNorm on block4's output (before pooling), to the block4 stage.
    `width` (--width) narrows every stage alike: 16 gives a quarter-width ResNet for CPUs (a
    teaching setting; the paper's is 64).
    Deviation: solo-learn, which the paper ran, pads conv1 by 2 (34x34 maps); we pad by 1 as
    the MoCo CIFAR demo and the original ResNet do.
    """

    def __init__(self, arch="resnet18", width=64, zero_init_residual=False, bn_block4=False, stem="cifar"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
        block, depths = ARCHS[arch]
        # width W: conv1 has W channels, block k's convolutions W * 2^(k-1) (ResNet-18's outputs too; ResNet-50's
        # bottlenecks put out 4x that). W = 64: the paper's ResNet
        if stem == "cifar":
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        elif stem == "imagenet":
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"unknown stem '{stem}'; choose cifar or imagenet")
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
        for m in self.modules():  # torchvision's init, the CIFAR stem's conv1 too (solo-learn's keeps torch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each residual branch starts as the identity (SimSiam's setting)
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def forward(self, x):
        """f = b(x), Eq. (1): the pooled features."""
        activations = run_stages({s: getattr(self, s) for s in BACKBONE_STAGES}, x, "conv1")
        return activations["output"]  # the stages end at block4 and its pooling: the output is f


def mlp(in_dim, hidden_dim, out_dim, num_layers=2, bn=True, last_bn=False, last_bn_affine=True, bias=True, gelu=False):
    """Linear -> [BN] -> ReLU (or GELU: DINO's head), repeated, then Linear [-> BN]: the projector g and
    predictor h."""
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=bias or not bn)]
        layers += [nn.BatchNorm1d(hidden_dim)] if bn else []
        layers += [nn.GELU() if gelu else nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias or not last_bn))  # a bias before BN would be cancelled
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """The online encoder E = g o b: backbone stages conv1..block4, pooling, projector g.

    forward(x) returns (f, z, activations): f = b(x) (Eq. 1), z = g(f) (Eq. 3), and the activation
    entering each stage (and the output) -- what the target branch starts from (activation reuse).
    """

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def stages(self):
        """{stage name: module}, input to output."""
        return {**{s: getattr(self.backbone, s) for s in BACKBONE_STAGES}, "projector": self.projector}

    def forward(self, x):
        activations = run_stages(self.stages(), x, "conv1")
        f = activations["projector"]  # what enters the projector: the pooled backbone feature
        return f, activations["output"], activations


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
        raise ValueError(
            "--ema-stages is empty; give all, backbone, projector, none or a comma list such as block4,projector"
        )
    if not all(names):
        raise ValueError(f"--ema-stages {text!r} has an empty item; write the stages with single commas, no spaces")
    for whole in ("none", "all"):
        if whole in names and len(names) > 1:
            raise ValueError(f"--ema-stages {text!r} combines '{whole}' with other stages; give '{whole}' alone")
    if len(set(names)) < len(names):
        raise ValueError(f"--ema-stages {text!r} names a stage twice; name each once")
    chosen = set()
    for name in names:
        if name in STAGE_ALIASES:
            chosen.update(STAGE_ALIASES[name])
        elif name in STAGES:
            chosen.add(name)
        else:
            raise ValueError(
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


def beta_schedule(total_steps, base, final, schedule):
    """Eq. (6)'s beta for every step of the run, in order: beta_at(0), ..., beta_at(total_steps - 1)."""
    return [beta_at(step, total_steps, base, final, schedule) for step in range(total_steps)]


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
    * forward(activations) -- activation reuse. Shared stages in front of the first EMA stage would
      compute exactly what the online network computed on the same view, so the target branch
      starts from the online activation entering the first EMA stage (detached) and runs only
      the stages from there on. With --ema-stages projector this is Eq. (7), z_m = g_m(f), and
      the backbone runs once per view (Algorithm 1); with all it is Eq. (2)-(3), twice.
      from_image(x) runs the target from an image the online network did not see (ReSSL).
    * update(beta) -- Eq. (6), xi <- beta * xi + (1 - beta) * theta, on the EMA stages' parameters
      only, called after the optimiser step; self.beta keeps the last beta used (the epoch line's).
      BatchNorm running statistics are buffers, not parameters: they are not averaged; each EMA copy
      keeps its own, from its own train-mode forward passes (as in solo-learn and BYOL).
    """

    def __init__(self, online: Encoder, ema_stages):
        super().__init__()
        self.ema_stages = list(ema_stages)
        # The online stages, by reference: a plain dict, so they are not submodules of the target
        # (not saved twice, not moved twice); nn.ModuleDict below registers the EMA copies.
        self.online_stages = online.stages()
        self.ema = nn.ModuleDict({s: copy.deepcopy(self.online_stages[s]) for s in self.ema_stages})
        self.ema.requires_grad_(False)
        self.beta = None  # the beta of the last update

    def stages(self):
        """{stage name: module} as the target sees it: the EMA copy if listed, else the online module."""
        return {s: self.ema[s] if s in self.ema else m for s, m in self.online_stages.items()}

    @torch.no_grad()
    def forward(self, activations):
        """The target's output for one view, from the online network's activations on that view (the
        third value `Encoder.forward` returns)."""
        if not self.ema_stages:  # --ema-stages none: the target is the online output under stop-gradient
            return activations["output"].detach()
        start = self.ema_stages[0]  # every stage before the first EMA stage is shared: reuse its input
        return self._run_from(start, activations[start].detach())

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
        self.beta = beta
        if beta == 1.0:  # a frozen target, left bit-identical
            return
        xi, theta = self.parameter_pairs()  # empty with --ema-stages none: nothing to average
        if xi:
            # on every pair at once: xi <- beta * xi, then xi <- xi + (1 - beta) * theta. The same algebra as the
            # loop `for p, q in zip(xi, theta): p.mul_(beta).add_(q, alpha=1 - beta)`, in one kernel launch per
            # operation on a GPU instead of one per parameter
            torch._foreach_mul_(xi, beta)
            torch._foreach_add_(xi, theta, alpha=1.0 - beta)

    def num_parameters(self):
        return sum(p.numel() for p in self.ema.parameters())


# ----------------------------------------------------------------------------------------
# 3. The views: batched augmentation, with per-sample random parameters, in plain torch
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
    `flip` is True. Equals torchvision's resized_crop (antialias=False) + hflip per image, for the same
    parameters; without antialiasing, a window larger than the output (DINO's local crops) is sampled, not averaged.

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


def _apply_to(x, selected, op, *per_image_args, masked=None, chance=1.0):
    """x[selected] = op(x[selected], ...) for the images picked by the boolean mask `selected`.

    On the CPU only the selected images are computed. On CUDA every image is computed and
    torch.where keeps the selected results: picking a subset would need its size on the host,
    a synchronisation that stalls the GPU; computing a little more does not. Same result.
    chance: the probability `selected` was drawn with; at 0 no image is picked and op is not run.
    """
    if chance == 0:
        return x
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
    if recipe.jitter_p == 0:  # drawn all the same, so that what follows draws the same numbers
        return x
    for slot in range(4):
        op = order[:, slot]  # n: the op each image takes in this slot, 0..3 = brightness, contrast, saturation, hue
        # Blend every image, with factor 1 (no change) where this slot has no blend for it: cheaper than picking them.
        blend_factor = torch.where(apply & (op < 3), factors.gather(1, op[:, None]).squeeze(1), 1.0)
        x = adjust_brightness_contrast_or_saturation(x, op, blend_factor, in_place=True)
        if hue > 0:
            x = _apply_to(x, apply & (op == 3), adjust_hue, factors[:, 3])
    return x


def augment_crops(x, recipe, mean, std, generator):
    """The rest of a view, after its crop and flip: colour jitter, grayscale, blur, solarisation, normalisation.
    x: the crops, floats in [0, 1], N x 3 x size x size (augment's own, or --loader stream's, cut from each whole
    image by the loader's workers), changed in place."""
    n, dev = x.shape[0], x.device
    rand = lambda: torch.rand(n, generator=generator, device=dev)
    x = color_jitter(x, recipe, generator)
    # each op's draw is made whatever its probability; an op of probability 0 is then not run (on a GPU it would
    # be, on every image: _apply_to)
    x = _apply_to(x, rand() < recipe.gray_p, to_grayscale, chance=recipe.gray_p)
    sigma = _uniform(recipe.blur_sigma[0], recipe.blur_sigma[1], n, generator, dev)
    blur = lambda v, s: gaussian_blur(v, s, recipe.blur_kernel)
    x = _apply_to(x, rand() < recipe.blur_p, blur, sigma, chance=recipe.blur_p)
    x = _apply_to(x, rand() < recipe.solarize_p, solarize, chance=recipe.solarize_p)
    x = x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))  # normalise in place: x is this function's own
    return x.contiguous(memory_format=torch.channels_last)  # the layout of the models (to_device)


def augment(images, recipe, mean, std, generator):
    """One view of a batch: uint8 N x 3 x H x W in, normalised float N x 3 x size x size out."""
    n, _, height, width = images.shape
    dev = images.device
    top, left, h, w = sample_crop_params(n, height, width, recipe.crop_scale, recipe.crop_ratio, generator, dev)
    flip = torch.rand(n, generator=generator, device=dev) < recipe.flip_p
    x = resized_crop(images.float().div_(255), top, left, h, w, recipe.size, flip)  # crop and flip in one resampling
    return augment_crops(x, recipe, mean, std, generator)


def normalize(x, mean, std):
    return (x - mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


# ----------------------------------------------------------------------------------------
# 4. The key queue: MoCo v2's and ReSSL's memory of past keys
# ----------------------------------------------------------------------------------------
class KeyQueue(nn.Module):
    """A FIFO queue of past keys, the negatives (MoCo v2) or the reference points (ReSSL) of the next steps.

    keys holds the last K keys, K x d, l2-normalised; with views=V, one such queue per view, V x K x d
    (MoCo v2's symmetric loss keeps one for each view). push() replaces the oldest N keys of each queue
    with a batch's, after the step's loss has used the queue as it was.
    """

    def __init__(self, size, dim, views=None):
        super().__init__()
        keys = F.normalize(torch.randn(views or 1, size, dim), dim=2)  # V x K x d, random until keys arrive
        self.register_buffer("keys", keys if views else keys[0])  # V x K x d, or K x d
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # where the next batch goes

    @torch.no_grad()
    def push(self, *keys):
        """One N x d batch of keys per queue: it replaces the queue's oldest N keys."""
        queues = self.keys.view(-1, *self.keys.shape[-2:])  # V x K x d: the same memory as self.keys
        n, size = keys[0].shape[0], queues.shape[1]
        slots = (self.pointer + torch.arange(n, device=queues.device)) % size  # N
        queues.index_copy_(1, slots, F.normalize(torch.stack(keys).float(), dim=2))
        self.pointer.copy_((self.pointer + n) % size)


# ----------------------------------------------------------------------------------------
# 5. Evaluation: the online linear probe, weighted kNN, the collapse monitor
# ----------------------------------------------------------------------------------------
def autocast(device):
    """bf16 autocast on CUDA; a no-op on CPU (exact float32, for tests and determinism). The method files run
    their networks' forward passes under it and their losses after it, in float32: bf16 keeps 8 significant bits,
    so a cosine similarity rounded to it and divided by a temperature of 0.04 is off by up to about 0.05. The
    evaluation's forward passes run under it too."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def probe_loss(probe, features, labels):
    """Cross-entropy of the online linear probe on *detached* backbone features of each view,
    averaged over views (solo-learn). Unlabelled images (label -1) are skipped."""
    labelled = labels >= 0
    losses = [F.cross_entropy(probe(f.detach().float()), labels.clamp(min=0), reduction="none") for f in features]
    return sum((loss * labelled).sum() for loss in losses) / (len(features) * labelled.sum().clamp(min=1))


@torch.no_grad()
def extract_features(backbone, batches, mean, std):
    """Backbone features of un-augmented images, backbone in eval mode. N x D float32. batches: the images, as
    uint8 B x 3 x H x W tensors (a split of a tensor in memory, or --loader stream's batches from disk)."""
    was_training = backbone.training
    backbone.eval()
    features = []
    for chunk in batches:
        x = normalize(chunk.float() / 255, mean, std).contiguous(memory_format=torch.channels_last)
        with autocast(x.device):
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


def knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes):
    """Test top-1 (%) of weighted kNN (k = 200, T = 0.1) and of 1-NN, with the training features as memory bank."""
    result = {}
    for key, k in (("knn_top1", 200), ("knn1_top1", 1)):
        predicted = knn_predict(train_features, train_labels, test_features, num_classes, k=k)
        result[key] = 100.0 * (predicted == test_labels).float().mean().item()
    return result


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


@torch.no_grad()
def evaluate(backbone, probe, data, knn=True, projector=None):
    """Test-set top-1 (%) of the online linear probe and, if knn, of weighted kNN (k=200, T=0.1) and 1-NN;
    with a projector, the collapse monitor on the test images too (output_spread, effective_rank). The images
    come in batches of 1024 from data.batches(split) (engine/data.py: from memory, or read from disk)."""
    test_features = extract_features(backbone, data.batches("test"), data.mean, data.std)
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
        with autocast(test_features.device):
            z = torch.cat([projector(f) for f in test_features.split(1024)])
        projector.train(was_training)
        result["output_spread"] = output_spread(z)  # ~1 spread out, 0 collapsed
        result["feature_rank"] = effective_rank(test_features)  # dimensions in use, of backbone.feature_dim
    if knn:
        labelled = data.train_labels >= 0  # (STL-10's unlabelled images are no kNN memory)
        train_features = extract_features(backbone, data.batches("train", labelled=True), data.mean, data.std)
        result.update(
            knn_accuracies(
                train_features, data.train_labels[labelled], test_features, data.test_labels, data.num_classes
            )
        )
    return result


# ========================================================================================
# The machinery, handed on: engine/ (which never imports this file) runs the loop around a step
# ========================================================================================
# What a method file reaches through common: its recipe block and flags (engine/cli.py), the device and the
# data (device.py, data.py), LARS and the learning rate's schedule (optim.py), what crosses processes under
# torchrun (distributed.py), and Run, defined below on engine/run.py's.
import engine.run  # noqa: E402  (here, after the paper's parts: they use nothing of it)
from engine.cli import Flag, Recipe, check_queue_size, fraction, non_negative, positive, run_cli  # noqa: E402
from engine.data import load_data  # noqa: E402
from engine.device import setup  # noqa: E402
from engine.distributed import WORLD, gather, gather_with_gradient, mean_over_processes  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.optim import LARS, learning_rate_schedule, param_groups, set_learning_rate  # noqa: E402


def check_arch(name):
    """--arch must name one of ARCHS (section 1)."""
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture '{name}'; choose one of {', '.join(ARCHS)}")


def parse_args(recipe, argv=None):
    """A method's flags, built from its recipe block (engine.cli.Recipe) and checked, with --ema-stages
    parsed once into args.stages: the list of stage names everything else uses."""
    args = recipe.parse(argv)
    try:
        args.stages = parse_ema_stages(args.ema_stages)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_arch(args.arch)
    return args


class Run(engine.run.Run):
    """engine.run.Run -- resume, each epoch's order, checkpoints, evaluation and logs around a method's
    step -- with the four parts of it that are the paper's, from this file: the views (two ways), the
    evaluation, and the outputs the stability instrument watches."""

    augment = staticmethod(augment)  # each batch's views, from whole images in memory: section 3
    augment_crops = staticmethod(augment_crops)  # ... from the crops --loader stream's workers cut from each image

    def evaluate(self, knn):
        """The epoch's evaluation: section 5 on the online backbone, its probe and its projector."""
        return evaluate(self.online.backbone, self.probe, self.data, knn=knn, projector=self.online.projector)

    @torch.no_grad()
    def outputs(self, images):
        """--log-target-drift: the online network's and the target's l2-normalised outputs on uint8 images,
        in training mode (BatchNorm on the images' own statistics, as the loss sees them), leaving every
        running statistic as it was."""
        x = normalize(images.float() / 255, self.data.mean, self.data.std).contiguous(memory_format=torch.channels_last)
        modules = [*self.online.stages().values(), *self.target.ema.values()]
        with running_stats_frozen(modules), autocast(x.device):
            _, z, activations = self.online(x)
            z_target = self.target(activations)
        return F.normalize(z.float(), dim=1), F.normalize(z_target.float(), dim=1)
