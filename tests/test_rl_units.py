"""GRPO loss variants against hand computations; verifiers against hostile input; tasks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.rl.grpo import GRPOConfig, GRPOTrainer
from nanoseek.rl.loss import group_advantages, kl_k3, policy_loss
from nanoseek.config import ConfigError
from nanoseek.rl.tasks import (ArithmeticTask, CountdownTask, FileTask, Problem, R1_ZERO_TEMPLATE, RewardConfig,
                               get_task)
from nanoseek.rl.verify import (ParseError, countdown_correct, evaluate_expression, extract_answer, has_r1_format,
                                numbers_equal)


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


# ---- untrusted model output never raises ---------------------------------------------------------

@pytest.mark.parametrize("fn,args", [
    (countdown_correct, ("2 + ²", [2, 2], 4)),  # "²".isdigit() is True, int("²") raises
    (countdown_correct, ("³ * ¹", [3, 1], 3)),
    (countdown_correct, ("፩ + 1", [1, 1], 2)),  # an Ethiopic digit: isdigit, not a decimal
    (numbers_equal, ("٣", "3")),  # Arabic-Indic and fullwidth digits are not ASCII numbers
    (numbers_equal, ("３", "3")),
    (numbers_equal, ("²", "2")),
])
def test_non_ascii_digits_score_zero_instead_of_raising(fn, args):
    assert fn(*args) is False


def _task_problems():
    out = [(t, t.problems("train", 1)[0]) for t in (ArithmeticTask(), CountdownTask())]
    file_task = FileTask.__new__(FileTask)  # without a file: only its checker is used
    return out + [(file_task, Problem("q", "42")), (file_task, Problem("q", "Paris"))]


_TASK_PROBLEMS = _task_problems()
# any character, often the ones the parsers look at (digits of every kind, operators, tags)
_PIECES = st.one_of(st.characters(), st.sampled_from(list("0123456789+-*/()=.,x ×÷−²³¹½٣３፩")
                                                     + ["<answer>", "</answer>", "<think>", "</think>"]))


@settings(max_examples=300, deadline=None)
@given(text=st.lists(_PIECES, max_size=60).map("".join),
       wrap=st.sampled_from(["{}", "<answer>{}</answer>", "<think> a </think> <answer>{}</answer>"]))
def test_any_completion_gets_a_reward_in_range_and_never_raises(text, wrap):
    completion = wrap.format(text)
    cfg = RewardConfig()
    for task, p in _TASK_PROBLEMS:
        assert 0.0 <= task.reward(p, completion, cfg) <= cfg.correct + cfg.format
        assert isinstance(task.is_correct(p, completion), bool)
    assert isinstance(countdown_correct(text, [1, 2, 3], 6), bool)
    assert isinstance(numbers_equal(text, "42"), bool)
    try:
        evaluate_expression(text)
    except ParseError:
        pass


# ---- GRPO config and command line ----------------------------------------------------------------

def test_grpo_config_rejects_bad_grad_clip_keep_checkpoints_and_intervals():
    GRPOConfig(model="x", grad_clip=0.0).validate()  # 0 = no clipping, as in training
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"`grad_clip` must be >= 0 \(0 = no clipping\)"):
            GRPOConfig(model="x", grad_clip=bad).validate()
    for bad in (0, -1, 1.5):
        with pytest.raises(ConfigError, match="`keep_checkpoints` must be an integer >= 1"):
            GRPOConfig(model="x", keep_checkpoints=bad).validate()
    for name in ("eval_interval", "ckpt_interval"):
        GRPOConfig(model="x", **{name: 0}).validate()
        with pytest.raises(ConfigError, match=f"`{name}` must be an integer >= 0"):
            GRPOConfig(model="x", **{name: -1}).validate()


def test_grpo_resume_without_out_reads_the_saved_config(tmp_path, monkeypatch, capsys):
    import json

    from nanoseek.cli import main
    from nanoseek.rl import grpo

    seen = []

    class FakeTrainer:
        def __init__(self, cfg, resume, show_progress):
            seen.append((cfg, resume))
            self.run_dir = Path(cfg.out_dir)

        def fit(self):
            return {}

    monkeypatch.setattr(grpo, "GRPOTrainer", FakeTrainer)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "grpo"
    run.mkdir(parents=True)
    (run / "grpo_config.json").write_text(json.dumps({"model": "m", "task": "countdown", "steps": 7,
                                                      "grad_clip": 0.5, "out_dir": "runs/grpo"}))
    assert main(["grpo", "m", "--resume", "--quiet"]) == 0
    assert (seen[-1][0].task, seen[-1][0].steps, seen[-1][0].grad_clip, seen[-1][1]) == ("countdown", 7, 0.5, True)
    assert main(["grpo", "m", "--resume", "--steps", "9", "--quiet"]) == 0  # flags override the saved run
    assert (seen[-1][0].task, seen[-1][0].steps) == ("countdown", 9)
    assert main(["grpo", "m", "--quiet"]) == 0  # a new run starts from the defaults
    assert (seen[-1][0].task, seen[-1][0].steps) == (GRPOConfig.task, GRPOConfig.steps)
    (run / "grpo_config.json").write_text("{not json")
    assert main(["grpo", "m", "--resume", "--quiet"]) == 2
    assert "grpo_config.json is not valid JSON" in capsys.readouterr().err


# ---- GRPO on a tiny random model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random model directory with a byte-level BPE tokenizer (seconds to build)."""
    import nanoseek
    from conftest import randomize
    from nanoseek.checkpoint import save_model
    from nanoseek.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tiny-rl")
    model = nanoseek.DeepseekV3ForCausalLM(nanoseek.preset("tiny")).eval()
    randomize(model, 4, bias_std=0.05)
    save_model(model, d)
    text = ["What is 12 + 34? <think> 2 + 4 = 6 , 1 + 3 = 4 </think> <answer> 46 </answer> " * 20]
    train_tokenizer(text, vocab_size=model.config.vocab_size, show_progress=False).save(d)
    return d


def _tiny_grpo(model_dir, out, **kw) -> GRPOTrainer:
    kw = {"task": "arithmetic:digits=1-2,ops=+", "steps": 1, "prompts_per_step": 2, "group_size": 4,
          "max_new_tokens": 8, "lr": 1e-2, "eval_interval": 0, "ckpt_interval": 0, **kw}
    cfg = GRPOConfig(model=str(model_dir), out_dir=str(out), **kw)
    t = GRPOTrainer(cfg, show_progress=False)
    t.task.reward = lambda p, text, cfg=None: float(len(text) % 3)  # rewards that differ within a group
    return t


def test_grad_clip_zero_means_no_clipping(tiny_dir, tmp_path):
    weights = []
    for clip in (0.0, 1e30):  # 0 once zeroed every gradient: the policy never moved
        t = _tiny_grpo(tiny_dir, tmp_path / f"g{clip}", grad_clip=clip)
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        assert not t.train_step().get("skipped")
        weights.append(t.model.state_dict())
    assert any(not torch.equal(weights[0][k], before[k]) for k in before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in before)


def test_grpo_config_json_is_written_atomically(tiny_dir, tmp_path, monkeypatch):
    import builtins
    import errno
    import io

    run = tmp_path / "g"
    _tiny_grpo(tiny_dir, run)
    saved = (run / "grpo_config.json").read_text()
    real_open = builtins.open

    class DiskFull:  # writes half of what it is given, then fails like a full disk (or a kill)
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return DiskFull(f) if "grpo_config.json" in str(file) and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        _tiny_grpo(tiny_dir, run, steps=2)
    monkeypatch.undo()
    assert (run / "grpo_config.json").read_text() == saved  # the previous config, whole
    assert not list(run.glob(".grpo_config.json.*"))


# ---- the recipe's base stage ---------------------------------------------------------------------

def test_recipe_resumes_an_unfinished_base_stage_and_reuses_a_finished_one(tmp_path, monkeypatch):
    import nanoseek.train
    from nanoseek.rl import grpo
    from nanoseek.rl.recipe import RecipeSettings, run_r1_zero

    class BaseTrained(Exception):
        pass

    class GRPOStarted(Exception):
        pass

    calls = []

    def fake_trainer(cfg, resume=False, show_progress=True):
        calls.append((cfg.max_steps, resume))
        raise BaseTrained

    def fake_grpo(*args, **kwargs):
        raise GRPOStarted

    monkeypatch.setattr(nanoseek.train, "Trainer", fake_trainer)
    monkeypatch.setattr(grpo, "GRPOTrainer", fake_grpo)
    s = RecipeSettings(base_examples=20, base_steps=8)
    base = tmp_path / "base"

    def checkpoint(step):  # what a base run killed after its step-N checkpoint leaves behind
        (base / "checkpoints" / f"step-{step:06d}" / "trainer_state").mkdir(parents=True)
        (base / "checkpoints" / f"step-{step:06d}" / "trainer_state" / "state.json").write_text('{"step": %d}' % step)
        (base / "model.safetensors").write_bytes(b"published from the first checkpoint on")

    with pytest.raises(BaseTrained):
        run_r1_zero(tmp_path, settings=s, show_progress=False)
    assert calls == [(8, False)]
    checkpoint(2)
    with pytest.raises(BaseTrained):  # interrupted at step 2 of 8: resumed, not taken for finished
        run_r1_zero(tmp_path, settings=s, show_progress=False)
    assert calls[-1] == (8, True)
    checkpoint(8)
    with pytest.raises(GRPOStarted):  # the base run checkpointed its last step: reused
        run_r1_zero(tmp_path, settings=s, show_progress=False)
    assert len(calls) == 2
