"""combine_member_logits on hand-made member probabilities whose outputs are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from freetickets_hub.uncertainty.outputs import OUTPUT_NAMES, combine_member_logits


def _h(*p: float) -> float:
    """Entropy in nats of a distribution given by its nonzero probabilities."""
    return -sum(x * math.log(x) for x in p)


def _logits(member_probs: list[list[list[float]]]) -> torch.Tensor:
    """(M, B, K) logits whose softmax is ``member_probs``; a zero probability becomes logit -1000."""
    probs = torch.tensor(member_probs, dtype=torch.float64)
    return torch.where(probs > 0, probs.clamp_min(1e-300).log(), torch.full_like(probs, -1000.0))


# (member probabilities for one image, expected probs, entropy, expected entropy, MI, disagreement)
CASES = [
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], math.log(2), 0.0, math.log(2), 0.5),
    ([[0.7, 0.2, 0.1]] * 3, [0.7, 0.2, 0.1], _h(0.7, 0.2, 0.1), _h(0.7, 0.2, 0.1), 0.0, 0.0),
    (
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
        [2 / 3, 1 / 3, 0.0],
        math.log(3) - 2 / 3 * math.log(2),
        0.0,
        math.log(3) - 2 / 3 * math.log(2),
        1 / 3,
    ),
    (
        [[0.5, 0.5], [0.9, 0.1]],
        [0.7, 0.3],
        _h(0.7, 0.3),
        (math.log(2) + _h(0.9, 0.1)) / 2,
        _h(0.7, 0.3) - (math.log(2) + _h(0.9, 0.1)) / 2,
        0.0,
    ),
]


@pytest.mark.parametrize(("members", "probs", "entropy", "expected_entropy", "mi", "disagreement"), CASES)
def test_closed_form(members, probs, entropy, expected_entropy, mi, disagreement):
    out = combine_member_logits(_logits([[m] for m in members]))
    torch.testing.assert_close(out.probs[0].double(), torch.tensor(probs, dtype=torch.float64), atol=1e-6, rtol=0)
    assert out.entropy[0].item() == pytest.approx(entropy, abs=1e-6)
    assert out.expected_entropy[0].item() == pytest.approx(expected_entropy, abs=1e-6)
    assert out.mutual_information[0].item() == pytest.approx(mi, abs=1e-6)
    assert out.disagreement[0].item() == pytest.approx(disagreement, abs=1e-7)
    torch.testing.assert_close(
        out.member_probs[:, 0].double(), torch.tensor(members, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_batch_rows_are_independent_and_shapes_match_design():
    # member m, image b: every image gets its own case, all in one (M=2, B=3, K=2) call
    members = [[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], [[0.0, 1.0], [0.5, 0.5], [0.9, 0.1]]]
    out = combine_member_logits(_logits(members))
    assert tuple(out.to_tuple()[i].shape for i in range(len(OUTPUT_NAMES))) == (
        (3, 2),
        (3, 2),
        (2, 3, 2),
        (3,),
        (3,),
        (3,),
        (3,),
    )
    torch.testing.assert_close(out.mutual_information, torch.tensor([math.log(2), 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.entropy, torch.tensor([math.log(2), math.log(2), _h(0.9, 0.1)]), atol=1e-6, rtol=0)
    # logits are log(probs): softmax and argmax consumers see the ensemble's prediction
    torch.testing.assert_close(out.logits.softmax(-1), out.probs)


def test_temperature_divides_every_member_logit():
    # softmax(log([0.8, 0.2]) / 2) is proportional to sqrt([0.8, 0.2]) = [2/3, 1/3] exactly
    out = combine_member_logits(_logits([[[0.8, 0.2]], [[0.8, 0.2]]]), temperature=2.0)
    torch.testing.assert_close(out.member_probs[:, 0].double(), torch.tensor([[2 / 3, 1 / 3]] * 2, dtype=torch.float64))
    torch.testing.assert_close(out.probs[0].double(), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert out.mutual_information[0].item() == pytest.approx(0.0, abs=1e-7)


def test_zero_member_probabilities_give_finite_uncertainty():
    # a member logit of -inf is a probability of exactly 0: 0 * log 0 must count as 0, not NaN
    out = combine_member_logits(torch.log(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])))
    assert out.entropy.item() == pytest.approx(math.log(2))
    assert out.expected_entropy.item() == 0.0
    assert out.mutual_information.item() == pytest.approx(math.log(2))
