"""Data sets: an ImageFolder directory (ImageNet layout) or the built-in ``digits``.

Images come out as float tensors in [0, 1], (C, H, W), *not* normalised: the keyed
model shuffles first and normalises after (see :class:`keyedge.KeyedClassifier`).

``digits`` is scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits,
shipped inside the package, no download), upsampled **bilinearly** to the model's
input size and replicated to 3 channels. Nearest-neighbour upsampling would make
every block constant and a block-shuffle key a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import KeyedgeError

DIGITS = "digits"


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    classes: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def digits_tensors(img_size: int, channels: int = 3, *, test_fraction: float = 0.2,
                   split_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).expand(-1, channels, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           stratify=labels.numpy(), random_state=split_seed)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def _imagefolder(root: Path, img_size: int, train: bool) -> Dataset:
    from torchvision import datasets, transforms

    if train:
        tf = transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=(0.08, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ])
    else:
        tf = transforms.Compose([
            transforms.Resize(int(round(img_size / 0.875))),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
        ])
    try:
        return datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise KeyedgeError(f"{root}: {str(exc).splitlines()[0]}") from None


def load_data(spec: str, img_size: int, channels: int = 3) -> DataSplits:
    """``spec`` is ``digits`` or a directory with ``train/`` and ``val/`` class folders."""
    if spec == DIGITS:
        xtr, ytr, xte, yte = digits_tensors(img_size, channels)
        return DataSplits(TensorDataset(xtr, ytr), TensorDataset(xte, yte),
                          [str(i) for i in range(10)],
                          f"digits (sklearn load_digits, bilinear to {img_size}x{img_size}, "
                          f"{len(ytr)} train / {len(yte)} test, stratified split seed 0)")
    root = Path(spec)
    if not root.exists():
        raise KeyedgeError(f"data path {root} does not exist (use 'digits' for the built-in data set)")
    if not root.is_dir():
        raise KeyedgeError(f"data path {root} is not a directory")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise KeyedgeError(f"data path {root} has no {split}/ directory (ImageNet layout: "
                               "train/<class>/*.jpg and val/<class>/*.jpg)")
    train = _imagefolder(root / "train", img_size, train=True)
    test = _imagefolder(root / "val", img_size, train=False)
    if train.classes != test.classes:
        raise KeyedgeError(f"{root}: train/ and val/ have different class folders")
    return DataSplits(train, test, list(train.classes), f"ImageFolder {root}")


def sample(dataset: Dataset, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` (image, label) pairs as two tensors.

    ImageFolder data sets are sorted by class, so a prefix would be one class only.
    """
    n = min(n, len(dataset))
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        if n == len(x):
            return x.clone(), y.clone()
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return x[order].clone(), y[order].clone()
    items = [dataset[int(i)] for i in order]
    return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero padding): digits augmentation."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def run_images(run_manifest, n: int, *, seed: int = 0, data: str | None = None,
               train: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``n`` real images for a run (a :class:`~keyedge.core.manifests.RunManifest`): its own data set
    (or ``data``), None where it is not here."""
    spec = data or run_manifest.data.spec
    if data is None and (spec is None or (spec != DIGITS and not Path(spec).is_dir())):
        return None  # the run's own data set is not on this machine (``data`` given: refused if it is not)
    splits = load_data(spec, run_manifest.input.size[0], run_manifest.input.channels)
    return sample(splits.train if train else splits.test, n, seed=seed)
