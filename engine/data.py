"""Data: whole datasets held in memory as uint8 tensors (N, 3, H, W) on the run device, and each batch's views.

The fast path of DESIGN.md section 4: the images never leave the device, and each view of a batch is
made by batched augmentation with per-sample random parameters (common.augment), --aug-chunk batches
at a time (Views).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cli import DATASETS
from engine.errors import ConfigError


def load_data(args, device):
    """The dataset the flags name (--dataset, --data-dir, --train-subset, --eval-split, ...): in memory
    (load_dataset), or as files read from disk as the run goes (load_stream, --loader stream)."""
    if args.loader == "stream":
        return load_stream(
            args.data_dir,
            device,
            image_size=args.image_size or 224,
            train_subset=args.train_subset,
            eval_split=args.eval_split,
            val_size=args.val_size,
            workers=args.workers,
        )
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
        workers=args.workers,
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

    def batches(self, split, labelled=False, batch_size=1024):
        """The images of a split ("train" or "test") in batches of batch_size, in order, for the evaluation;
        labelled: only those with a label (not STL-10's unlabelled ones)."""
        images = self.train_images if split == "train" else self.test_images
        if labelled:
            images = images[self.train_labels >= 0]
        return images.split(batch_size)

    def fixed_batch(self, n):
        """The first n training images, as they are (--log-target-drift's fixed batch)."""
        return self.train_images[:n]


def _torchvision_dataset(name, root, download):
    import torchvision

    if (Path(root) / "train").is_dir() and any(d.is_dir() for d in (Path(root) / "train").iterdir()):
        raise ConfigError(  # (not torchvision's files: a download would land among the images)
            f"--data-dir {root} holds a folder of images per class (train/<class>/), not torchvision's {name} "
            f"files; pass --dataset imagefolder"
        )
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


def folder_samples(root, subset=None, val_size=None):
    """The (path, label) samples of an image folder a run uses: train/<class>/*.{jpg,png}, and val/<class>/...
    or test/<class>/... (see split_train_val: --train-subset, --eval-split val). Returns the training samples,
    the evaluation samples (the held-out training images with val_size; else the test folder's) and the
    number of classes. Nothing is decoded here."""
    import torchvision

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

    train = folder_of(root / "train")
    if len(train.classes) < 2:  # every probe and kNN would score 100 %
        raise ConfigError(
            f"{root / 'train'} has {len(train.classes)} class folder; the probe and kNN need at least 2, one folder "
            f"of images per class"
        )
    train_idx, val_idx = split_train_val(train.targets, len(train.classes), subset, val_size)
    train_samples = [train.samples[i] for i in train_idx.tolist()]
    if val_idx is not None:  # --eval-split val
        return train_samples, [train.samples[i] for i in val_idx.tolist()], len(train.classes)
    test = folder_of(test_dir)
    if test.classes != train.classes:
        raise ConfigError(
            f"the class folders of {root / 'train'} and {test_dir} differ; give both the same class names"
        )
    return train_samples, test.samples, len(train.classes)


def open_image(path):
    """The image at path in RGB, or ConfigError's one line naming it (a corrupt, empty or unreadable file)."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except Image.DecompressionBombError:  # (not an OSError)
        reason = f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, PIL's guard against decompression bombs"
    except (OSError, SyntaxError, ValueError) as error:  # (PIL's UnidentifiedImageError; a broken PNG's SyntaxError)
        reason = getattr(error, "strerror", None) or "not an image that PIL can decode"
    raise ConfigError(f"cannot read the image {path} ({reason}); delete or replace it")


def as_tensor(image):
    """A PIL RGB image as a uint8 3 x H x W tensor."""
    width, height = image.size
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


class FolderImages(torch.utils.data.Dataset):
    """Item i: image i as a uint8 3 x size x size tensor, or the one line naming an unreadable image. The whole
    image resized to size x size (--loader memory's one decode), or with centre_crop the standard evaluation
    view: resized so that its shorter side is size * 8 / 7 (256 for 224), then its centre (--loader stream)."""

    def __init__(self, files, size, centre_crop=False):
        self.files, self.size, self.centre_crop = files, size, centre_crop

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torchvision.transforms.functional as TF
        from PIL import Image

        try:
            image = open_image(self.files[i])
        except ConfigError as error:
            return str(error)
        if self.centre_crop:
            image = TF.center_crop(TF.resize(image, round(self.size * 8 / 7)), self.size)
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return as_tensor(image)


def _image_folder(root, image_size, subset=None, val_size=None, workers=1):
    """An image folder decoded once, every image resized to image_size x image_size (--loader memory), by
    `workers` processes (DataLoader workers, in order: the tensors are the same for any number; all 60,000 of
    CIFAR-10's JPEGs took about 14.5 s in one process and 8.5 s in two on a 2-core CPU, docs/benchmarks.md)."""

    def decode(samples):
        images = FolderImages([path for path, _ in samples], image_size)
        num_batches = -(-len(images) // 500)  # batches of 500 images; one process for one batch or one worker
        processes = min(workers, num_batches)
        processes = processes if processes > 1 else 0  # (one DataLoader worker would only add a process)
        # A generator of its own: a DataLoader draws its workers' seed from the one it is given, and from torch's
        # global generator without one, which would move every weight the run initialises after the data.
        reader = loader(
            images,
            processes,
            torch.device("cpu"),
            batch_size=500,
            collate_fn=first_error_or_stack,
            generator=torch.Generator(),
        )
        decoded = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
        for i, batch in enumerate(reader):  # each batch copied out of shared memory as it comes
            if isinstance(batch, str):  # an image that could not be read: its one line
                raise ConfigError(batch)
            decoded[i * 500 : i * 500 + len(batch)] = batch
        return decoded, torch.tensor([label for _, label in samples])

    train_samples, test_samples, num_classes = folder_samples(root, subset, val_size)
    train_x, train_y = decode(train_samples)
    test_x, test_y = decode(test_samples)
    return train_x, train_y, test_x, test_y, num_classes


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
    workers=1,
):
    """Load a dataset (--dataset) into memory on `device`. Returns a Data.

    image_size: imagefolder and synthetic only (None: 32). train_subset: the first N / classes
    training images of each class. eval_split "val": evaluate on the last val_size / classes
    training images of each class instead of the test split (they are never trained on; choose
    recipes there, and report the test split once per chosen recipe). synthetic_size and seed:
    the synthetic dataset's size and seed. workers: the processes that decode an image folder."""
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
        parts = _image_folder(data_dir, image_size or 32, train_subset, val, workers)
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
    # Per-channel statistics of the training images kept (all of CIFAR's: solo-learn's constants; a subset's differ).
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
    if batch_size > len(data.train_labels):
        raise ConfigError(
            f"--batch-size {batch_size} is larger than the {len(data.train_labels)} training images; lower --batch-size"
        )
    return len(data.train_labels) // batch_size


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

    def close(self):
        """Nothing to stop: the views are made in this process."""

    def generator_state(self):
        """The generator's state for a checkpoint: as at the start of the chunk in progress, if one is."""
        inside_chunk = self.span is not None and self.next_batch < self.span[2]
        return self.state_at_chunk_start if inside_chunk else self.generator.get_state()


# ----------------------------------------------------------------------------------------
# --loader stream: an image folder read from disk as the run goes (ImageNet-100, ImageNet-1K)
# ----------------------------------------------------------------------------------------
# Holding ImageNet-100 in memory at 256 pixels takes about 25 GB, ImageNet-1K about 250 GB, and a thumbnail of
# each image would make every view a crop of the thumbnail. Here DataLoader worker processes read and decode
# each image as a batch needs it and cut each view from the whole photograph (RandomResizedCrop, flip) on the
# CPU, where the image is; the rest of each view (colour jitter, grayscale, blur, solarisation) runs batched on
# the run's device (common.augment_crops), as in memory. Host memory is bounded by what the workers prefetch:
# --workers x 2 batches of views (about 77 MB a batch of 256 images with two 224-pixel views), plus the list
# of file names; the dataset's size does not enter it.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision and solo-learn


def crop_seed(seed, epoch, position, view):
    """The seed of one view's crop and flip: the image at `position` of the epoch's order, view `view`. A resume,
    the number of workers and torchrun's shares of each batch leave every crop as it was."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}:{view}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


class TrainBatches(torch.utils.data.Dataset):
    """Item i: this process's share of the epoch's batch i, each view cut from the whole image by a worker.

    Returns ([one uint8 n x 3 x size x size tensor per view], labels), or the one line naming an image that
    could not be read (the main process ends the run with it)."""

    def __init__(self, files, labels, order, global_batch, share, views, seed, epoch):
        self.files, self.labels, self.order = files, labels, order
        self.global_batch, self.share, self.views, self.seed, self.epoch = global_batch, share, views, seed, epoch

    def __len__(self):
        return len(self.order) // self.global_batch

    def __getitem__(self, i):
        import torchvision.transforms as T
        from PIL import Image

        first = i * self.global_batch + self.share.start  # this process's first image in the epoch's order
        positions = range(first, first + self.share.stop - self.share.start)
        made = [[] for _ in self.views]
        for position in positions:
            try:
                image = open_image(self.files[self.order[position]])
            except ConfigError as error:
                return str(error)
            for v, (size, scale, ratio, flip_p) in enumerate(self.views):
                torch.manual_seed(crop_seed(self.seed, self.epoch, position, v))  # (this worker's own generator)
                top, left, height, width = T.RandomResizedCrop.get_params(image, scale, ratio)  # torchvision's
                crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + width, top + height))
                if torch.rand(1).item() < flip_p:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                made[v].append(as_tensor(crop))
        labels = torch.tensor([self.labels[self.order[p]] for p in positions])
        return [torch.stack(crops) for crops in made], labels


def first_error_or_stack(items):
    """A DataLoader's collate for FolderImages: the batch as one tensor, or the first unreadable image's line."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


def loader(dataset, workers, device, **options):
    """A DataLoader over `dataset` in order, with `workers` processes; pinned memory on CUDA."""
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        **options,
    )


@dataclass
class StreamData:
    """An image folder read from disk as the run goes (--loader stream): what a run uses of it, never the images.

    train_labels and test_labels are on the run's device; image_size is the views' side (224 for ImageNet);
    mean and std are ImageNet's (computing them would read every image)."""

    train_files: list
    train_labels: torch.Tensor
    test_files: list
    test_labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    image_size: int
    workers: int

    def batches(self, split, labelled=False, batch_size=1024):
        """The evaluation views of a split ("train" or "test"), in order, batch by batch, on the run's device.
        (Every image of a folder has a label: `labelled` changes nothing.)"""
        device = self.train_labels.device
        files = self.train_files if split == "train" else self.test_files
        batches = loader(
            FolderImages(files, self.image_size, centre_crop=True),
            self.workers,
            device,
            batch_size=batch_size,
            collate_fn=first_error_or_stack,
        )
        for images in batches:
            if isinstance(images, str):
                raise ConfigError(images)
            yield images.to(device, non_blocking=True)

    def fixed_batch(self, n):
        """The first n training images, in their evaluation view (--log-target-drift's fixed batch), read here."""
        images = FolderImages(self.train_files[:n], self.image_size, centre_crop=True)
        batch = first_error_or_stack([images[i] for i in range(len(images))])
        if isinstance(batch, str):
            raise ConfigError(batch)
        return batch.to(self.train_labels.device)


def load_stream(data_dir, device, *, image_size, train_subset=None, eval_split="test", val_size=10000, workers=1):
    """An image folder for --loader stream: its file lists and labels (nothing decoded). Returns a StreamData."""
    if not data_dir or not Path(data_dir).is_dir():
        raise ConfigError(
            f"--loader stream needs --data-dir pointing at a folder with train/ and val/ or test/ (got {data_dir!r})"
        )
    val = val_size if eval_split == "val" else None
    train_samples, test_samples, num_classes = folder_samples(data_dir, train_subset, val)
    return StreamData(
        train_files=[path for path, _ in train_samples],
        train_labels=torch.tensor([label for _, label in train_samples], device=device),
        test_files=[path for path, _ in test_samples],
        test_labels=torch.tensor([label for _, label in test_samples], device=device),
        num_classes=num_classes,
        mean=torch.tensor(IMAGENET_MEAN, device=device),
        std=torch.tensor(IMAGENET_STD, device=device),
        image_size=image_size,
        workers=workers,
    )


class StreamViews:
    """Each training batch's views for --loader stream, with the interface of Views: batch(order, epoch, i).

    DataLoader workers read this process's share of batch i from disk and cut each view from the whole image
    (TrainBatches: torchvision's RandomResizedCrop sampling with the recipe's scale and ratio, resized to its
    size, and the flip), in the epoch's order, prefetching ahead; here each view is finished on the run's
    device by `augment_crops` (common.augment_crops), from the run's generator. The crops are seeded per image
    and view (crop_seed), so a checkpoint needs only the generator's state, and a resume starts the workers at
    the batch it stopped at. Under torchrun (world) each process reads images rank * n .. (rank + 1) * n - 1
    of every global batch, n = batch_size / N."""

    def __init__(self, data, recipes, batch_size, generator, augment_crops, world, seed):
        self.data, self.recipes, self.global_batch, self.generator = data, list(recipes), batch_size, generator
        self.augment_crops, self.seed = augment_crops, seed
        rank, size = (world.rank, world.size) if world is not None else (0, 1)
        n = batch_size // size
        self.share = range(rank * n, (rank + 1) * n)
        self.views = [(r.size, tuple(r.crop_scale), tuple(r.crop_ratio), r.flip_p) for r in self.recipes]
        self.iterator, self.next_position = None, None

    def batch(self, order, epoch, i):
        if self.iterator is None or self.next_position != (epoch, i):  # a new epoch, or a resume inside one
            batches = TrainBatches(
                self.data.train_files,
                self.data.train_labels.tolist(),
                order.tolist(),
                self.global_batch,
                self.share,
                self.views,
                self.seed,
                epoch,
            )
            steps = list(range(i, len(batches)))
            device = self.data.train_labels.device
            self.iterator = iter(loader(batches, self.data.workers, device, batch_size=None, sampler=steps))
        item = next(self.iterator)
        if i + 1 == self.global_batches(order):  # the epoch's last batch: its workers may go
            self.close()
        if isinstance(item, str):  # an image that could not be read: one line, and last.pt stays as it was
            self.close()
            raise ConfigError(item)
        crops, labels = item
        self.next_position = (epoch, i + 1)
        device, mean, std = self.data.train_labels.device, self.data.mean, self.data.std
        views = []
        for crop, recipe in zip(crops, self.recipes):
            x = crop.to(device, non_blocking=True).float().div_(255)
            views.append(self.augment_crops(x, recipe, mean, std, self.generator))
        return views, labels.to(device, non_blocking=True)

    def global_batches(self, order):
        return len(order) // self.global_batch

    def close(self):
        """Stop the workers (the end of an epoch, or of the run)."""
        self.iterator, self.next_position = None, None

    def generator_state(self):
        """The generator's state for a checkpoint (nothing is drawn ahead of the batch in progress)."""
        return self.generator.get_state()


def make_views(data, recipes, batch_size, chunk, generator, augment, augment_crops, world, seed):
    """Each batch's views: from the images in memory (Views), or read from disk (StreamViews, --loader stream)."""
    if isinstance(data, StreamData):
        return StreamViews(data, recipes, batch_size, generator, augment_crops, world, seed)
    return Views(data, recipes, batch_size, chunk, generator, augment, world)
