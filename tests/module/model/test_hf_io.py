"""Loading HF Qwen3 safetensors folders into Qwen3 Dense models and exporting them back.

Reference: HF ``transformers`` Qwen3 models with random weights (norm weights included,
since HF initialises them to 1), saved with ``save_pretrained``.
"""

import json
import logging
import shutil
import sys

import pytest
import safetensors.torch
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

from d9d.checkpoint import safetensors_io
from d9d.compile import apply_compile_config, load_compile_config
from d9d.dataset import token_pooling_mask_from_attention_mask
from d9d.module.model.qwen3_dense import Qwen3DenseForCausalLM, Qwen3DenseForClassification, hf_io
from d9d.module.model.qwen3_dense.hf_config import (
    causal_lm_params_from_hf_config,
    classification_params_from_hf_config,
    read_hf_config,
)
from d9d.module.model.qwen3_dense.hf_io import load_hf_checkpoint, save_hf_checkpoint
from d9d.module.model.qwen3_dense.model import whole_model
from d9d.pipelining.api import PipelineStageInfo
from tests.helpers import (
    HF_PAD,
    HF_SPLITS,
    HF_VOCAB,
    assert_close_scaled,
    hf_folder_config,
    hf_nll,
    hf_tokens,
    save_random_hf,
)

VOCAB = HF_VOCAB
SPLITS = HF_SPLITS
PAD = HF_PAD
_hf_config = hf_folder_config
_save = save_random_hf


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untied")
    return folder, _save(Qwen3ForCausalLM(_hf_config(tie_word_embeddings=False)), folder)


@pytest.fixture(scope="module")
def tied_sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied_sharded")
    model = _save(Qwen3ForCausalLM(_hf_config(tie_word_embeddings=True)), folder, "30KB")
    return folder, model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    config = _hf_config(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    return folder, _save(Qwen3ForSequenceClassification(config), folder, "30KB")


def _build(cls, params, stage=None):
    # The normal late-init path: nothing is initialised before the checkpoint is read.
    with torch.device("meta"):
        model = cls(
            params,
            stage or PipelineStageInfo(0, 1),
            hidden_states_snapshot_mode="no",
            enable_checkpointing=False,
        )
    return model.to_empty(device="cpu").eval()


def _load_causal(folder, stage=None) -> Qwen3DenseForCausalLM:
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    model = _build(Qwen3DenseForCausalLM, params, stage)
    load_hf_checkpoint(model, folder)
    return model


_tokens = hf_tokens
_hf_nll = hf_nll


@torch.no_grad()
def _our_nll(model, ids) -> torch.Tensor:
    return model(input_ids=ids[:, :-1], labels=ids[:, 1:])["logps"].double()


def _assert_close(actual, expected, what):
    assert_close_scaled(actual, expected, what)


def _reload_hf(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("fixture", ["untied", "tied_sharded"])
def test_causal_lm_load_matches_transformers_and_export_round_trips(fixture, request, tmp_path):
    folder, hf_model = request.getfixturevalue(fixture)
    ids = _tokens()
    model = _load_causal(folder)
    expected = _hf_nll(hf_model, ids)
    _assert_close(_our_nll(model, ids), expected, f"per-token NLL after loading {fixture}")

    out = tmp_path / "export"
    save_hf_checkpoint(model, out, max_shard_size="40KB", base_config=read_hf_config(folder))
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and len(files) > 3, files
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["pad_token_id"] == PAD
    reloaded = _reload_hf(Qwen3ForCausalLM, out)
    with torch.no_grad():
        _assert_close(reloaded(ids).logits, hf_model(ids).logits, "HF logits after export")
    # The export is itself loadable here, into one unsplit vocabulary.
    again = _build(Qwen3DenseForCausalLM, causal_lm_params_from_hf_config(out))
    load_hf_checkpoint(again, out)
    _assert_close(_our_nll(again, ids), expected, "per-token NLL after export and reload")


def test_tied_embeddings_initialise_an_untied_head(tied_sharded, caplog):
    folder, hf_model = tied_sharded
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index  # what makes this a tied checkpoint
    with caplog.at_level(logging.WARNING, logger=hf_io.__name__):
        model = _load_causal(folder)
    assert "tie_word_embeddings=true" in caplog.text and "untied" in caplog.text
    embed = model.model.embed_tokens.token_embedding
    for name in SPLITS["split_vocab_order"]:
        head_w, embed_w = model.lm_head.lm_head[name].weight, embed[name].weight
        torch.testing.assert_close(head_w, embed_w, rtol=0, atol=0)
        assert head_w.data_ptr() != embed_w.data_ptr()  # separate parameters
    with torch.no_grad():
        model.lm_head.lm_head["text"].weight.add_(1.0)
    torch.testing.assert_close(
        embed["text"].weight, hf_model.model.embed_tokens.weight[:70], rtol=0, atol=0
    )


def test_classification_load_and_export_match_transformers(classifier, tmp_path):
    folder, hf_model = classifier
    params = classification_params_from_hf_config(folder, **SPLITS)
    assert params.num_labels == 3
    model = _build(Qwen3DenseForClassification, params)
    load_hf_checkpoint(model, folder)
    ids = _tokens()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, 15:] = 0
    attention_mask[2, 9:] = 0
    ids = ids.masked_fill(ids == PAD, PAD + 1).masked_fill(attention_mask == 0, PAD)
    pooling = token_pooling_mask_from_attention_mask(attention_mask, "last")
    with torch.no_grad():
        expected = hf_model(ids).logits  # HF pools the last non-pad token
        scores = model(input_ids=ids, pooling_mask=pooling)["scores"]
    _assert_close(scores, expected, "pooled classification scores")

    out = tmp_path / "export"
    save_hf_checkpoint(model, out, base_config=read_hf_config(folder))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = _reload_hf(Qwen3ForSequenceClassification, out)
    assert reloaded.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        _assert_close(reloaded(ids).logits, expected, "HF scores after export")


def test_classifier_from_causal_lm_checkpoint_needs_init_new_head(untied):
    folder, hf_model = untied
    params = classification_params_from_hf_config(folder, num_labels=5, **SPLITS)
    model = _build(Qwen3DenseForClassification, params)
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(model, folder)
    assert "missing tensors (1):\n    score.weight" in str(err.value)
    assert "unexpected tensors (1):\n    lm_head.weight" in str(err.value)

    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    load_hf_checkpoint(model, folder, init_new_head=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(model.model.norm.weight, hf_model.model.norm.weight, rtol=0, atol=0)
    assert model.cls_head.score.weight.shape == (5, 64)


def test_pipeline_stages_read_only_their_tensors(tied_sharded, monkeypatch):
    folder, hf_model = tied_sharded
    reads: list[str] = []
    real_open = safetensors_io._safe_open

    class _Spy:
        def __init__(self, path):
            self._file = real_open(path)

        def __enter__(self):
            self._f = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def get_slice(self, key):
            reads.append(key)
            return self._f.get_slice(key)

        def get_tensor(self, key):
            reads.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr(safetensors_io, "_safe_open", _Spy)
    stages = []
    stage_reads = []
    for i in range(2):
        reads.clear()
        stages.append(_load_causal(folder, PipelineStageInfo(i, 2)))
        stage_reads.append(set(reads))
    monkeypatch.undo()

    def layer_keys(layers):
        return {k for k in hf_model.state_dict() if k.split(".")[2:3] in ([str(i)] for i in layers)}

    embed = {"model.embed_tokens.weight"}
    assert stage_reads[0] == embed | layer_keys([0, 1])
    # Tied: the last stage reads its head from the embedding matrix.
    assert stage_reads[1] == embed | layer_keys([2, 3]) | {"model.norm.weight"}

    full = _load_causal(folder)
    full_state = full.state_dict()
    for stage in stages:
        for key, value in stage.state_dict().items():
            torch.testing.assert_close(value, full_state[key], rtol=0, atol=0, msg=key)
    assert len(stages[0].state_dict()) + len(stages[1].state_dict()) == len(full_state)

    ids = _tokens()
    with torch.no_grad():
        hidden = stages[0](input_ids=ids[:, :-1])["hidden_states"]
        chained = stages[1](hidden_states=hidden, labels=ids[:, 1:])["logps"]
    torch.testing.assert_close(chained, _our_nll(full, ids).float(), rtol=0, atol=0)
    _assert_close(chained, _hf_nll(hf_model, ids), "2-stage pipeline NLL")


def test_loads_through_compile_and_checkpoint_wrappers(untied):
    folder, _ = untied
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    model = _build(Qwen3DenseForCausalLM, params)
    layers = model.model.layers
    for name in list(layers):
        # The compile layer wraps each layer; names must still resolve to the unwrapped
        # checkpoint names (model.layers.<i>...).
        layers[name] = torch.compile(checkpoint_wrapper(layers[name]))
    load_hf_checkpoint(model, folder)
    reference = _load_causal(folder).state_dict()
    state = {
        k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): v
        for k, v in model.state_dict().items()
    }
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_loads_after_apply_compile_config(untied):
    folder, hf_model = untied
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    with torch.device("meta"):
        model = whole_model(params)
    apply_compile_config(model, load_compile_config("compile_sac"))
    model.to_empty(device="cpu")
    load_hf_checkpoint(model, folder)
    state = model.state_dict()
    for key, value in _load_causal(folder).state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(
        state["model.layers.3.self_attn.q_norm.weight"],
        hf_model.model.layers[3].self_attn.q_norm.weight,
        rtol=0,
        atol=0,
    )


def _broken_checkpoint(src, dst, edit):
    """A single-file copy of ``src`` with ``edit`` applied to its tensor dict."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    edit(tensors)
    safetensors.torch.save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(untied, tmp_path):
    folder, _ = untied

    def edit(tensors):
        del tensors["model.layers.2.mlp.up_proj.weight"]
        del tensors["lm_head.weight"]
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
        tensors["model.layers.1.self_attn.k_norm.weight"] = torch.ones(8)
        tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB - 1, 64)

    broken = _broken_checkpoint(folder, tmp_path / "broken", edit)
    model = _build(Qwen3DenseForCausalLM, causal_lm_params_from_hf_config(folder, **SPLITS))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    with pytest.raises(ValueError) as err:
        load_hf_checkpoint(model, broken)
    message = str(err.value)
    assert (
        "missing tensors (2):\n    lm_head.weight\n    model.layers.2.mlp.up_proj.weight" in message
    )
    assert "unexpected tensors (1):\n    model.layers.9.mlp.up_proj.weight" in message
    assert "shape mismatches (3):" in message
    assert "model.layers.1.self_attn.k_norm.weight: checkpoint (8,), model (16,)" in message
    assert "model.embed_tokens.weight: checkpoint (95, 64), model (96, 64)" in message
    # Nothing was copied: the error comes before any tensor is read.
    assert all((p == 7.0).all() for p in model.parameters())


def test_a_model_that_disagrees_with_config_json_is_refused(untied):
    folder, _ = untied
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    wrong = params.model_copy(
        update={"model": params.model.model_copy(update={"rope_base": 10000})}
    )
    with pytest.raises(ValueError, match="rope_base: model 10000 vs checkpoint 5000"):
        load_hf_checkpoint(_build(Qwen3DenseForCausalLM, wrong), folder)


def test_meta_model_and_empty_folder_are_refused(untied, tmp_path):
    folder, _ = untied
    params = causal_lm_params_from_hf_config(folder, **SPLITS)
    with torch.device("meta"):
        model = whole_model(params)
    with pytest.raises(ValueError, match="to_empty"):
        load_hf_checkpoint(model, folder)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_hf_checkpoint(_build(Qwen3DenseForCausalLM, params), tmp_path)


def test_export_refuses_a_pipeline_stage_and_an_occupied_folder(untied, tmp_path):
    folder, _ = untied
    stage = _load_causal(folder, PipelineStageInfo(0, 2))
    with pytest.raises(ValueError, match="full model"):
        save_hf_checkpoint(stage, tmp_path / "a")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        save_hf_checkpoint(_load_causal(folder), folder)


def test_missing_safetensors_names_the_extra(untied, monkeypatch):
    folder, _ = untied
    model = _build(Qwen3DenseForCausalLM, causal_lm_params_from_hf_config(folder, **SPLITS))
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=r"d9d\[hf\]"):
        load_hf_checkpoint(model, folder)
    with pytest.raises(ImportError, match=r"d9d\[hf\]"):
        save_hf_checkpoint(model, folder / "out")


def test_dtypes_are_cast_on_load_and_chosen_on_export(untied, tmp_path):
    folder, hf_model = untied

    def to_bf16(tensors):
        for key in tensors:
            tensors[key] = tensors[key].bfloat16()

    bf16 = _broken_checkpoint(folder, tmp_path / "bf16", to_bf16)
    model = _build(Qwen3DenseForCausalLM, causal_lm_params_from_hf_config(bf16, **SPLITS))
    load_hf_checkpoint(model, bf16)
    weight = model.model.layers["0"].mlp.down_proj.weight
    assert weight.dtype == torch.float32
    expected = hf_model.model.layers[0].mlp.down_proj.weight.bfloat16().float()
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)

    out = tmp_path / "export"
    save_hf_checkpoint(model, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    torch.testing.assert_close(
        saved["lm_head.weight"].float(), hf_model.lm_head.weight.bfloat16().float(), rtol=0, atol=0
    )
