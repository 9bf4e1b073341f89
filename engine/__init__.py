"""The training machinery: everything a run needs that a reader of the paper does not.

The paper's parts -- the encoder with named stages, the named-stage EMA, the augmentations, the
probe and kNN -- are in common.py, which a method file imports; common.py hands on the few names of
this package a method file uses. This package never imports common.py. By concept:

    errors.py       the ways a run ends early, in one line
    files.py        atomic writes, the code's revision (no torch: tools/ use them)
    cli.py          the flags: each method's recipe block, the shared flags, --preset laptop, range
                    checks, run_cli
    device.py       the device, seeding, channels_last, --compile, the timer
    distributed.py  torchrun: DDP, gathering keys and candidates, the DINO centre across processes
    data.py         datasets held in memory as uint8 tensors; each batch's views (Views)
    optim.py        LARS, parameter groups, the warm-up + cosine learning rate
    measure.py      backbone forwards per image (Table 4), the per-step instruments (Fig. 2, 5, the
                    target's drift), an epoch's metrics
    checkpoint.py   last.pt: what it holds, exact resume, locks, SIGTERM and Ctrl-C
    log.py          args.json, metrics.jsonl, the progress and epoch lines, the summary line
    run.py          Run: everything around a method's step
"""
