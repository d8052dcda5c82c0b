"""Every way a checkpoint can be wrong gives one clear error that says what and where."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import CheckpointError, save_model
from nanoseek.config import ConfigError


@pytest.fixture
def saved(tmp_path):
    model = nanoseek.load_model("tiny")
    save_model(model, tmp_path)
    return tmp_path


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_are_listed_together(saved):
    def fn(t):
        del t["model.layers.0.self_attn.kv_b_proj.weight"]
        del t["model.layers.2.mlp.experts.5.up_proj.weight"]
        t["model.layers.1.self_attn.surprise.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(128, 63)

    _edit(saved, fn)
    with pytest.raises(CheckpointError) as e:
        nanoseek.load_model(saved)
    msg = str(e.value)
    assert "missing tensors (2)" in msg
    assert "model.layers.0.self_attn.kv_b_proj.weight" in msg and "model.layers.2.mlp.experts.5.up_proj.weight" in msg
    assert "unexpected tensors (1)" in msg and "surprise" in msg
    assert "model.layers.0.self_attn.o_proj.weight: checkpoint [128, 63] vs config [128, 64]" in msg
    assert "`num_attention_heads`*`v_head_dim`" in msg


def test_config_weights_mismatch_names_the_field(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["hidden_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"`vocab_size` x `hidden_size`"):
        nanoseek.load_model(saved)


def test_layer_and_expert_count_mismatch_hints(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    cfg["n_routed_experts"] = 4
    cfg["n_group"] = 2
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        nanoseek.load_model(saved)
    assert "`num_hidden_layers`=2" in str(e.value)
    assert "`n_routed_experts`=4" in str(e.value)


def test_pickle_weights_are_refused(tmp_path):
    model = nanoseek.load_model("tiny")
    model.config.save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="refuses to load pickles: unpickling can run arbitrary code"):
        nanoseek.load_model(tmp_path)


def test_truncated_safetensors_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        nanoseek.load_model(saved)


def test_index_pointing_to_missing_shard(saved):
    (saved / "model.safetensors").rename(saved / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        nanoseek.load_model(saved)


def test_malformed_index(saved):
    (saved / "model.safetensors").rename(saved / "model-00001-of-00001.safetensors")  # the index is read
    (saved / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        nanoseek.load_model(saved)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        nanoseek.load_model(tmp_path)


def test_malformed_config_json(saved):
    (saved / "config.json").write_text('{"hidden_size": 128,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        nanoseek.load_model(saved)


def test_fp8_weight_without_scale(saved):
    def fn(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)

    _edit(saved, fn)
    with pytest.raises(CheckpointError, match="o_proj.weight is stored in FP8 but .*weight_scale_inv is missing"):
        nanoseek.load_model(saved)


def test_unknown_path_is_not_found():
    with pytest.raises(FileNotFoundError, match="not a preset"):
        nanoseek.load_model("./no/such/dir")


def test_cli_reports_errors_without_a_traceback(saved, capsys):
    from nanoseek.cli import main

    (saved / "config.json").write_text('{"n_routed_experts": 10, "n_group": 4}')
    assert main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "`n_routed_experts` (10) must be divisible by `n_group` (4)" in err
    assert "Traceback" not in err


def _edit_header(path, fn):
    """Rewrite the safetensors JSON header in place (same length, padded with spaces)."""
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    (path / "model.safetensors").write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


@pytest.mark.parametrize("change, match", [
    (lambda h: h["model.layers.1.self_attn.o_proj.weight"].update(
        data_offsets=h["model.layers.0.self_attn.o_proj.weight"]["data_offsets"]), "overlaps the bytes of another"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[float(x) for x in h["model.norm.weight"]["data_offsets"]]),
     "must be non-negative integers"),
])
def test_corrupt_headers_the_safetensors_library_refuses(saved, change, match):
    _edit_header(saved, change)
    with pytest.raises(CheckpointError, match=match):
        nanoseek.load_model(saved)


def test_integer_weights_are_refused_not_cast(saved):
    _edit(saved, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                                     t["model.layers.0.self_attn.o_proj.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"o_proj.weight: stored as I32; weights and scales must be floating"):
        nanoseek.load_model(saved)


@pytest.mark.parametrize("entry", [5, None, "", "/etc/passwd", "../model-00001-of-00001.safetensors"])
def test_index_entries_must_be_file_names_in_the_directory(saved, entry):
    shard = "model-00001-of-00001.safetensors"  # (beside a model.safetensors the index is not read)
    (saved / "model.safetensors").rename(saved / shard)
    names = list(load_file(saved / shard))
    wm = {n: shard for n in names}
    wm[names[0]] = entry
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="weight_map entries must be file names"):
        nanoseek.load_model(saved)


def test_load_weights_into_checks_like_load_model(saved):
    from nanoseek.checkpoint import load_weights_into

    model = nanoseek.load_model("tiny", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fn(t):
        del t["model.layers.0.self_attn.kv_b_proj.weight"]
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].t().contiguous()

    _edit(saved, fn)
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\)[\s\S]*o_proj.weight: checkpoint \[64, 128\]"):
        load_weights_into(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was half-loaded


def test_load_weights_into_keeps_the_models_own_mtp_when_the_checkpoint_has_none(saved):
    from nanoseek.checkpoint import load_weights_into

    L = nanoseek.preset("tiny").num_hidden_layers
    _edit(saved, lambda t: [t.pop(n) for n in [n for n in t if n.startswith(f"model.layers.{L}.")]])
    source = nanoseek.load_model("tiny")  # what `saved` holds
    model = nanoseek.load_model("tiny", seed=1)
    own = lambda k: "embed_tokens" not in k and "shared_head.head" not in k  # noqa: E731 (those are shared)
    mtp_before = {k: v.clone() for k, v in model.model.layers[L].state_dict().items() if own(k)}
    load_weights_into(model, saved)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, source.model.layers[0].self_attn.o_proj.weight)
    assert all(torch.equal(v, mtp_before[k]) for k, v in model.model.layers[L].state_dict().items() if own(k))
    assert len(mtp_before) > 5


def test_the_model_file_is_chosen_as_transformers_chooses_it(saved):
    from safetensors.torch import save_file

    ref = nanoseek.load_model(saved)
    zeros = {n: torch.zeros_like(t) for n, t in load_file(saved / "model.safetensors").items()}
    save_file(zeros, saved / "model_ema.safetensors")  # another file beside the model is not merged in
    (saved / "._model.safetensors").write_bytes(b"\0\5\0\0AppleDouble")  # macOS metadata is skipped
    got = nanoseek.load_model(saved)
    for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), n
    # without model.safetensors or an index, two files with the same tensor names are ambiguous
    (saved / "model.safetensors").rename(saved / "weights.safetensors")
    with pytest.raises(CheckpointError, match="in both model_ema.safetensors and weights.safetensors"):
        nanoseek.load_model(saved)
    (saved / "model_ema.safetensors").unlink()
    got = nanoseek.load_model(saved)  # one file under any name is the model
    assert torch.equal(got.lm_head.weight, ref.lm_head.weight)


def test_a_tensor_of_a_dtype_nanoseek_cannot_load_is_refused_only_when_needed(saved):
    from safetensors.torch import save_file

    (saved / "model.safetensors").rename(saved / "model-00001-of-00002.safetensors")
    save_file({"extra.counter": torch.arange(4, dtype=torch.int32)}, saved / "model-00002-of-00002.safetensors")
    path = saved / "model-00002-of-00002.safetensors"
    raw = path.read_bytes()  # relabel the I32 tensor as U32 and as a dtype nanoseek has no table entry for
    wm = {n: "model-00001-of-00002.safetensors" for n in load_file(saved / "model-00001-of-00002.safetensors")}
    wm["extra.counter"] = "model-00002-of-00002.safetensors"
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for label in (b'"U32"', b'"F4"'):
        path.write_bytes(raw.replace(b'"I32"', label.ljust(5, b" ")))
        with pytest.raises(CheckpointError, match="extra.counter") as e:  # unexpected, not "corrupt"
            nanoseek.load_model(saved)
        assert "corrupt" not in str(e.value)
        assert nanoseek.load_model(saved, strict=False) is not None
