"""The device: checked, seeded, in channels_last; --compile; a timer that waits for the GPU."""

import os
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from engine.distributed import init_distributed
from engine.errors import ConfigError


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
    on the CPU (oneDNN; measured with tools/bench.py --efficiency, docs/benchmarks.md). In place: an
    optimiser built before the move still holds the same parameters."""
    for m in modules:
        m.to(device)
        m.to(memory_format=torch.channels_last)


def compile_stages(models, mode, device):
    """--compile MODE: torch.compile each stage of the encoders (online stages and EMA copies) and each
    other module with a forward (predictor, probe), one module at a time, in place. mode None: nothing.

    Stage by stage, so that the named stages and activation reuse work as without it; in place
    (each module's forward is replaced by its compiled version), so that state_dict keys stay as
    they are and a checkpoint loads with or without --compile; the forward hooks of
    `ForwardCounter` and `Instruments` stay outside the compiled code. The evaluation and the
    instruments run eagerly (`eager`), so the compiled graphs are those of training only.
    mode "reduce-overhead" adds CUDA graphs (the compiled kernels of a module replayed as one
    launch); they exist on CUDA only, so on a CPU it falls back to "default", and says so.
    """
    if mode is None:
        return
    if mode == "reduce-overhead" and device.type != "cuda":
        print("note: --compile reduce-overhead (CUDA graphs) needs a GPU; compiling with mode default instead")
        mode = "default"
    # Modules of one class share one forward code object (nn.Sequential's), and dynamo caps the variants
    # of one code object at 8: stages x train/eval x with/without gradients need more. (Older torch, 2.2 for
    # one, calls that limit cache_size_limit.)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    for model in models:
        if hasattr(model, "ema"):  # the target (common.NamedStageEMA): its EMA copies; shared stages are online
            modules = model.ema.values()
        elif hasattr(model, "stages"):  # the online encoder (common.Encoder): stage by stage
            modules = model.stages().values()
        else:  # queues and centres have no forward to compile
            modules = [model] if type(model).forward is not nn.Module.forward else []
        for module in modules:
            module.forward = torch.compile(module.forward, mode=mode)


@contextmanager
def eager(compiled):
    """Run compiled modules eagerly inside (when the run is compiled): evaluation and measurement, whose shapes
    and modes differ from training's, would otherwise compile graphs of their own."""
    if compiled and hasattr(torch.compiler, "set_stance"):  # (torch 2.6 and later)
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        yield


def timer(device):
    """A timestamp in seconds, taken after the device has finished its queued work (so GPU work is counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
