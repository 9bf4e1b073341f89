"""Offline evaluation of a checkpoint written by any method file: linear probe and kNN.

    python linear_eval.py runs/byol-projector-b0.99-s0            # a run directory or its last.pt

Protocol: the backbone is frozen and kept in eval mode (BatchNorm uses its running
statistics); only a linear classifier on its pooled features trains, with cross-entropy, SGD
(momentum 0.9) and a cosine learning rate, on random crops + flips of the training images
(--no-augment: on fixed features of the un-augmented images, much faster). At the end the
script asserts that no backbone weight or buffer changed. Reports test top-1 / top-5 of the
linear classifier and weighted kNN (k = 200, T = 0.1) and 1-NN top-1, and saves them as JSON.

The paper reports the *online* probe instead (trained during pre-training, solo-learn's
protocol; the method files log it as linear_top1). This script is the offline protocol.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from engine.checkpoint import load_checkpoint
from engine.cli import ArgumentParser, HelpFormatter, check_cpu_convolutions, check_ranges, default_workers
from engine.data import load_dataset, load_stream
from engine.files import atomic_write
from engine.optim import learning_rate_factor


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a run directory or a last.pt written by byol.py, simsiam.py, ...")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate a randomly initialised backbone instead (the paper's 'fixed random encoder' baseline, Table 2)",
    )
    p.add_argument("--arch", default="resnet18", help="backbone for --random-init")
    p.add_argument(
        "--width",
        type=common.positive(int, at_most=2**10),
        default=64,
        help="backbone width for --random-init (a checkpoint's own is read from it)",
    )
    p.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default=None,
        help="--random-init: the backbone's first stage (a checkpoint's own is read from it); None means imagenet "
        "for --image-size 128 or more, else cifar",
    )
    p.add_argument(
        "--image-size",
        type=common.positive(int, at_most=2**10),
        default=None,
        help="--random-init: the views' side (imagefolder, synthetic); a checkpoint's own is read from it",
    )
    p.add_argument(
        "--loader",
        choices=("memory", "stream"),
        default=None,
        help="memory, or stream: an image folder read from disk (see the method files' --loader); default: the "
        "checkpoint's (--random-init: stream for an imagefolder at --image-size 128 or more)",
    )
    p.add_argument(
        "--workers",
        type=common.positive(int, at_most=256),
        default=None,
        help="processes that decode an image folder (once, at the start) or, with --loader stream, read its images "
        "as the run goes; None means one per CPU core, at most 32",
    )
    p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's --data-dir")
    p.add_argument(
        "--train-subset",
        type=common.positive(int),
        default=None,
        metavar="N",
        help="train the classifier (and kNN) on "
        "the first N / classes images of each class; default: the checkpoint's (all for --random-init)",
    )
    p.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default=None,
        help="score on the test split or on val (held-out training images, see the method files' --eval-split; "
        "refused where the checkpoint's pre-training trained on them); default: the checkpoint's (test for "
        "--random-init)",
    )
    p.add_argument(
        "--val-size", type=common.positive(int), default=None, metavar="N", help="default: the checkpoint's (10000)"
    )
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--epochs", type=common.positive(int, at_most=10**5), default=100)
    p.add_argument("--batch-size", type=common.positive(int, at_most=2**16), default=256)
    p.add_argument("--lr", type=common.positive(float), default=0.1)
    p.add_argument("--weight-decay", type=common.non_negative(float), default=0.0)
    p.add_argument("--no-augment", action="store_true", help="train on fixed features of un-augmented images")
    p.add_argument("--seed", type=common.non_negative(int, at_most=2**63 - 1), default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="result JSON (default: linear_eval.json beside the checkpoint)")
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (not args.random_init):
        raise common.ConfigError("give a checkpoint (a run directory or last.pt), or --random-init with --dataset")
    if args.random_init and args.dataset is None:
        raise common.ConfigError("--random-init needs --dataset (and --data-dir for imagefolder)")
    check_ranges(args, p)
    if args.out is None and args.random_init:
        args.out = f"linear_eval-random-{args.arch}-{args.dataset}.json"
    elif args.out is None:  # beside the checkpoint
        checkpoint = Path(args.checkpoint)
        args.out = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "linear_eval.json"
    out = Path(args.out)
    if out.suffix != ".json" or out.is_dir():  # never over a checkpoint, metrics.jsonl or a folder
        raise common.ConfigError(f"--out {out} is not a .json file; name one, e.g. {out.parent / 'linear_eval.json'}")
    if out.name == "args.json" and (out.parent / "last.pt").exists():  # nor over a run's record of its flags
        raise common.ConfigError(
            f"--out {out} is the run's own args.json; name another, e.g. {out.parent / 'linear_eval.json'}"
        )
    folder = next(parent for parent in out.parents if parent.exists())  # (made at the end where missing)
    if not folder.is_dir():  # said now, not after the evaluation
        raise common.ConfigError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
    return args


def topk_accuracy(logits, labels, k):
    return 100.0 * (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def main(argv=None):
    args = parse_args(argv)
    if args.random_init:  # a stand-in "checkpoint": the backbone as initialised with --seed, never trained
        common.check_arch(args.arch)
        large = (args.image_size or 32) >= 128  # as the method files' --stem auto and --loader auto
        stem = args.stem or ("imagenet" if large else "cifar")
        torch.manual_seed(args.seed)
        backbone = common.ResNetCIFAR(args.arch, width=args.width, stem=stem)
        fresh = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        state = {
            "method": "random-init",
            "arch": args.arch,
            "run": {"step": 0},
            "models": {"online": fresh},
            "args": {
                "dataset": args.dataset,
                "data_dir": args.data_dir or "./data",
                "image_size": args.image_size,
                "stem": stem,
                "loader": "stream" if args.dataset == "imagefolder" and large else "memory",
                "synthetic_size": 512,
                "seed": args.seed,
                "width": args.width,
                "train_subset": None,
                "eval_split": "test",
                "val_size": 10000,
            },
        }
    else:
        state = load_checkpoint(args.checkpoint)
    trained = state["args"]  # the pre-training run's flags
    for key in ("dataset", "data_dir", "train_subset", "eval_split", "val_size"):  # the pre-training data by default
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key))
    args.eval_split, args.val_size = args.eval_split or "test", args.val_size or 10000  # (checkpoints before the flag)
    # val scores only images the pre-training held out (the last --val-size / classes of each class): its own val
    # split or a part of it, or another dataset's (another --dataset, or an image folder of another name)
    trained_val = trained.get("val_size") or 10000
    held_out = trained.get("eval_split") == "val" and args.val_size <= trained_val
    # an image folder is the pre-training's when it is the same folder or has its name: a relative path in the
    # checkpoint resolves against this run's directory, not the pre-training's, so a name is all that is sure
    folder, trained_folder = Path(args.data_dir).resolve(), Path(trained.get("data_dir") or ".").resolve()
    same_data = args.dataset == trained.get("dataset") and (
        args.dataset != "imagefolder" or folder == trained_folder or folder.name == trained_folder.name
    )
    if args.eval_split == "val" and state["method"] != "random-init" and same_data and not held_out:
        kept = (
            f"--val-size {trained_val} of them; score it with --val-size at most {trained_val}, or on --eval-split test"
        )
        if trained.get("eval_split") != "val":
            kept = "none of them; score it on --eval-split test"
        raise common.ConfigError(
            f"--eval-split val --val-size {args.val_size}: the checkpoint was pre-trained on some of those training "
            f"images (it held out {kept})"
        )
    # the pre-training's loader for its own dataset; another dataset is held in memory unless --loader says stream
    args.loader = args.loader or (
        trained.get("loader", "memory") if args.dataset == trained.get("dataset") else "memory"
    )
    if args.loader == "stream" and args.dataset != "imagefolder":
        raise common.ConfigError(
            f"--loader stream reads an image folder, not --dataset {args.dataset}; pass --dataset imagefolder "
            f"--data-dir DIR, or --loader memory"
        )
    if args.loader == "stream" and not args.no_augment:
        raise common.ConfigError(
            "--loader stream: linear_eval.py trains on fixed features of the evaluation views there; pass --no-augment"
        )
    args.workers = args.workers or default_workers()
    device = common.setup(args.device, args.seed)
    if args.loader == "stream":
        data = load_stream(
            args.data_dir,
            device,
            image_size=trained["image_size"] or 224,
            train_subset=args.train_subset,
            eval_split=args.eval_split,
            val_size=args.val_size,
            workers=args.workers,
        )
    else:
        data = load_dataset(
            args.dataset,
            args.data_dir,
            device,
            image_size=trained["image_size"],
            train_subset=args.train_subset,
            eval_split=args.eval_split,
            val_size=args.val_size,
            download=not args.no_download,
            synthetic_size=trained["synthetic_size"],
            seed=trained["seed"],
            workers=args.workers,
        )

    width, stem = trained.get("width", 64), trained.get("stem", "cifar")  # (checkpoints before the flags)
    check_cpu_convolutions(device.type, stem, width, data.image_size, streamed=args.loader == "stream")
    # The frozen backbone: the online network's b, in eval mode, without gradients.
    backbone = common.ResNetCIFAR(
        state["arch"],
        width=width,
        bn_block4=trained.get("bn_block4", False),
        stem=stem,
    ).to(device)
    online = state["models"]["online"]
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in online.items() if k.startswith("backbone.")})
    backbone.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}

    labelled = data.train_labels >= 0
    train_labels = data.train_labels[labelled]
    batch_size = min(args.batch_size, len(train_labels))
    classifier = nn.Linear(backbone.feature_dim, data.num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_labels) // batch_size
    total_steps = args.epochs * steps_per_epoch
    crop_flip = common.ViewRecipe(size=data.image_size, jitter_p=0.0, gray_p=0.0)  # crop + flip only
    generator = torch.Generator(device).manual_seed(args.seed)
    fixed = None
    if args.no_augment:
        fixed = common.extract_features(backbone, data.batches("train", labelled=True), data.mean, data.std)
    else:  # (in memory: --loader stream was refused above without --no-augment)
        train_images = data.train_images[labelled]

    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_labels), generator=generator, device=device)
        for i in range(steps_per_epoch):
            index = order[i * batch_size : (i + 1) * batch_size]
            if fixed is None:
                x = common.augment(train_images[index], crop_flip, data.mean, data.std, generator)
                with torch.no_grad(), common.autocast(device):
                    features = backbone(x).float()
            else:
                features = fixed[index]
            for group in optimizer.param_groups:  # cosine learning rate, per step, without warm-up
                group["lr"] = args.lr * learning_rate_factor(step, total_steps, warmup_steps=0)
            loss = F.cross_entropy(classifier(features), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        print(f"linear eval epoch {epoch + 1}/{args.epochs} | loss {loss.item():.4f}", flush=True)

    # Evaluate, then check the backbone is exactly what the checkpoint held.
    test_features = common.extract_features(backbone, data.batches("test"), data.mean, data.std)
    train_features = fixed
    if train_features is None:
        train_features = common.extract_features(backbone, data.batches("train", labelled=True), data.mean, data.std)
    with torch.no_grad():
        logits = classifier(test_features)
    result = {
        "checkpoint": str(args.checkpoint),
        "method": state["method"],
        "arch": state["arch"],
        "width": width,
        "dataset": args.dataset,
        "train_subset": args.train_subset,
        "eval_split": args.eval_split,
        "classes": data.num_classes,
        "test_images": len(data.test_labels),
        "pretrain_step": state["run"]["step"],
        "epochs": args.epochs,
        "augment": not args.no_augment,
        "top1": topk_accuracy(logits, data.test_labels, 1),
        "top5": topk_accuracy(logits, data.test_labels, min(5, data.num_classes)),
        **common.knn_accuracies(train_features, train_labels, test_features, data.test_labels, data.num_classes),
    }
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen backbone changed during linear evaluation"

    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise common.ConfigError(f"cannot make the folder of --out {out} ({error.strerror}); choose another --out")
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()), then="run it again")
    print(
        f"linear eval: top-1 {result['top1']:.2f} | top-5 {result['top5']:.2f} | kNN top-1 {result['knn_top1']:.2f} "
        f"| 1-NN top-1 {result['knn1_top1']:.2f} | saved {out}"
    )


if __name__ == "__main__":
    common.run_cli(main)
