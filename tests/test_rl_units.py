"""GRPO loss variants against hand computations; verifiers against hostile input; tasks."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek.rl.loss import group_advantages, kl_k3, policy_loss
from nanoseek.config import ConfigError
from nanoseek.rl.tasks import (ArithmeticTask, CountdownTask, FileTask, Problem, R1_ZERO_TEMPLATE, RewardConfig,
                               get_task)
from nanoseek.rl.verify import countdown_correct, evaluate_expression, extract_answer, has_r1_format, numbers_equal


# ---- loss ----------------------------------------------------------------------------------------

def test_equal_rewards_give_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    assert torch.equal(adv, torch.zeros(6))
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    assert adv[0] > 0 > adv[1] and adv.sum().abs() < 1e-6
    assert torch.allclose(group_advantages(torch.tensor([3.0, 1.0]), 2, scale_by_std=False), torch.tensor([1.0, -1.0]))


def test_tied_rewards_that_are_not_exact_in_floating_point_give_exactly_zero():
    # 0.1 (format reward only) for every completion: mean != 0.1 in fp32, and a 1e-5 residue of one
    # sign, normalized by Adam, once pushed down everything the policy sampled.
    for scale in (True, False):
        adv = group_advantages(torch.tensor([0.1] * 8 + [1.1] * 4 + [0.1] * 4), 8, scale_by_std=scale)
        assert torch.equal(adv[:8], torch.zeros(8))
        assert adv[8] > 0 > adv[12]


def test_kl_k3_nonnegative_and_zero_for_identical_policies():
    a = torch.randn(100)
    b = torch.randn(100)
    assert torch.all(kl_k3(a, b) >= 0)
    assert torch.equal(kl_k3(a, a), torch.zeros(100))
    # value check: d = 1 -> e - 2
    assert kl_k3(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.e - 2)


def _inputs():
    logp_old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.8, 0.5, 0.55], [0.3, 0.5, 0.5]]))  # ratios [1.6,1,1.1] and [0.6,1,1]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second completion has 2 tokens
    adv = torch.tensor([1.0, -1.0])
    return logp, logp_old, adv, mask


def test_grpo_loss_hand_computed():
    logp, logp_old, adv, mask = _inputs()
    loss, stats = policy_loss(logp, logp_old, adv, mask, variant="grpo", eps_low=0.2)
    # seq 1 (A=+1): min(r, clip(r)) = [1.2, 1.0, 1.1] -> mean 1.1
    # seq 2 (A=-1): min(-r, -clip(r)) = [-0.8, -1.0] -> mean -0.9 (clip(0.6)=0.8, -0.8 < -0.6)
    assert loss.item() == pytest.approx(-(1.1 + -0.9) / 2)
    assert stats.clip_fraction == pytest.approx(2 / 5)  # token 1 of seq 1 and token 1 of seq 2 clipped


def test_dr_grpo_and_dapo_normalizers():
    logp, logp_old, adv, mask = _inputs()
    loss, _ = policy_loss(logp, logp_old, adv, mask, variant="dr_grpo", max_len=4)
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 1.1 - 0.8 - 1.0) / (2 * 4))
    loss, _ = policy_loss(logp, logp_old, adv, mask, variant="dapo", eps_low=0.2, eps_high=0.28)
    # clip-higher: token 1 of seq 1 is clipped at 1.28
    assert loss.item() == pytest.approx(-(1.28 + 1.0 + 1.1 - 0.8 - 1.0) / 5)


def test_kl_term_enters_the_loss():
    logp, logp_old, adv, mask = _inputs()
    ref = logp_old
    base, _ = policy_loss(logp, logp_old, adv, mask, variant="grpo")
    with_kl, stats = policy_loss(logp, logp_old, adv, mask, variant="grpo", beta=0.5, logp_ref=ref)
    per_tok = kl_k3(logp, ref)
    expected_kl = ((per_tok * mask).sum(1) / mask.sum(1)).mean()
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * expected_kl.item(), rel=1e-6)
    assert stats.kl > 0
    with pytest.raises(ValueError, match="needs the reference"):
        policy_loss(logp, logp_old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="unknown loss variant"):
        policy_loss(logp, logp_old, adv, mask, variant="ppo")


def test_a_grpo_step_raises_the_probability_of_the_rewarded_completion():
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)  # a toy policy over 4 one-token completions
    opt = torch.optim.SGD([logits], lr=0.5)
    completions = torch.tensor([0, 1, 2, 3])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    before = torch.softmax(logits, 0)[0].item()
    for _ in range(3):
        logp_all = torch.log_softmax(logits, 0)
        logp = logp_all[completions].unsqueeze(1)
        loss, _ = policy_loss(logp, logp.detach(), group_advantages(rewards, 4), torch.ones(4, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, 0)[0].item() > before + 0.1


# ---- verifiers -----------------------------------------------------------------------------------

def test_answer_extraction_and_format():
    good = "<think> 2 + 2 is 4 </think> <answer> 4 </answer>"
    assert extract_answer(good) == "4" and has_r1_format(good)
    assert not has_r1_format("<answer>4</answer>")
    assert not has_r1_format("blah <think>x</think><answer>4</answer>")
    assert not has_r1_format("<think>a</think><answer>1</answer><answer>2</answer>")
    assert extract_answer("no tags") is None


@pytest.mark.parametrize("answer,expected,ok", [
    ("42", "42", True), ("42.0", "42", True), ("1,000", "1000", True), ("-7", "-7", True),
    ("41", "42", False), ("forty-two", "42", False), ("9" * 500, "9" * 500, False),
    ("__import__('os').system('rm -rf /')", "0", False), ("", "0", False), (None, "0", False),
])
def test_numbers_equal(answer, expected, ok):
    assert numbers_equal(answer, expected) is ok


@pytest.mark.parametrize("expr,numbers,target,ok", [
    ("(3 + 5) * 2", [2, 3, 5], 16, True),
    ("3 × 5 + 2", [2, 3, 5], 17, True),
    ("(8 - 2) / 3 = 2", [8, 2, 3], 2, True),
    ("3 + 5", [2, 3, 5], 8, False),  # 2 unused
    ("3 + 5 + 5", [3, 5], 13, False),  # 5 used twice
    ("3 / (5 - 5)", [3, 5, 5], 0, False),  # division by zero
    ("2 ** 100", [2, 100], 0, False),  # no power operator
    ("__import__('os').system('ls')", [1], 1, False),
    ("9" * 100 + " - " + "9" * 100, [int("9" * 100)] * 2, 0, False),  # number too long
    ("(" * 50 + "1" + ")" * 50, [1], 1, False),  # nesting too deep
    ("1 +", [1], 1, False),
])
def test_countdown_checker(expr, numbers, target, ok):
    assert countdown_correct(expr, numbers, target) is ok


def test_expression_evaluation_is_exact():
    value, used = evaluate_expression("1/3 + 1/3 + 1/3")
    assert value == 1 and used == [1, 3, 1, 3, 1, 3]


# ---- tasks ---------------------------------------------------------------------------------------

def test_generated_tasks_are_seeded_and_test_split_is_held_out():
    for task in (ArithmeticTask(seed=1), CountdownTask(seed=1)):
        a, b = task.problems("train", 300), task.problems("train", 300)
        assert a == b
        test = {p.question for p in task.problems("test", task.test_size)}
        assert not test & {p.question for p in a}
        assert task.problems("test", 20) == task.problems("test", 20)


def test_generated_answers_verify():
    for task in (ArithmeticTask(seed=2), CountdownTask(seed=2)):
        for p in task.problems("train", 50):
            completion = f"<think> ok </think> <answer> {p.answer} </answer>"
            assert task.is_correct(p, completion), p
            assert task.reward(p, completion) == pytest.approx(1.1)
            assert task.reward(p, "<think> ok </think> <answer> nope </answer>") == pytest.approx(0.1)
            assert task.reward(p, f"<answer> {p.answer} </answer>") == pytest.approx(1.0)
            assert task.reward(p, f"<answer> {p.answer} </answer>",
                               RewardConfig(require_format_for_correct=True)) == 0.0


def test_prompt_uses_the_r1_zero_template():
    p = Problem("What is 2 + 2?", "4")
    assert ArithmeticTask().prompt(p) == R1_ZERO_TEMPLATE.format(question="What is 2 + 2?")
    assert ArithmeticTask().prompt(p).endswith("User: What is 2 + 2?. Assistant:")


def test_task_options_on_the_command_line():
    t = get_task("arithmetic:digits=1-2,ops=+")
    assert (t.digits, t.ops) == ((1, 2), "+")
    assert all(p.meta["op"] == "+" and max(p.meta["a"], p.meta["b"]) < 100 for p in t.problems("train", 200))
    t = get_task("countdown:numbers=4,max=50")
    assert (t.n_numbers, t.max_number) == ((4, 4), 50)
    assert all(len(p.meta["numbers"]) == 4 for p in t.problems("test", 20))
    for bad, words in [("arithmetic:digits=two", "digits must be"), ("arithmetic:base=2", "unknown option"),
                       ("arithmetic:ops=/", "ops must be"), ("arithmetic:digits", "key=value"),
                       ("countdown:max=1", "max must be"), ("arithmetic:digits=0-3", "1 <= N <= M"), ("gsm8k", "expected")]:
        with pytest.raises(ConfigError, match=words):
            get_task(bad)


def test_file_task(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "2+2?", "answer": "#### 4"}\n{"prompt": "capital of France?", "answer": "Paris"}\n'
                 '{"question": "3*3?", "answer": "Natalia sold 4... #### 9"}\n')
    task = FileTask(f, test_fraction=0.34)
    train, test = task.problems("train"), task.problems("test")
    assert [p.answer for p in train] == ["4", "Paris"] and test[0].answer == "9"
    assert task.is_correct(train[0], "<answer>4.0</answer>") and task.is_correct(train[1], "<answer> Paris </answer>")
    assert not task.is_correct(train[1], "<answer>paris!</answer>")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with 'prompt' and 'answer'"):
        FileTask(bad)


def test_cli_rejects_bad_task_and_data_with_a_message(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["grpo", str(tmp_path), "--task", "chess"]) == 2
    assert "--task 'chess'" in capsys.readouterr().err
    from nanoseek.rl.tasks import get_task
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="--task 'chess': expected 'arithmetic', 'countdown' or a JSONL file"):
        get_task("chess")
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err


# ---- the recipe's base corpus --------------------------------------------------------------------

def test_column_sums_are_schoolbook_addition():
    import random
    import re

    from nanoseek.rl.recipe import column_sums

    assert column_sums(67, 94) == "7 + 4 = 11 , 6 + 9 + 1 = 16"
    assert column_sums(9, 4) == "9 + 4 = 13"
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 99_999), rng.randint(0, 99_999)
        sums = [int(x) for x in re.findall(r"= (\d+)", column_sums(a, b))]
        # units digits of every column, then the last column's whole sum (its carry included)
        value = sum(s % 10 * 10**i for i, s in enumerate(sums[:-1])) + sums[-1] * 10 ** (len(sums) - 1)
        assert value == a + b


def test_base_corpus_mixes_worked_and_glance_answers_and_never_holds_a_test_question(tmp_path):
    import json

    from nanoseek.rl.recipe import RECIPE_TASK, write_base_corpus

    path = write_base_corpus(tmp_path / "c.jsonl", 400, worked_fraction=0.5)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    task = get_task(RECIPE_TASK)
    test_questions = {p.question for p in task.problems("test", task.test_size)}
    two_column = [d for d in docs if "," in d.split("<think>")[-1]]
    assert 100 < len(two_column) < 300  # worked two-column answers: about half of the ~75% two-column problems
    for d in docs:
        q = d.split("User: ")[-1].split(". Assistant:")[0]
        assert q not in test_questions
        assert has_r1_format(d.split("Assistant:")[-1])
        a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" + "))
        assert task.is_correct(Problem(q, str(a + b)), d.split("Assistant:")[-1])
