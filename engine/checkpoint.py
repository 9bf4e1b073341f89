"""last.pt: what it holds, exact resume, one live run per directory, and stopping at the end of a step.

A checkpoint is written atomically (engine.files.atomic_write) at the end of every epoch, every
--checkpoint-every steps, and after SIGTERM or a first Ctrl-C; it holds everything --resume needs to
go on bit-exactly (models, optimiser, the random generators, this epoch's image order), and is loaded
as data only (torch.load with weights_only=True).
"""

import io
import os
import pickle
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.cli import BEFORE_THE_FLAG, MAY_CHANGE_ON_RESUME
from engine.distributed import WORLD, any_process, gather_objects, on_rank_0
from engine.errors import ConfigError, DivergedError, Preempted
from engine.files import atomic_write


@dataclass
class Progress:
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
        way_on = "start without --resume, or name" if method else "name"  # (a resume gives its method)
        raise ConfigError(f"no checkpoint at {path}; {way_on} a run directory that has last.pt")
    try:
        # weights_only: a checkpoint is data (tensors, dicts, lists, numbers, strings). Anything else in
        # the pickle -- which could run code as it loads -- is refused before it is built.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the class or function the pickle would have called: "GLOBAL x.y" (torch 2.6 and
        # later), "Unsupported class x.y" (before)
        if "GLOBAL" in str(error) or "Unsupported class" in str(error):
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
    if "run" not in state:  # last.pt from before Progress (then common.RunState): the step and order were stored apart
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
    was, now = torch.device(saved.get("device") or generator.device).type, generator.device.type
    if was != now:  # a CPU generator's state and a GPU's differ in kind (and --aug-chunk's default with them)
        raise ConfigError(
            f"last.pt was written by a run on {was} and this one is on {now}: the augmentations' random generator "
            f"cannot move between them; resume with --device {was}"
        )
    for key, now in vars(args).items():
        was = saved.get(key, BEFORE_THE_FLAG.get(key, now))  # a flag newer than the checkpoint: its value before
        # --ema-stages is compared as the stage list it was parsed into (args.stages): "all" = "backbone,projector"
        if was == now or key == "ema_stages" or key in MAY_CHANGE_ON_RESUME:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "stages":  # (parsed from --ema-stages: say it as the flag was written)
            flag, was, now = "--ema-stages", saved.get("ema_stages", was), args.ema_stages
        preset = saved.get("preset", "paper")
        fix = f"resume with the same {flag} (the run's args.json lists them all)"
        if preset != args.preset:  # a preset sets many flags: name it, not each flag it set in turn
            fix = f"it was made with --preset {preset}: resume with --preset {preset} (the run's args.json lists every flag)"
        raise ConfigError(f"the checkpoint was trained with {flag} {was} but this run has {now}; {fix}")
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
    """Hold an OS lock (fcntl.lockf) on out_dir/.lock for as long as this process lives: a second run, or a
    --resume, in the same directory is refused in one line naming the live run's PID. The OS drops the
    lock when the process ends, however it ends (a SIGKILL too), so a dead run's lock is no obstacle.
    Returns whether this call made the directory."""
    import fcntl

    out_dir = Path(out_dir)
    key = str(out_dir.resolve())
    if key in _LOCKS:  # this process holds it already (a second main() in one process: the tests)
        return False
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".lock", "a+")
    except OSError as error:
        reason = "a file, not a folder" if out_dir.is_file() else error.strerror
        raise ConfigError(f"cannot write to --out-dir {out_dir} ({reason}); choose a writable directory") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX lock: --loader stream's workers do not share it
    except (BlockingIOError, PermissionError):  # (lockf's refusal is either, by platform)
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
    return made


_STOP = {"requested": False, "signal": None}  # set by the signal handler; the loop saves and exits after the step
# the directory of the run in progress (for the message of an interrupt), and whether this process made it
RUN_DIRECTORY = {"path": None, "made": False}


def stop_at_the_end_of_the_step():
    """On SIGTERM (a scheduler's notice some time before it kills a job) or a first Ctrl-C: finish the
    current step, save last.pt and exit (exit_if_stopped), instead of dying mid-step. A second Ctrl-C ends
    the program at once (KeyboardInterrupt; run_cli says what was saved)."""
    _STOP.update(requested=False, signal=None)
    if threading.current_thread() is not threading.main_thread():  # (only the main thread may set a handler)
        return

    def on_signal(signum, frame):
        if signum == signal.SIGINT:
            if _STOP["requested"]:
                raise KeyboardInterrupt  # the second Ctrl-C
            if WORLD.main:
                print("\nCtrl-C: saving last.pt at the end of this step, then stopping (Ctrl-C again: quit at once)")
        _STOP.update(requested=True, signal=signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def stop_requested():
    """Whether any process has seen SIGTERM or a first Ctrl-C: one answer on every process (under torchrun, an
    all-reduce), so that all of them save and stop at the same step. The handler's flag is only read here,
    never written back: a signal that lands while the processes agree counts at the next step, not never."""
    return any_process(_STOP["requested"])


def checkpoint_due(args, step):
    """Save last.pt inside the epoch after this step: every --checkpoint-every steps, or after SIGTERM or
    Ctrl-C (seen by any process)."""
    return stop_requested() or bool(args.checkpoint_every and step % args.checkpoint_every == 0)


def exit_if_stopped(args, step):
    """After SIGTERM or Ctrl-C, once last.pt holds this step: end the run in one line, for a --resume (exit code
    128 + the signal's number: 143 for SIGTERM, 130 for Ctrl-C)."""
    if stop_requested():
        name = "Ctrl-C" if _STOP["signal"] == signal.SIGINT else "SIGTERM"
        raise Preempted(
            f"{name}: last.pt in {args.out_dir} holds step {step}; continue with the same command and --resume",
            128 + (_STOP["signal"] or signal.SIGTERM),
        )


def interrupted_note():
    """What a Ctrl-C that ended the program at once leaves: it names only files that exist."""
    path = RUN_DIRECTORY["path"]
    if path is None or not (path / "last.pt").exists():
        return "interrupted before the first checkpoint: nothing was saved"
    return f"interrupted: {path / 'last.pt'} holds the last checkpoint, intact; rerun with --resume to continue it"


def remove_if_unused():
    """After a refusal: the run directory this process made is removed if it holds nothing but its .lock (a
    check that needs the run's models or data, after the lock), so that a refused command leaves no trace."""
    path = RUN_DIRECTORY["path"]
    if not RUN_DIRECTORY["made"] or not path.is_dir() or [p.name for p in path.iterdir()] != [".lock"]:
        return
    handle = _LOCKS.pop(str(path.resolve()), None)
    (path / ".lock").unlink()
    path.rmdir()
    if handle is not None:
        handle.close()  # (the lock goes with it)
    RUN_DIRECTORY.update(path=None, made=False)


def start_or_resume(args, models, optimizer, generator, device, order_generator):
    """The run's Progress: from last.pt with --resume (models, optimiser and generators restored in place),
    fresh otherwise. First the run takes its directory (lock_run_directory, on rank 0), and SIGTERM and
    Ctrl-C (stop_at_the_end_of_the_step). `generator` draws the augmentations, `order_generator` each
    epoch's order: one and the same generator in a single process."""
    if args.resume and not (Path(args.out_dir) / "last.pt").is_file():  # before the lock makes the directory
        load_checkpoint(args.out_dir, args.method, args.arch)  # (its one line: no checkpoint at ...)
    made = on_rank_0(lambda: lock_run_directory(args.out_dir))
    RUN_DIRECTORY.update(path=Path(args.out_dir), made=bool(made))
    stop_at_the_end_of_the_step()
    if not args.resume:
        return Progress(step=0, order=None, loss_sum=torch.zeros((), device=device))
    state = load_checkpoint(args.out_dir, args.method, args.arch)
    restore(state, models, optimizer, generator, args)
    saved, loss_sum = state["run"], state["run"]["loss_sum"]
    if WORLD.size > 1:  # each process's own generator and loss tally; the order's generator is shared
        set_rng_state(state["processes"][WORLD.rank]["rng"], generator)
        loss_sum = state["processes"][WORLD.rank]["loss_sum"]
        order_generator.set_state(state["order_generator"])
    return Progress(
        step=saved["step"], order=saved["order"].to(device), loss_sum=loss_sum.to(device), history=saved["history"]
    )


def save_checkpoint(args, progress, models, optimizer, views, instruments, order_generator):
    """Write last.pt, atomically: the run state, every model's weights and buffers (EMA target, queues,
    centre, probe), the optimiser and the random generators -- what --resume needs to go on bit-exactly.
    A run whose loss or weights are no longer finite is not saved: last.pt keeps the last good state.
    Under torchrun every process calls it: rank 0 writes, with each process's generator and loss tally."""
    # a finite loss can leave weights that are not (the probe's, say); each process checks its own (BatchNorm
    # statistics differ between processes), and every process decides from all of them, as for the loss
    not_finite = [name for name, model in models.items() if not all_finite(model.state_dict().values())]
    own = {"rng": rng_state(views), "loss_sum": progress.loss_sum.cpu(), "not_finite": not_finite}
    processes = gather_objects(own)
    last = Path(args.out_dir) / "last.pt"

    def way_on(flag):
        if last.exists():
            return f"{last} still holds the last good state: lower {flag}, then --resume"
        return f"no checkpoint was saved before: lower {flag} and start again"

    for process in processes:
        if not torch.isfinite(process["loss_sum"]):
            raise DivergedError(
                f"the loss became {process['loss_sum'].item()} by step {progress.step}; {way_on('--lr')}"
            )
    for process in processes:
        for name in process["not_finite"]:
            flag = "--probe-lr" if name == "probe" else "--lr"
            raise DivergedError(f"the {name}'s weights are no longer finite at step {progress.step}; {way_on(flag)}")
    if not WORLD.main:
        return
    instruments.write()  # before the checkpoint: a resume cuts the instrument files back to its step
    state = {
        "method": args.method,
        "arch": args.arch,
        "args": vars(args),
        "run": {
            "step": progress.step,
            "order": progress.order,
            "loss_sum": progress.loss_sum,
            "history": progress.history,
        },
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizer": optimizer.state_dict(),
        "rng": own["rng"],
        "world_size": WORLD.size,
    }
    if WORLD.size > 1:
        state.update(processes=processes, order_generator=order_generator.get_state())
    serialized = io.BytesIO()  # in memory first, so that a full disk fails as a plain write (ENOSPC)
    torch.save(state, serialized)
    atomic_write(last, lambda f: f.write(serialized.getbuffer()))


def all_finite(tensors):
    """Whether every floating-point tensor holds finite numbers only (one host synchronisation)."""
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())


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
