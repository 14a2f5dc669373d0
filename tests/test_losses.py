"""Metric losses against naive re-implementations, and each one actually trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from imlt.trainer.config import LOSS_DEFAULTS, LossConfig, LossName, MODEL_PARALLEL_LOSSES
from imlt.trainer.losses import LOSSES, AMSoftmaxLoss, ArcFaceLoss, CosFaceLoss, LossOutput, MetricLoss, ModelParallelLoss, build_loss

SINGLE_PROCESS = [n for n in LossName if n not in MODEL_PARALLEL_LOSSES]


def _data(n: int = 12, dim: int = 8, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g), dim=1), torch.randint(0, classes, (n,), generator=g)


def _naive_margin_ce(cos: torch.Tensor, labels: torch.Tensor, target_logit, scale: float) -> torch.Tensor:
    """Per-sample loop: softmax cross-entropy where only the target's cosine is transformed."""
    losses = []
    for i in range(cos.shape[0]):
        y = int(labels[i])
        logits = [scale * float(cos[i, j]) for j in range(cos.shape[1])]
        logits[y] = scale * target_logit(float(cos[i, y]))
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_sum - logits[y])
    return torch.tensor(sum(losses) / len(losses))


def _cosines(x: torch.Tensor, centres_rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) @ F.normalize(centres_rows, dim=1).t()


def test_amsoftmax_matches_a_naive_loop() -> None:
    x, y = _data()
    loss = AMSoftmaxLoss(5, 8, margin=0.4, scale=30.0)
    expected = _naive_margin_ce(_cosines(x, loss.centers.detach()), y, lambda c: c - 0.4, 30.0)
    assert loss(x, y).total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_amsoftmax_equals_pml_cosface_with_the_same_centres() -> None:
    x, y = _data(seed=1)
    ours = AMSoftmaxLoss(5, 8, margin=0.35, scale=64.0)
    pml = pml_losses.CosFaceLoss(num_classes=5, embedding_size=8, margin=0.35, scale=64.0)
    with torch.no_grad():
        pml.W.copy_(ours.centers.t())
    assert ours(x, y).total.item() == pytest.approx(pml(x, y).item(), rel=1e-5)


def test_amsoftmax_ignores_embedding_norm() -> None:
    x, y = _data(seed=2)
    loss = AMSoftmaxLoss(5, 8)
    assert loss(x * 7.0, y).total.item() == pytest.approx(loss(x, y).total.item(), rel=1e-5)


def test_arcface_matches_a_naive_loop_with_margin_in_degrees() -> None:
    x, y = _data(seed=3)
    loss = build_loss(LossConfig(name=LossName.ARCFACE, auto_scale=False), 5, 8)  # the reference scale 64
    assert isinstance(loss, ArcFaceLoss)
    m = math.radians(LOSS_DEFAULTS[LossName.ARCFACE][0])

    def target(c: float) -> float:
        theta = math.acos(max(-1.0, min(1.0, c)))
        return math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)

    expected = _naive_margin_ce(_cosines(x, loss.pml.W.detach().t()), y, target, 64.0)
    assert loss(x, y).total.item() == pytest.approx(expected.item(), rel=1e-4)


def test_cosface_matches_a_naive_loop() -> None:
    x, y = _data(seed=4)
    loss = build_loss(LossConfig(name=LossName.COSFACE, margin=0.2, scale=16.0), 5, 8)
    assert isinstance(loss, CosFaceLoss)
    expected = _naive_margin_ce(_cosines(x, loss.pml.W.detach().t()), y, lambda c: c - 0.2, 16.0)
    assert loss(x, y).total.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_shapes_grads_and_parameters(name: LossName) -> None:
    loss = build_loss(LossConfig(name=name), 5, 8)
    assert isinstance(loss, LOSSES[name])
    x, y = _data()
    x.requires_grad_(True)
    out = loss(x, y)
    assert isinstance(out, LossOutput)
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    assert not out.metric.requires_grad and not out.classification.requires_grad
    out.total.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = dict(loss.named_parameters())
    assert params, "class centres must be parameters of the loss"
    assert all(p.grad is not None for p in params.values())
    assert loss.classifier is None  # weight 1: no softmax head at all
    assert sum(p.numel() for p in params.values()) == 5 * 8  # exactly the centres


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_weight_mixes_in_a_linear_softmax_head(name: LossName) -> None:
    loss = build_loss(LossConfig(name=name, weight=0.3), 5, 8)
    x, y = _data(seed=5)
    out = loss(x, y)
    assert loss.classifier is not None
    head_ce = F.cross_entropy(loss.classifier(x), y)
    assert out.classification.item() == pytest.approx(head_ce.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(0.3 * out.metric.item() + 0.7 * head_ce.item(), rel=1e-5)
    names = {n for n, _ in loss.named_parameters()}
    assert {"classifier.weight", "classifier.bias"} <= names


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_computes_in_fp32_under_autocast(name: LossName) -> None:
    loss = build_loss(LossConfig(name=name), 5, 8)
    x, y = _data(seed=6)
    reference = loss(x, y).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x.to(torch.bfloat16), y)
    assert out.total.dtype == torch.float32
    assert next(iter(loss.parameters())).dtype == torch.float32
    assert out.total.item() == pytest.approx(reference.item(), rel=0.05, abs=0.05)  # bf16 inputs, fp32 maths


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_loss_decreases_on_a_tiny_embedding_problem(name: LossName) -> None:
    torch.manual_seed(0)
    classes, dim = 4, 16
    means = torch.randn(classes, 32) * 2
    labels = torch.arange(classes).repeat_interleave(8)
    inputs = means[labels] + torch.randn(len(labels), 32)
    head = torch.nn.Linear(32, dim)
    loss = build_loss(LossConfig(name=name), classes, dim)
    opt = torch.optim.Adam([*head.parameters(), *loss.parameters()], lr=0.01)
    centres_before = [p.detach().clone() for p in loss.parameters()]
    values = []
    for _ in range(30):
        out = loss(F.normalize(head(inputs), dim=1), labels)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        values.append(out.total.item())
    assert values[-1] < 0.7 * values[0], values
    assert any(not torch.equal(a, b) for a, b in zip(centres_before, loss.parameters()))


@pytest.mark.parametrize("name", sorted(MODEL_PARALLEL_LOSSES, key=lambda n: n.value))
def test_model_parallel_losses_build_from_the_same_registry(name: LossName) -> None:
    """In one process a model-parallel loss holds every class; its collectives are identities."""
    loss = build_loss(LossConfig(name=name), 5, 8)
    assert isinstance(loss, ModelParallelLoss) and (loss.classifier.start, loss.classifier.end) == (0, 5)
    out = loss(torch.randn(4, 8), torch.tensor([0, 1, 4, 4]))
    assert torch.isfinite(out.total)


def test_registry_covers_every_loss() -> None:
    assert set(LOSSES) == set(LossName)
    assert all(issubclass(LOSSES[n], MetricLoss) for n in SINGLE_PROCESS)
    assert all(issubclass(LOSSES[n], ModelParallelLoss) for n in MODEL_PARALLEL_LOSSES)


def test_bad_shapes_are_clear_errors() -> None:
    loss = build_loss(LossConfig(), 5, 8)
    with pytest.raises(ValueError, match=r"embeddings must be \(N, 8\)"):
        loss(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be"):
        loss(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        loss(torch.randn(2, 8), torch.tensor([0, 5]))
