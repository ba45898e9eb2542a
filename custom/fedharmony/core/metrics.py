"""Scores from a confusion matrix, and the ignite metrics the classification bundles use.

``confusion`` + ``mean_f1`` serve both tasks: macro-F1 over images (classification) and,
skipping class 0, mean foreground Dice over pixels (segmentation; per class Dice and F1 are
the same number, ``2 TP / (2 TP + FP + FN)``). AUC comes from MONAI's ``ROCAUC`` handler.
"""

from __future__ import annotations

import csv
from typing import Sequence, Union

import torch
from ignite.metrics import Metric
from monai.data import CSVSaver

Batch = Union[torch.Tensor, Sequence[torch.Tensor]]


def confusion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` counts of (true class, predicted class) over images ``(N, C)`` or pixels ``(N, C, ...)``.

    ``labels``: class indices ``(N,)`` / ``(N, 1)`` for images, ``(N, 1, ...)`` for pixels.
    """
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1).reshape(-1)
    true = labels.reshape(-1).long() if logits.ndim == 2 else labels[:, 0].reshape(-1).round().long()
    if true.numel() != pred.numel():
        raise ValueError(f"labels {tuple(labels.shape)} do not match predictions {tuple(logits.shape)}")
    if true.numel() and (true.min() < 0 or true.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes}), got {true.min()}..{true.max()}")
    return torch.bincount(true * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_f1(confusion_matrix: torch.Tensor, include_background: bool = True) -> float:
    """Mean over classes of ``2 TP / (2 TP + FP + FN)``: macro-F1 (all classes) or mean Dice
    (``include_background=False`` skips class 0). Classes absent from both truth and
    prediction are left out (as scikit-learn's macro average does); 0.0 when none is left."""
    cm = confusion_matrix.double()
    tp = cm.diag()
    denominator = cm.sum(0) + cm.sum(1)  # 2 TP + FP + FN
    scores = [2 * tp[c] / denominator[c] for c in range(0 if include_background else 1, cm.shape[0])
              if denominator[c] > 0]
    return float(torch.stack(scores).mean()) if scores else 0.0


def _stack(batch: Batch) -> torch.Tensor:
    return torch.stack([torch.as_tensor(b) for b in batch]) if isinstance(batch, (list, tuple)) else batch


class _ConfusionMetric(Metric):
    """Accumulates a confusion matrix over an epoch; ``output_transform`` gives ``(probabilities, labels)``
    (lists of per-image items, as ``monai.handlers.from_engine`` returns them, or batched tensors)."""

    def reset(self):
        self._cm = None

    def update(self, output):
        pred, label = (_stack(x) for x in output)
        counts = confusion(pred.detach().cpu(), label.detach().cpu())
        self._cm = counts if self._cm is None else self._cm + counts


class MacroF1(_ConfusionMetric):
    """Unweighted mean over classes of per-class F1 (classification)."""

    def compute(self) -> float:
        return mean_f1(self._cm) if self._cm is not None else 0.0


class Accuracy(_ConfusionMetric):
    """Fraction of images whose arg-max class is the label."""

    def compute(self) -> float:
        if self._cm is None or not self._cm.sum():
            return 0.0
        return float(self._cm.diag().sum() / self._cm.sum())


def one_hot_label(label, num_classes: int) -> torch.Tensor:
    """A class index (0-d, ``(1,)``) as a float one-hot vector ``(num_classes,)``."""
    return torch.nn.functional.one_hot(torch.as_tensor(label).long().reshape(()), num_classes).float()


def eval_postprocessing(num_classes: int):
    """Per image after inference: ``pred`` -> softmax probabilities; ``label_onehot`` for MONAI's ``ROCAUC``."""
    from monai.transforms import Activationsd, Compose, CopyItemsd, Lambdad

    return Compose([
        Activationsd(keys="pred", softmax=True),
        CopyItemsd(keys="label", names="label_onehot"),
        Lambdad(keys="label_onehot", func=lambda x: one_hot_label(x, num_classes)),
    ])


class ProbabilityCSVSaver(CSVSaver):
    """MONAI's ``CSVSaver`` (what ``ClassificationSaver`` writes with) plus a header and the predicted class:

        image,nv,bkl,mel,predicted
        /data/ISIC_0000001.png,0.81,0.12,0.07,nv
    """

    def __init__(self, class_names: Sequence[str], output_dir: str = "./", filename: str = "predictions.csv",
                 overwrite: bool = True):
        super().__init__(output_dir=output_dir, filename=filename, overwrite=overwrite)
        self.class_names = list(class_names)

    def finalize(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        new = not self._filepath.exists() or self._filepath.stat().st_size == 0
        with open(self._filepath, "a", newline="") as f:
            writer = csv.writer(f, delimiter=self.delimiter)
            if new:
                writer.writerow(["image", *self.class_names, "predicted"])
            for name, probabilities in self._cache_dict.items():
                values = [float(v) for v in probabilities.flatten()]
                if len(values) != len(self.class_names):
                    raise ValueError(f"{name}: {len(values)} probabilities for {len(self.class_names)} classes")
                best = max(range(len(values)), key=values.__getitem__)
                writer.writerow([name, *(f"{v:.6f}" for v in values), self.class_names[best]])
        self.reset_cache()
