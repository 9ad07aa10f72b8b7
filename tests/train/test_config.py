"""The training config: defaults, TOML files, --set overrides and errors naming the key."""

import pytest

from d9d.train.config import TrainConfig, load_train_config


def test_defaults_need_no_file():
    config = load_train_config(None)
    assert config == TrainConfig()
    assert config.data.source == "stdlib" and config.data.tokenizer == "byte"


def test_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 7\n[parallel]\npipeline_parallel = 2\n[data]\ntokenizer = "byte"\n')
    config = load_train_config(
        path, ["parallel.data_parallel_shard=2", "lr.schedule=wsd", "optimizer.betas=[0.8, 0.9]"]
    )
    assert config.steps == 7
    assert config.parallel.world_size == 4
    assert config.lr.schedule == "wsd"
    assert config.optimizer.betas == (0.8, 0.9)


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nlearning_rate = 1.0\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*unknown key 'optimizer\.learning_rate'"):
        load_train_config(path)
    with pytest.raises(ValueError, match=r"--set.*unknown key 'parallel\.pp'"):
        load_train_config(None, ["parallel.pp=2"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"key 'steps'"):
        load_train_config(None, ["steps=0"])
    with pytest.raises(ValueError, match="does not exist"):
        load_train_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="expected key=value"):
        load_train_config(None, ["steps"])
    with pytest.raises(ValueError, match="needs 'paths'"):
        load_train_config(None, ["data.source=tokens"])


def test_help_lists_every_key_with_its_default_and_the_outputs(capsys):
    from pydantic import BaseModel

    from d9d.train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # Every key of every section, from the models themselves (it cannot drift).
    defaults = TrainConfig()
    for name in TrainConfig.model_fields:
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            assert f"[{name}]" in text
            for key in type(value).model_fields:
                assert f"  {name}.{key} = " in text, key
        else:
            assert f"  {name} = " in text, name
    assert '  mixed_precision = "auto"' in text and "  optimizer.lr = 0.003" in text
    assert '  output_dir = "runs/default"' in text
    assert "Optimizer steps." in text  # the key's description from its docstring
    for output in ("metrics.jsonl", "checkpoints/step-N/", "hf/", "token_cache/"):
        assert output in text


def test_betas_out_of_range_name_the_key():
    with pytest.raises(
        ValueError, match=r"key 'optimizer\.betas': Value error, each beta must be in \[0, 1\)"
    ):
        load_train_config(None, ["optimizer.betas=[1.5, 0.9]"])


def test_checkpoint_options_have_safe_defaults():
    ck = load_train_config(None).checkpoint
    assert ck.resume and not ck.overwrite and not ck.allow_changes and not ck.async_save
