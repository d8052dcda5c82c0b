"""Training building blocks as pure functions: schedules, balance loss, bias update."""

from __future__ import annotations

import math

import pytest
import torch

import nanoseek
from nanoseek.train.balance import RoutingRecorder, balance_loss, max_violation, update_correction_bias
from nanoseek.train.config import TrainConfig
from nanoseek.train.schedule import bias_gamma, learning_rate, mtp_weight
from nanoseek.config import ConfigError


def test_learning_rate_warmup_cosine_and_wsd():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="wsd", wsd_decay_fraction=0.2)
    assert learning_rate(79, wsd) == 1.0
    assert learning_rate(90, wsd) == pytest.approx(0.5)
    assert learning_rate(100, wsd) == pytest.approx(0.0)


def test_mtp_lambda_and_gamma_follow_deepseek_v3_schedule():
    cfg = TrainConfig(max_steps=148)
    assert mtp_weight(0, cfg) == 0.3 and mtp_weight(99, cfg) == 0.3 and mtp_weight(100, cfg) == 0.1
    assert bias_gamma(0, cfg) == 0.001 and bias_gamma(142, cfg) == 0.001 and bias_gamma(143, cfg) == 0.0
    assert bias_gamma(0, TrainConfig(balancing="aux_loss")) == 0.0


def test_balance_loss_matches_hand_computation():
    # 1 sequence, T=2 tokens, E=4 experts, K=1.
    scores = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]], requires_grad=True)
    idx = torch.tensor([[0], [1]])
    loss = balance_loss(scores, idx, n_seqs=1, top_k=1)
    # f = E/(K T) * counts = 4/2 * [1,1,0,0] = [2,2,0,0]; s' rows already sum to 1; P = [0.3,0.4,0.2,0.1]
    assert loss.item() == pytest.approx(2 * 0.3 + 2 * 0.4)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_balance_loss_is_per_sequence():
    scores = torch.rand(6, 4)
    idx = torch.randint(0, 4, (6, 2))
    per_seq = balance_loss(scores, idx, n_seqs=2, top_k=2)
    a = balance_loss(scores[:3], idx[:3], n_seqs=1, top_k=2)
    b = balance_loss(scores[3:], idx[3:], n_seqs=1, top_k=2)
    assert per_seq.item() == pytest.approx((a.item() + b.item()) / 2)
    # a perfectly uniform router gives the minimum, 1.0
    uniform = torch.full((8, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    assert balance_loss(uniform, idx, 1, 2).item() == pytest.approx(1.0)


def test_bias_update_moves_against_load_over_the_whole_step():
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    model.init_weights()
    rec = RoutingRecorder(model)
    with torch.no_grad():
        model(torch.randint(0, 1024, (2, 16)))  # micro-batch 1
        first = rec.step_counts.clone()
        model(torch.randint(0, 1024, (2, 16)))  # micro-batch 2
    assert torch.all(rec.step_counts >= first) and rec.step_counts.sum() > first.sum()
    counts = rec.step_counts.clone()
    before = [g.e_score_correction_bias.clone() for _, g in rec.layers]
    update_correction_bias(rec, gamma=0.001)
    for (_, g), b0, c in zip(rec.layers, before, counts):
        delta = g.e_score_correction_bias - b0
        expected = 0.001 * torch.sign(c.mean() - c)
        assert torch.allclose(delta, expected.float())
    assert all(g.e_score_correction_bias.requires_grad is False for _, g in rec.layers)
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())
    rec.close()


def test_max_violation():
    counts = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]])
    assert max_violation(counts).tolist() == [0.0, 3.0]


def test_train_config_validation():
    with pytest.raises(ConfigError, match="`schedule` must be 'cosine' or 'wsd'"):
        TrainConfig(schedule="linear").validate()
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="`seq_len` must be an integer >= 1"):
        TrainConfig(seq_len=0).validate()
    assert math.isclose(TrainConfig().mtp_lambda_switch, 10 / 14.8)
