"""Data: whole datasets held in memory as uint8 tensors (N, 3, H, W) on the run device, and each batch's views.

The fast path of DESIGN.md section 4: the images never leave the device, and each view of a batch is
made by batched augmentation with per-sample random parameters (common.augment), --aug-chunk batches
at a time (Views).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cli import DATASETS
from engine.errors import ConfigError


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

    `augment(images, recipe, mean, std, generator)` makes one view of a batch (common.augment).
    Under torchrun (world: WORLD) batch_size is the global batch, and each process augments and returns
    its own share of every batch: images rank * n .. (rank + 1) * n - 1 of it, n = batch_size / N.
    """

    def __init__(self, data, recipes, batch_size, chunk, generator, augment, world=None):
        self.data, self.recipes, self.global_batch, self.chunk = data, list(recipes), batch_size, chunk
        self.generator, self.augment = generator, augment
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
        self.views = [self.augment(images, recipe, mean, std, self.generator) for recipe in self.recipes]
        self.labels, self.span = self.data.train_labels[index], (epoch, first, end)

    def generator_state(self):
        """The generator's state for a checkpoint: as at the start of the chunk in progress, if one is."""
        inside_chunk = self.span is not None and self.next_batch < self.span[2]
        return self.state_at_chunk_start if inside_chunk else self.generator.get_state()
