"""Preference tuning (rl: dpo, ipo, orpo, simpo, kto): losses equal TRL's, every key acts, bad input is one line."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.preference import LabelledCompletion, PreferencePair, collate_completions, collate_pairs
from lmforge.train.preference import DPO, KTO, ORPO, SimPO

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "bench" / "preference_parity.json"
sys.path.insert(0, str(REPO / "bench"))


def _unpack(text: str, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy()).reshape(like.shape)


def _model(weights: dict[str, str]) -> torch.nn.Module:
    from preference_parity import tiny_model

    model = tiny_model()
    state = model.state_dict()
    model.load_state_dict({name: _unpack(weights[name], state[name]) for name in state})
    return model.train()


@pytest.fixture(scope="module")
def trl() -> dict:
    return json.loads(PARITY.read_text())


def _check(trl_case: dict, objective: object, batch: dict, model: torch.nn.Module, count_of: int) -> None:
    loss_sum, count, metrics = objective(model, batch)
    assert count == count_of
    loss = loss_sum / count
    loss.backward()
    assert abs(loss.item() - trl_case["loss"]) < 1e-5, (loss.item(), trl_case["loss"])
    for name, value in trl_case["metrics"].items():
        assert abs(float(metrics[name]) - value) < 1e-5, (name, float(metrics[name]), value)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trl_case["grads"])  # the same parameters get gradients
    for name, grad in grads.items():
        expected = _unpack(trl_case["grads"][name], grad)
        assert torch.allclose(grad, expected, atol=1e-5, rtol=0), (name, (grad - expected).abs().max())


def _pairs(trl: dict) -> dict:
    return collate_pairs([PreferencePair(p, c, r) for p, c, r in trl["pairs"]], pad_token_id=0)


@pytest.mark.parametrize("case, objective", [
    ("dpo_sigmoid", DPO(beta=0.1)),
    ("ipo", DPO(beta=0.1, loss_types=("ipo",))),
    ("hinge", DPO(beta=0.1, loss_types=("hinge",))),
])
def test_dpo_losses_rewards_and_gradients_equal_trl(trl: dict, case: str, objective: DPO) -> None:
    reference = _model(trl["reference_weights"]).eval().requires_grad_(False)
    _check(trl[case], objective.with_reference(reference), _pairs(trl), _model(trl["weights"]), count_of=3)


def test_orpo_equals_trl(trl: dict) -> None:
    _check(trl["orpo"], ORPO(beta=trl["orpo"]["settings"]["beta"]), _pairs(trl), _model(trl["weights"]), count_of=3)


def test_simpo_equals_trl(trl: dict) -> None:
    settings = trl["simpo"]["settings"]
    objective = SimPO(beta=settings["beta"], gamma=settings["gamma"], cpo_alpha=settings["cpo_alpha"])
    _check(trl["simpo"], objective, _pairs(trl), _model(trl["weights"]), count_of=3)


def test_kto_equals_trl(trl: dict) -> None:
    rows = [LabelledCompletion(p, a, d) for p, a, d in trl["kto_rows"]]
    settings = trl["kto"]["settings"]
    reference = _model(trl["reference_weights"]).eval().requires_grad_(False)
    objective = KTO(beta=0.1, desirable_weight=settings["desirable_weight"], undesirable_weight=settings["undesirable_weight"])
    _check(trl["kto"], objective.with_reference(reference), collate_completions(rows, 0), _model(trl["weights"]), count_of=4)
