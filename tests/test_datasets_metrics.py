"""The task's metrics (selected by the model's task) against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from fedilora.data.metrics import MultilabelSamplesF1Score
from fedilora.model import LoRACLIPClassifier


def _metrics(task, num_classes, preds, target):
    metrics = LoRACLIPClassifier(num_classes=num_classes, task=task).build_metrics()
    metrics.update(preds[:2], target[:2])  # two batches: the states accumulate
    metrics.update(preds[2:], target[2:])
    return {k: float(v) for k, v in metrics.compute().items()}


def test_multiclass_top1_top5_and_macro_f1():
    # 6 classes; predicted classes 0, 2, 2, 5; sample 3's true class 3 has the lowest score (outside the top 5)
    probs = torch.tensor(
        [
            [0.50, 0.10, 0.10, 0.10, 0.10, 0.10],
            [0.05, 0.30, 0.40, 0.10, 0.10, 0.05],
            [0.10, 0.10, 0.50, 0.10, 0.10, 0.10],
            [0.20, 0.20, 0.10, 0.02, 0.08, 0.40],
        ]
    )
    values = _metrics("multiclass", 6, probs, torch.tensor([0, 1, 2, 3]))
    assert list(values) == ["acc", "acc_top5", "f1_macro"]  # the headline first
    assert values["acc"] == pytest.approx(2 / 4)
    assert values["acc_top5"] == pytest.approx(3 / 4)
    # per-class F1: c0 1, c1 0, c2 2/3 (tp 1, fp 1), c3 0, c5 0 (a false positive); c4 appears nowhere
    # and is left out of the macro average, as torchmetrics does
    assert values["f1_macro"] == pytest.approx((1 + 0 + 2 / 3 + 0 + 0) / 5)


def test_multiclass_with_five_classes_or_fewer_has_no_top5():
    metrics = LoRACLIPClassifier(num_classes=5).build_metrics()
    assert list(metrics) == ["acc", "f1_macro"]


def test_multilabel_micro_macro_and_samples_f1():
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    predicted = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]])
    probs = torch.where(predicted.bool(), 0.9, 0.1)
    values = _metrics("multilabel", 3, probs, target)
    assert list(values) == ["f1_micro", "f1_macro", "f1_samples"]
    # tp 4, fp 1, fn 2 over all labels
    assert values["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    # per label: 1, 1, 0 (label 2: tp 0, fp 1, fn 2)
    assert values["f1_macro"] == pytest.approx(2 / 3)
    # per sample: 2/3 (tp 1, fn 1), 2/3 (tp 1, fp 1), 1, 0
    assert values["f1_samples"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0) / 4)


def test_samples_f1_is_sklearns_samples_average():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(64, 7, generator=g) < 0.3).long()
    probs = torch.rand(64, 7, generator=g)
    metric = MultilabelSamplesF1Score()
    metric.update(probs[:30], target[:30])
    metric.update(probs[30:], target[30:])
    expected = sklearn.f1_score(target.numpy(), (probs > 0.5).long().numpy(), average="samples", zero_division=0)
    assert float(metric.compute()) == pytest.approx(expected)


def test_binary_auroc_and_accuracy():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    values = _metrics("binary", 2, scores, torch.tensor([0, 0, 1, 1]))
    assert list(values) == ["auroc", "acc"]
    # positives (0.35, 0.8) against negatives (0.1, 0.4): 3 of the 4 pairs are ordered right
    assert values["auroc"] == pytest.approx(3 / 4)
    # thresholded at 0.5: predictions 0, 0, 0, 1
    assert values["acc"] == pytest.approx(3 / 4)
