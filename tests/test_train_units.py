"""Training building blocks as pure functions: schedules, balance loss, bias update."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.train.balance import RoutingRecorder, balance_loss, max_violation, update_correction_bias
from nanoseek.train.config import TrainConfig
from nanoseek.train.schedule import bias_gamma, learning_rate, mtp_weight
from nanoseek.config import ConfigError


def test_learning_rate_warmup_cosine_and_wsd():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=111)  # steps 0..110
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)  # the last step is at the floor
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="wsd", wsd_decay_fraction=0.2)
    assert learning_rate(79, wsd) == 1.0
    assert learning_rate(89, wsd) == pytest.approx(0.5)
    assert learning_rate(99, wsd) == pytest.approx(0.0)
    for short in (TrainConfig(lr=1.0, min_lr_ratio=0.1, max_steps=10, warmup_steps=2, schedule=k) for k in ("cosine", "wsd")):
        assert learning_rate(9, short) == pytest.approx(0.1), short.schedule
    # a warmup reaching into the decay: the decay starts after it, no drop from the peak
    overlap = TrainConfig(lr=1.0, min_lr_ratio=0.0, max_steps=12, warmup_steps=10, schedule="wsd", wsd_decay_fraction=0.5)
    assert [round(learning_rate(s, overlap), 3) for s in (9, 10, 11)] == [1.0, 0.5, 0.0]


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


@pytest.mark.parametrize("field,value", [
    ("device", "foo"), ("device", "cuda:x"), ("threads", -3), ("eps", -1.0), ("eps", 0.0), ("init_std", -1.0),
    ("fp8_backend", "foo"), ("sample_tokens", -1), ("lr", "0.1"), ("lr", float("nan")), ("seq_len", True),
    ("seed", -1), ("split_seed", 1.5), ("data", "a.txt"), ("data", [1]), ("add_bos", "yes"), ("tokenizer", 3),
    ("model", ""), ("weight_decay", -0.1), ("mtp_lambda", -1.0), ("bias_update_gamma", -1.0),
    ("peak_tflops", float("inf")), ("compile", 1),
])
def test_train_config_checks_every_setting_type_and_range(field, value):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        TrainConfig(**{field: value}).validate()


def test_train_config_accepts_defaults_and_json_numbers():
    TrainConfig().validate()
    TrainConfig(lr=1, device="cpu", threads=2, data=["a.txt"], tokenizer=None).validate()  # JSON writes 1.0 as 1


def test_train_config_load_names_a_directory_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        TrainConfig.load(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.json")
    (tmp_path / "latin1.json").write_bytes(b'{"model": "\xe9"}')
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.load(tmp_path / "latin1.json")


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("def foo(x):\n    return x + 1\n" * 200)
    return tmp_path / "a.txt"


BAD_TRAIN_FLAGS = [
    (["--device", "foo"], "`device`"), (["--threads", "-3"], "`threads`"), (["--eps", "-1"], "`eps`"),
    (["--init-std", "-1"], "`init_std`"), (["--fp8", "--fp8-backend", "foo"], "`fp8_backend`"),
    (["--sample-tokens", "-1"], "`sample_tokens`"), (["--config", "DIR"], "is a directory"),
    (["--config", "LR_JSON"], "`lr`"),
]


@pytest.mark.parametrize("flags,message", BAD_TRAIN_FLAGS)
def test_cli_bad_train_values_fail_up_front_with_one_line(tiny_corpus, tmp_path, capsys, flags, message):
    from nanoseek.cli import main

    (tmp_path / "lr.json").write_text('{"lr": "0.1"}')
    flags = [{"DIR": str(tmp_path), "LR_JSON": str(tmp_path / "lr.json")}.get(f, f) for f in flags]
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny", "--data", str(tiny_corpus), "--out", str(out), "--seq-len", "16",
               "--batch-size", "2", "--steps", "1", "--eval-batches", "1", "--val-fraction", "0", "--peak-tflops", "1",
               "--quiet", "--no-tensorboard", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nanoseek train: error: ") and message in err[0], err
    assert not out.exists()  # failed before any work (sample_tokens used to fail after the whole run)


def test_cli_keeps_tracebacks_for_internal_errors(tiny_corpus, tmp_path, monkeypatch):
    from nanoseek.cli import main
    from nanoseek.train import trainer

    def bug(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(trainer.Trainer, "__init__", bug)
    with pytest.raises(RuntimeError, match="internal bug"):
        main(["train", "--model", "tiny", "--data", str(tiny_corpus), "--out", str(tmp_path / "run")])


def test_sft_default_out_dir_for_dot_and_dotdot(tmp_path, monkeypatch, capsys):
    from nanoseek.cli import main
    from nanoseek.train import cli as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "_cmd_train", lambda args: seen.append(args.out_dir) or 0)
    (tmp_path / "base" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "base")
    assert main(["sft", ".", "--data", "chat.jsonl"]) == 0
    monkeypatch.chdir(tmp_path / "base" / "sub")
    assert main(["sft", "..", "--data", "chat.jsonl"]) == 0
    assert main(["sft", "../sub/", "--data", "chat.jsonl"]) == 0
    assert seen == [str(tmp_path / "base-sft"), str(tmp_path / "base-sft"), str(Path("../sub-sft"))]
    assert main(["sft", "/", "--data", "chat.jsonl"]) == 2
    assert "pass --out" in capsys.readouterr().err


@contextlib.contextmanager
def disk_fills_after(nbytes: int):
    """Writes past `nbytes` into any file fail (EFBIG), as on a full disk: a write that truncated
    its target first leaves it torn."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_train_config_write_keeps_the_old_file(tiny_corpus, tmp_path, monkeypatch):
    from nanoseek.train.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    old = TrainConfig(model="tiny", data=[str(tiny_corpus)], out_dir=str(out), seq_len=16, batch_size=2)
    (out / "train_config.json").write_text(json.dumps(old.to_dict(), indent=2) + "\n")
    stack = contextlib.ExitStack()

    def fill_disk(self):  # called just before train_config.json is written
        stack.enter_context(disk_fills_after(64))
        return 1.0

    monkeypatch.setattr(Trainer, "_peak_tflops", fill_disk)
    cfg = TrainConfig(**{**old.to_dict(), "max_steps": 7, "val_fraction": 0.0, "tensorboard": False})
    with stack, pytest.raises(OSError):
        Trainer(cfg, show_progress=False)
    assert TrainConfig.load(out / "train_config.json") == old


def test_metrics_resume_truncation_is_atomic(tmp_path):
    from nanoseek.train.metrics import MetricsLogger, read_metrics

    rows = [{"step": s, "loss": 1.0 / s, "pad": "x" * 40} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 6, "lo')  # torn by a kill
    with disk_fills_after(64), pytest.raises(OSError):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # nothing lost
    MetricsLogger(tmp_path, tensorboard=False, resume_step=3).close()
    assert read_metrics(tmp_path) == rows[:3]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # no temporary files left behind


def _step_grads(cfg: TrainConfig, data: torch.Tensor, masks: torch.Tensor | None):
    """Gradients and record of one training step on `data` split into the config's micro-batches."""
    from nanoseek.train import Trainer

    t = Trainer(cfg, show_progress=False)
    bs = cfg.batch_size
    t.source.get = lambda step, micro: (data[micro * bs:(micro + 1) * bs],
                                        None if masks is None else masks[micro * bs:(micro + 1) * bs])
    grads = {}
    real_step = t.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        return real_step(*a, **k)

    t.optimizer.step = capture
    return grads, t.train_step()


@pytest.mark.parametrize("sft", [False, True])
def test_gradient_accumulation_equals_one_big_batch(tiny_corpus, tmp_path, sft):
    # SFT micro-batches hold different numbers of assistant tokens: the step's loss is still the mean
    # over all of them, as one batch of 4 would compute it
    torch.manual_seed(0)
    data = torch.randint(5, 1000, (4, 33))
    masks = None
    if sft:
        masks = torch.zeros(4, 33, dtype=torch.long)
        masks[0, 1:30] = masks[1, 1:3] = masks[2, 1:5] = masks[3, 1:5] = 1
    common = dict(model="tiny", data=[str(tiny_corpus)], seq_len=32, max_steps=4, grad_clip=0.0, tensorboard=False,
                  sample_tokens=0, seed=0, device="cpu")
    g1, r1 = _step_grads(TrainConfig(out_dir=str(tmp_path / "one"), batch_size=4, grad_accum=1, **common), data, masks)
    g2, r2 = _step_grads(TrainConfig(out_dir=str(tmp_path / "two"), batch_size=2, grad_accum=2, **common), data, masks)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    worst = max(((g1[n] - g2[n]).norm() / (g1[n].norm() + 1e-30)).item() for n in g1)
    assert worst < 1e-4, worst


def test_fp8_training_evaluates_through_fp8(tiny_corpus, tmp_path):
    # validation runs under no_grad, where fp32 experts may take the paired path: not with FP8 experts
    from nanoseek.fp8_linear import FP8Experts
    from nanoseek.train import Trainer

    t = Trainer(TrainConfig(model="tiny", data=[str(tiny_corpus)], out_dir=str(tmp_path / "r"), seq_len=64, batch_size=8,
                            max_steps=2, fp8=True, tensorboard=False, sample_tokens=0, device="cpu"), show_progress=False)
    experts = [m for m in t.model.modules() if isinstance(m, FP8Experts)]
    assert experts
    x = torch.randint(5, 1000, (4, 64))  # 256 tokens x 2 picks over 8 experts: 64 rows each, in the paired range
    with torch.no_grad():
        plain = t.model(x).logits
        calls = []
        for m in experts:
            m.expert_ffn = (lambda f: lambda e, h: calls.append(e) or f(e, h))(m.expert_ffn)
        assert torch.equal(t.model(x).logits, plain) and calls  # the FP8 expert products ran
        hidden = torch.zeros(4 * 64, t.model.config.hidden_size)
        assert not any(m._pairs_pay(hidden, 4 * 64 * 2) for m in experts)


def test_whitespace_only_files_in_a_directory_are_skipped(tmp_path):
    from nanoseek.data import DataError, resolve_inputs

    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("\n")
    (pkg / "mod.py").write_text("def f():\n    return 1\n")
    assert [p.name for p in resolve_inputs([str(tmp_path / "src")])] == ["mod.py"]
    from nanoseek.data import read_documents

    with pytest.raises(DataError, match="empty"):  # named on its own, it is still an error
        list(read_documents(resolve_inputs([str(pkg / "__init__.py")])[0]))


def test_the_split_keeps_each_file_on_its_side_when_other_folders_are_added(tmp_path):
    from nanoseek.data import input_keys, split_files

    for i in range(200):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"f{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "new.py").write_text("y = 2\n")
    _, val_a = split_files(input_keys([str(tmp_path / "a")]), 0.1, 0)
    _, val_ab = split_files(input_keys([str(tmp_path / "a"), str(tmp_path / "b")]), 0.1, 0)
    _, val_glob = split_files(input_keys([str(tmp_path / "a" / "*.py")]), 0.1, 0)
    assert val_a and set(val_ab) - {tmp_path / "b" / "new.py"} == set(val_a) == set(val_glob)
    moved = tmp_path / "elsewhere"
    (tmp_path / "a").rename(moved)  # another checkout of the same tree
    assert [p.name for p in split_files(input_keys([str(moved)]), 0.1, 0)[1]] == [p.name for p in val_a]
    # files of one name in several folders (a shell's data/*/train.jsonl) keep distinct keys
    langs = [f"lang{i}" for i in range(10)]
    for lang in langs:
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "train.jsonl").write_text('{"text": "hello"}\n')
    keys = input_keys([str(tmp_path / lang / "train.jsonl") for lang in langs])
    assert sorted(keys.values()) == sorted(f"{lang}/train.jsonl" for lang in langs)


def test_ctrl_c_right_after_the_optimizer_step_checkpoints_a_consistent_step(tiny_corpus, tmp_path):
    # An interrupt landing between optimizer.step() and the step counter used to save step N+1's
    # weights labelled as step N: the resumed run then differed from an uninterrupted one.
    import os

    from nanoseek.train import Trainer

    def config(out):
        return TrainConfig(model="tiny", data=[str(tiny_corpus)], out_dir=str(tmp_path / out), max_steps=8, seq_len=32,
                           batch_size=2, ckpt_interval=100, eval_interval=0, sample_tokens=0, tensorboard=False,
                           threads=1, device="cpu")

    straight = Trainer(config("straight"), show_progress=False)
    straight.fit()
    t = Trainer(config("cut"), show_progress=False)
    fired = []

    def hook(opt, args, kwargs):
        if t.step == 3 and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # delivered while the update is still being recorded

    t.optimizer.register_step_post_hook(hook)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert t.step == 4  # the step that was under way completed and was counted
    resumed = Trainer(config("cut"), resume=True, show_progress=False)
    assert resumed.step == 4
    resumed.fit()
    for (n, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_deferred_interrupts_leave_an_ignored_sigint_ignored():
    import os

    from nanoseek.train.state import interrupts_deferred

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a job started with `cmd &`
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(KeyboardInterrupt):  # the default handler: held back, then raised at the end
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)


def test_the_tokenizer_of_a_one_file_corpus_does_not_see_its_validation_tail(tmp_path, monkeypatch):
    from nanoseek.train import Trainer, trainer as trainer_mod

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "one.txt"
    corpus.write_text("def foo(x):\n    return x + 1\n" * 300 + "ZQXJ_ONLY_IN_THE_TAIL " * 20)
    seen = []
    real = trainer_mod.Trainer._train_tokenizer

    def spy(self, vocab_size, train_tokenizer):
        def capture(texts, *a, **k):
            texts = list(texts)
            seen.extend(texts)
            return train_tokenizer(texts, *a, **k)
        return real(self, vocab_size, capture)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_tokenizer", spy)
    Trainer(TrainConfig(model="tiny", data=[str(corpus)], out_dir=str(tmp_path / "r"), val_fraction=0.1, max_steps=1,
                        seq_len=32, batch_size=2, tensorboard=False, sample_tokens=0, device="cpu"), show_progress=False)
    text = "".join(seen)
    assert seen and "ZQXJ" not in text and len(text) == int(len(corpus.read_text()) * 0.9)
