"""Several GPUs or nodes: torchrun, DistributedDataParallel, and the cross-process operations of the methods.

`torchrun --nproc_per_node N METHOD.py ...` starts N copies of the script; each reads its place from the
environment (RANK, LOCAL_RANK, WORLD_SIZE). Without torchrun, WORLD stays rank 0 of 1 and every function
below gives back its input: a plain `python METHOD.py` runs exactly as before.
"""

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.errors import ConfigError, DivergedError


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
    gradients over the processes, so each takes the same optimiser step. One process: the modules.

    broadcast_buffers=False: DDP's default copies rank 0's BatchNorm running statistics into every process
    before each forward, in place. The methods call the online network once per view before backward, and
    where BatchNorm keeps its running statistics for backward (the CPU's, cuDNN's without SyncBatchNorm) the
    second view's copy invalidates the first view's graph (torch 2.11: "modified by an inplace operation").
    Nothing is lost: rank 0 alone evaluates and saves, and its statistics are its own either way; the other
    processes' running statistics are never read (BatchNorm trains on batch statistics)."""
    if WORLD.size == 1:
        return modules if len(modules) > 1 else modules[0]
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if device.type == "cuda" else None
    wrapped = [DistributedDataParallel(m, device_ids=ids, broadcast_buffers=False) for m in modules]
    return wrapped if len(wrapped) > 1 else wrapped[0]


def sync_batch_norm(args, models, device):
    """On several GPUs, BatchNorm normalises with the statistics of the global batch (SyncBatchNorm), as
    one GPU would; --no-sync-bn keeps each process's own. The CPU has no SyncBatchNorm: said at start-up."""
    if WORLD.size == 1:
        return
    if device.type == "cuda" and not args.no_sync_bn:
        if args.log_target_drift:  # its passes run on rank 0 alone: a SyncBatchNorm there would wait for the others
            raise ConfigError(
                "--log-target-drift runs its forward passes on rank 0 alone, where SyncBatchNorm would wait for the "
                "other processes; add --no-sync-bn, or measure the drift in one process"
            )
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
