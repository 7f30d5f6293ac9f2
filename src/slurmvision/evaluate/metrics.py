"""Classification metrics from a confusion matrix that is summed across ranks, and its picture."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from slurmvision.errors import DataError


class ClassificationMetrics:
    """Top-1, top-5 and F1 from counts, so that ranks can add theirs up exactly.

    The counts live on the device of the first batch, so evaluation on a GPU does not copy every
    batch's logits to the host.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.k = min(5, num_classes)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: true, cols: predicted
        self.topk_hits = torch.zeros((), dtype=torch.int64)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one batch: `logits` is N x num_classes, `targets` holds N class indices."""
        n = self.num_classes
        if logits.ndim != 2 or logits.shape[1] != n or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits N x {n} and targets N, got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        logits, targets = logits.detach(), targets.detach().to(logits.device, torch.int64)
        if targets.numel() and bool(((targets < 0) | (targets >= n)).any()):
            bad = targets[(targets < 0) | (targets >= n)][0].item()
            raise DataError(
                f"label {bad} is outside the model's {n} classes: set model.num_classes to the number "
                f"of classes in the data, or rebuild the shards"
            )
        if self.confusion.device != logits.device:
            self.confusion, self.topk_hits = self.confusion.to(logits.device), self.topk_hits.to(logits.device)
        predicted = logits.argmax(dim=1)
        self.confusion += torch.bincount(targets * n + predicted, minlength=n * n).view(n, n)
        self.topk_hits += (logits.topk(self.k, dim=1).indices == targets[:, None]).any(dim=1).sum()

    def all_reduce(self) -> None:
        """Sum the counts of every rank, so every rank holds the global result.

        Call it once, after the last update: a second call would add the global counts again.
        Without an initialised process group it does nothing (a single process is already global).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces CUDA tensors only; gloo is safest with host tensors.
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        packed = torch.cat([self.confusion.flatten(), self.topk_hits.view(1)]).to(device)
        dist.all_reduce(packed)
        packed = packed.to(self.confusion.device)
        self.confusion = packed[:-1].view(self.num_classes, self.num_classes).clone()
        self.topk_hits = packed[-1].clone()

    def compute(self) -> dict:
        """top1, top5 (fractions), f1_macro, precision_macro, recall_macro, per_class, samples and the
        confusion matrix as lists. A macro average is over the classes present in the targets or the
        predictions (scikit-learn's default labels); an undefined precision or recall counts as 0."""
        counts = self.confusion.cpu()
        confusion = counts.double()
        samples = int(counts.sum())
        correct = confusion.diag()
        support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
        precision = correct / predicted.clamp(min=1)  # 0 where a class is never predicted
        recall = correct / support.clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        # A class seen neither in targets nor in predictions says nothing; it must not drag the mean to 0.
        present = (support > 0) | (predicted > 0)

        def macro(values: torch.Tensor) -> float:
            return float(values[present].mean()) if bool(present.any()) else 0.0

        return {
            "top1": float(correct.sum()) / samples if samples else 0.0,
            "top5": int(self.topk_hits) / samples if samples else 0.0,
            "f1_macro": macro(f1),
            "precision_macro": macro(precision),
            "recall_macro": macro(recall),
            "per_class": [
                {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for p, r, f, s in zip(precision, recall, f1, support)
            ],
            "samples": samples,
            "confusion": counts.tolist(),
        }


def confusion_image(
    confusion: list[list[int]] | np.ndarray, class_names: list[str] | None = None, cell: int | None = None
) -> np.ndarray:
    """The row-normalised confusion matrix as an RGB heat-map, H x W x 3 uint8.

    Rows are true classes, columns predicted ones; the darker the cell, the larger the share of
    the row. Names are drawn when a cell is tall enough for a line of text, and percentages when
    it is wide enough for them. Ready for `SummaryWriter.add_image(tag, image, dataformats="HWC")`.
    """
    from PIL import Image, ImageDraw, ImageFont

    matrix = np.asarray(confusion, dtype=np.float64).reshape(len(confusion), -1)
    n = matrix.shape[0]
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    cell = cell or max(1, min(40, 1000 // max(n, 1)))  # keep the picture near 1000 px whatever the class count
    font = ImageFont.load_default()
    names = list(class_names or [])
    latin1_only = not isinstance(font, ImageFont.FreeTypeFont)  # Pillow's fallback font without FreeType
    labels = [_label(names[i] if i < len(names) else str(i), latin1_only) for i in range(n)]
    text_height = font.getbbox("Ag")[3] + 2
    show_names = n > 0 and cell >= text_height
    margin = 6 + max((int(font.getlength(label)) for label in labels), default=0) if show_names else 0

    image = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(image)
    show_values = cell >= font.getlength("100") + 4
    for i in range(n):
        for j in range(n):
            shade = int(round(255 * (1 - rows[i, j])))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255))
            if show_values and matrix[i, j]:
                draw.text(
                    (x + cell / 2, y + cell / 2),
                    f"{100 * rows[i, j]:.0f}",
                    anchor="mm",
                    font=font,
                    fill="white" if shade < 128 else "black",
                )
    if show_names:
        for i, label in enumerate(labels):
            middle = margin + i * cell + cell // 2
            draw.text((margin - 3, middle), label, anchor="rm", font=font, fill="black")  # true class, left
            # Predicted class names go on top, written upwards so long names do not overlap.
            width = int(font.getlength(label)) + 1
            strip = Image.new("RGB", (width, text_height), "white")
            ImageDraw.Draw(strip).text((0, text_height // 2), label, anchor="lm", font=font, fill="black")
            strip = strip.rotate(90, expand=True)
            image.paste(strip, (middle - text_height // 2, margin - 3 - width))
    return np.asarray(image, dtype=np.uint8)


def _label(name: str, latin1_only: bool, limit: int = 16) -> str:
    label = name if len(name) <= limit else name[: limit - 3] + "..."
    # The bitmap font raises on characters outside Latin-1; a "?" is better than no picture.
    return label.encode("latin-1", errors="replace").decode("latin-1") if latin1_only else label


def confusion_csv(confusion: list[list[int]], class_names: list[str]) -> str:
    """The confusion matrix as CSV: a header of predicted class names, then one row per true class."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    writer.writerows([name, *row] for name, row in zip(class_names, confusion))
    return out.getvalue()
