"""Classification metrics from a confusion matrix that is summed across ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ClassificationMetrics:
    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: true, cols: predicted
        self.top5_hits = torch.zeros((), dtype=torch.int64)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach().float().cpu(), targets.detach().cpu().long()
        predicted = logits.argmax(dim=1)
        index = targets * self.num_classes + predicted
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)
        k = min(5, self.num_classes)
        self.top5_hits += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()

    def all_reduce(self) -> None:
        """Sum the counts of every rank (each rank then holds the global result)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([self.confusion.flatten(), self.top5_hits.view(1)]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        self.confusion = packed[:-1].view(self.num_classes, self.num_classes)
        self.top5_hits = packed[-1]

    def compute(self) -> dict:
        confusion = self.confusion.double()
        samples = int(confusion.sum())
        correct = confusion.diag()
        support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
        precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
        recall = torch.where(support > 0, correct / support.clamp(min=1), torch.zeros_like(correct))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                         torch.zeros_like(correct))
        present = (support > 0) | (predicted > 0)  # classes absent from both do not dilute the mean
        return {
            "top1": float(correct.sum() / samples) if samples else 0.0,
            "top5": float(self.top5_hits) / samples if samples else 0.0,
            "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
            "samples": samples,
            "per_class": [{"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for p, r, f, s in zip(precision, recall, f1, support)],
            "confusion": self.confusion.tolist(),
        }


def confusion_image(confusion: list[list[int]], class_names: list[str], cell: int = 0) -> np.ndarray:
    """The row-normalised confusion matrix as an RGB heat-map (H x W x 3 uint8) with class names."""
    from PIL import Image, ImageDraw

    matrix = np.asarray(confusion, dtype=np.float64)
    n = len(matrix)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = cell or max(4, min(40, 800 // max(n, 1)))
    show_names = cell >= 12
    margin = 90 if show_names else 0
    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            shade = int(255 * (1 - rows[i, j]))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255))
    if show_names:
        for i, name in enumerate(class_names[:n]):
            label = name if len(name) <= 12 else name[:11] + "…"
            draw.text((2, margin + i * cell + cell // 2 - 5), label, fill="black")
            draw.text((margin + i * cell + 1, 2 + (i % 6) * 14), label[:6], fill="black")
    return np.asarray(image, dtype=np.uint8)
