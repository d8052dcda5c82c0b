"""End-to-end pretraining on tiny: learning happens, the run dir is a model dir, resume is exact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import ConfigError
from nanoseek.train import TrainConfig, Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few stdlib modules copied into a folder: real code, small enough to tokenize in a second."""
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    d = tmp_path_factory.mktemp("corpus")
    for name in ("textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py",
                 "string.py", "numbers.py", "keyword.py", "queue.py", "sched.py"):
        (d / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_cfg(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="tiny", data=[str(corpus)], out_dir=str(out), seq_len=32, batch_size=4, max_steps=30,
                lr=3e-3, warmup_steps=5, log_interval=5, eval_interval=15, eval_batches=2, ckpt_interval=15,
                tensorboard=False, sample_tokens=8, seed=0, val_fraction=0.2)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_run_learns_and_writes_a_model_directory(corpus, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(corpus, out, tensorboard=True), show_progress=False)
    result = trainer.fit()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, (train[0]["loss"], train[-1]["loss"])
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "maxvio_batch", "expert_load", "mtp_loss_1", "bal_loss"):
        assert key in train[-1], key
    assert len(train[-1]["expert_load"]) == 3  # two MoE layers + the MTP block's MoE
    assert "val_loss" in result and "val_bpb" in result and "maxvio_global" in result
    # the correction biases moved, in steps of gamma
    bias = trainer.model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0
    assert torch.allclose(bias / 0.001, (bias / 0.001).round(), atol=1e-3)
    # the run directory is a model directory: nanoseek and transformers load it
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "loss.png",
                 "expert_load.png", "train_config.json"):
        assert (out / name).exists(), name
    loaded = nanoseek.load_model(out)
    ids = torch.randint(0, loaded.config.vocab_size, (1, 16))
    with torch.no_grad():
        ours = loaded(ids).logits
        assert torch.allclose(ours, trainer.model.eval()(ids).logits, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("def f(x):\n    return x", add_special_tokens=False) == trainer.tokenizer.encode("def f(x):\n    return x")
    # ids and lengths the other tools read: pad as the tokenizer's, the model's context as its max length
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (hf.config.pad_token_id, gen.pad_token_id) == (tok.pad_token_id, tok.pad_token_id) == (2, 2)
    assert tok.model_max_length == loaded.config.max_position_embeddings
    assert len(trainer.sample("def ", max_new_tokens=4)) > 4


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        Trainer(tiny_cfg(corpus, out), resume=True, show_progress=False)
    Trainer(tiny_cfg(corpus, out, max_steps=2, ckpt_interval=2, eval_interval=0), show_progress=False).fit()
    with pytest.raises(ConfigError, match="pass --resume"):
        Trainer(tiny_cfg(corpus, out, max_steps=2), show_progress=False)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_sigkill_and_resume_reproduces_the_uninterrupted_losses(corpus, tmp_path):
    """Kill -9 a training process mid-run, resume it, and compare every later loss with a clean run."""
    common = ["--model", "tiny", "--data", str(corpus), "--seq-len", "32", "--batch-size", "4", "--steps", "24",
              "--warmup-steps", "3", "--log-interval", "1", "--eval-interval", "0", "--ckpt-interval", "4",
              "--no-tensorboard", "--seed", "3", "--val-fraction", "0.2", "--threads", "1", "--quiet",
              "--sample-tokens", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", *common, "--out", str(clean)], check=True,
                   env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "train", *common, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "metrics.jsonl").exists() and max(_losses(killed), default=0) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(killed)) < 24, "the run finished before it could be killed"
    (killed / "checkpoints" / ".tmp-step-000099" / "trainer_state").mkdir(parents=True)  # a save cut short
    subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--out", str(killed), "--resume", "--quiet",
                    "--sample-tokens", "2"], check=True, env=env, capture_output=True)
    a, b = _losses(clean), _losses(killed)
    assert not list((killed / "checkpoints").glob(".tmp-step-*"))  # the next save cleared it
    assert sorted(b) == list(range(1, 25))
    assert a == b, {s: (a[s], b[s]) for s in a if a[s] != b.get(s)}


def test_plot_command_redraws(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny_cfg(corpus, out, max_steps=6, eval_interval=3, ckpt_interval=6), show_progress=False).fit()
    (out / "loss.png").unlink()
    from nanoseek.cli import main

    assert main(["plot", str(out)]) == 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").exists()


def _chat_file(path: Path, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_masks_everything_but_assistant_tokens(corpus, tmp_path):
    base = tmp_path / "base"
    Trainer(tiny_cfg(corpus, base, max_steps=2, eval_interval=0, ckpt_interval=2), show_progress=False).fit()
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.sources import SFTSource

    tok = Tokenizer.from_file(base)
    chat = _chat_file(tmp_path / "chat.jsonl")
    src = SFTSource(chat, tok, seq_len=64, batch_size=4, seed=0)
    tokens, mask = src.get(0, 0)
    assert tokens.shape == mask.shape == (4, 65)
    assistant = tok.token_to_id("<｜Assistant｜>")
    eos = tok.eos_id
    for row, m in zip(tokens.tolist(), mask.tolist()):
        text_learned = tok.decode([t for t, k in zip(row, m) if k])
        text_prompt = tok.decode([t for t, k in zip(row, m) if not k])
        assert "What is" not in text_learned and "What is" in text_prompt  # user turns are never targets
        assert " = " in text_learned
        for i, (t, k) in enumerate(zip(row, m)):
            if t == assistant:
                assert k == 0  # the role marker is prompt, not target
            if k:
                assert t != tok.pad_id
        # every learned span ends with the end-of-sentence token
        assert all(row[i] == eos for i in range(len(row) - 1) if m[i] and not m[i + 1])

    out = tmp_path / "sft"
    from nanoseek.cli import main

    rc = main(["sft", str(base), "--data", str(chat), "--out", str(out), "--steps", "6", "--seq-len", "64",
               "--batch-size", "4", "--no-tensorboard", "--quiet", "--eval-interval", "0", "--sample-tokens", "2"])
    assert rc == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def test_sft_rejects_bad_chat_files(tmp_path):
    from nanoseek.train.sources import _read_conversations

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: the conversation has no assistant message"):
        _read_conversations(bad)
    bad.write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: expected \{\"messages\""):
        _read_conversations(bad)


def test_fp8_training_tracks_fp32(corpus, tmp_path):
    """`--fp8` (emulated E4M3 GEMMs on CPU) follows the fp32 loss curve closely on tiny."""
    runs = {}
    for fp8 in (False, True):
        out = tmp_path / f"fp8-{fp8}"
        t = Trainer(tiny_cfg(corpus, out, max_steps=12, eval_interval=0, ckpt_interval=12, log_interval=1, fp8=fp8),
                    show_progress=False)
        if fp8:
            assert "FP8" in t.precision
        t.fit()
        runs[fp8] = _losses(out)
    a, b = runs[False], runs[True]
    assert a != b  # quantization really happened
    assert all(abs(a[s] - b[s]) / a[s] < 0.03 for s in a), (a, b)


def test_a_run_saved_before_add_bos_resumes_without_bos(tmp_path):
    saved = TrainConfig(out_dir=str(tmp_path)).to_dict()
    del saved["add_bos"]
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    assert TrainConfig.load(tmp_path / "train_config.json", missing={"add_bos": False}).add_bos is False
    assert TrainConfig.load(tmp_path / "train_config.json").add_bos is True  # new runs: bos like the engine
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        TrainConfig.load(tmp_path / "bad.json")
