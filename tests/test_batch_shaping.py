"""Batch-shaping (Bejnordi et al., ICLR 2020) and ccgn's choice of gate regulariser: the
loss by hand, its gradient, the gate probabilities it reads, and ccgn's loss with each
regulariser."""

import pytest
import torch
from clbench.strategies import ccgn
from clbench.strategies.ccgn import ConditionalGating, regulariser_weights
from conftest import train_tasks
from scipy import stats
from torch import nn

from clbench.batch_shaping import PDF_CLIP, BetaCDF, batch_shaping_loss
from clbench.errors import UserError
from clbench.gates import GatedLayer, gumbel_sigmoid_straight_through
from clbench.path_network import PathTrace
from clbench.registry import get_strategy

CCGN = get_strategy("ccgn")


def test_loss_is_the_cramer_von_mises_distance_to_the_beta_cdf_averaged_over_gates():
    x = torch.tensor([[0.2, 0.9], [0.7, 0.1], [0.5, 0.5]], dtype=torch.float64)
    cdf = lambda v: stats.beta.cdf(v, 0.6, 0.4)
    # Each gate's values sorted; empirical CDF i / (N + 1) = 1/4, 2/4, 3/4 (N = 3).
    first = (1 / 4 - cdf(0.2)) ** 2 + (2 / 4 - cdf(0.5)) ** 2 + (3 / 4 - cdf(0.7)) ** 2
    second = (1 / 4 - cdf(0.1)) ** 2 + (2 / 4 - cdf(0.5)) ** 2 + (3 / 4 - cdf(0.9)) ** 2
    expected = (first / 3 + second / 3) / 2
    assert batch_shaping_loss(x, 0.6, 0.4).item() == pytest.approx(expected, rel=1e-12)


def test_gradient_vanishes_at_the_prior_quantiles_of_the_empirical_cdf_positions():
    n = 5
    quantiles = torch.tensor(stats.beta.ppf([i / (n + 1) for i in range(1, n + 1)], 0.6, 0.4))
    # Three gates holding the same quantiles in different sample orders.
    x = torch.stack([quantiles[torch.randperm(n, generator=torch.Generator().manual_seed(s))] for s in range(3)], 1)
    x.requires_grad_(True)
    loss = batch_shaping_loss(x, 0.6, 0.4)
    loss.backward()
    assert loss.item() == pytest.approx(0, abs=1e-20)
    assert torch.allclose(x.grad, torch.zeros_like(x), atol=1e-12)


def test_gradient_is_the_beta_pdf_and_matches_finite_differences():
    x = torch.tensor([0.05, 0.3, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    BetaCDF.apply(x, 0.6, 0.4).sum().backward()
    pdf = stats.beta.pdf(x.detach().numpy()[:3], 0.6, 0.4)
    assert torch.allclose(x.grad[:3], torch.tensor(pdf))
    assert x.grad[3] == PDF_CLIP  # the pdf is infinite at 1
    batch = torch.tensor([[0.1, 0.6, 0.35], [0.7, 0.2, 0.9], [0.4, 0.95, 0.05], [0.25, 0.5, 0.65]],
                         dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: batch_shaping_loss(b, 0.6, 0.4), (batch,))


def test_gates_record_their_probability_before_the_noise_without_changing_the_mask():
    layer = GatedLayer(nn.Conv2d(2, 4, 3), None, n_tasks=1, temperature=2 / 3).train()
    x = torch.randn(8, 2, 5, 5)
    torch.manual_seed(1)
    trace = PathTrace()
    mask = layer.mask(x, 0, trace)
    logits = layer.gates[0](x.mean((2, 3)))
    torch.manual_seed(1)
    assert torch.equal(mask, gumbel_sigmoid_straight_through(logits, 2 / 3))
    assert len(trace.probabilities) == 1 and torch.allclose(trace.probabilities[0], torch.sigmoid(logits))
    layer.eval()
    layer.mask(x, 0, trace)
    assert len(trace.probabilities) == 1  # none at test


def train_recording_losses(tiny_scenario, monkeypatch, tasks, **hparams) -> list[dict]:
    """ccgn's loss, task loss, gate probabilities and masks at every training iteration
    of the first `tasks` tasks (10 iterations each)."""
    records = []
    criterion = ConditionalGating.criterion

    def recording(self):
        loss = criterion(self)
        if self.is_training:
            records.append({"loss": loss.item(), "task_loss": self.task_loss().item(),
                            "probabilities": [p.detach() for p in self.trace.probabilities],
                            "masks": [m.detach() for m in self.trace.masks]})
        return loss

    monkeypatch.setattr(ConditionalGating, "criterion", recording)
    train_tasks(CCGN, tiny_scenario, "task", tasks, "small_cnn", 4, {"lr": 0.01, **hparams})
    return records


def test_batch_shaping_adds_its_weighted_term_falling_to_zero_in_each_task(tiny_scenario, monkeypatch):
    """The loss is the task loss plus the weighted batch-shaping term, which is not
    computed once its weight is zero (its Beta CDF goes through scipy, on the CPU)."""
    computed = []
    monkeypatch.setattr(ccgn, "batch_shaping_loss", lambda *args: computed.append(args) or batch_shaping_loss(*args))
    records = train_recording_losses(tiny_scenario, monkeypatch, 2, gate_regulariser="batch_shaping")
    assert len(records) == 20 and len(computed) == 2 * 2 * 3  # the first 2 of each task's 10 iterations, 3 layers
    for index, record in enumerate(records):
        weight = 0.75 * max(0.0, 1 - index % 10 / 10 / 0.2)  # gamma, zero from 20% of each task's iterations
        shaping = torch.stack([batch_shaping_loss(p, 0.6, 0.4) for p in record["probabilities"]]).mean()
        assert len(record["probabilities"]) == 3  # every gated layer of the small CNN
        assert record["loss"] == pytest.approx(record["task_loss"] + weight * shaping.item(), rel=1e-6)
    assert records[10]["loss"] > records[10]["task_loss"] + 1e-4


def test_default_loss_is_task_loss_plus_sparsity_times_mean_gate(tiny_scenario, monkeypatch):
    records = train_recording_losses(tiny_scenario, monkeypatch, 1)
    for record in records:
        mean_gate = torch.stack([m.mean() for m in record["masks"]]).mean().item()
        assert record["loss"] == pytest.approx(record["task_loss"] + 0.05 * mean_gate, rel=1e-6)
    assert any(record["loss"] > record["task_loss"] for record in records)


def test_both_brings_in_the_mean_activation_as_batch_shaping_fades():
    hp = CCGN.Hparams(gate_regulariser="both", sparsity=0.1)
    weights = [regulariser_weights(hp, done) for done in (0.0, 0.1, 0.2, 0.4, 0.6, 1.0)]
    expected = [(0.0, 0.75), (0.0, 0.375), (0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.1, 0.0)]
    assert [w for pair in weights for w in pair] == pytest.approx([w for pair in expected for w in pair])
    assert regulariser_weights(CCGN.Hparams(gate_regulariser="batch_shaping"), 0.8) == (0.0, 0.0)
    with pytest.raises(UserError, match="l0_end"):
        CCGN.from_hparams({"l0_start": 0.5, "l0_end": 0.3})
