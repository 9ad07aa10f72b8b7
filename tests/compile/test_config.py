"""The preset files and the config schema: loading, naming, and rejecting bad input."""

from pathlib import Path

import pytest
import torch

from d9d.compile import PRESET_DIR, CompileConfig, list_presets, load_compile_config

REQUIRED_PRESETS = {
    "eager",
    "compile",
    "compile_sac",
    "compile_full_ac",
    "compile_memory_budget",
    "compile_sac_float8",
    "compile_sac_float8_rowwise",
}


def _write(tmp_path: Path, text: str, name: str = "custom.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_preset_loads_and_says_when_to_use_it():
    presets = list_presets()
    assert presets == sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert set(presets) >= REQUIRED_PRESETS
    for name in presets:
        config = load_compile_config(name)
        assert config.name == name
        assert load_compile_config(PRESET_DIR / f"{name}.toml") == config
        first_line = (PRESET_DIR / f"{name}.toml").read_text().splitlines()[0]
        assert first_line.startswith(f"# {name}: "), first_line
        # Mixed precision is the distributed layer's business unless a preset is about it.
        assert config.fsdp.param_dtype is None and config.fsdp.reduce_dtype is None


def test_presets_mean_what_their_names_say():
    assert not load_compile_config("eager").compile.enabled
    assert load_compile_config("compile_full_ac").activation_checkpointing.mode == "full"
    sac = load_compile_config("compile_sac").activation_checkpointing
    assert sac.mode == "selective" and sac.save_every_other_matmul
    all_mm = load_compile_config("compile_sac_all_mm").activation_checkpointing
    assert all_mm.mode == "selective" and "aten.mm" in all_mm.saved_ops
    assert not all_mm.save_every_other_matmul
    budget = load_compile_config("compile_memory_budget").activation_checkpointing
    assert budget.mode == "memory_budget" and 0 < budget.memory_budget < 1
    assert load_compile_config("compile_sac_float8").float8.recipe == "tensorwise"
    assert load_compile_config("compile_sac_float8_rowwise").float8.recipe == "rowwise"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown compile preset 'compile_fast'.*compile_sac"):
        load_compile_config("compile_fast")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("fullgraph = true\n", "fullgraph"),
        ("[compile]\nenabled = true\nfull_graph = true\n", "compile.full_graph"),
        (
            "[activation_checkpointing]\nmode = 'full'\nbudget = 0.3\n",
            "activation_checkpointing.budget",
        ),
        ("[float8]\nrecipes = 'rowwise'\n", "float8.recipes"),
        ("[fsdp]\nparam_type = 'bfloat16'\n", "fsdp.param_type"),
    ],
)
def test_unknown_keys_are_rejected_with_file_and_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match="unknown key") as err:
        load_compile_config(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[activation_checkpointing]\nmode = 'partial'\n", "activation_checkpointing.mode"),
        ("[float8]\nenabled = true\nrecipe = 'blockwise'\n", "float8.recipe"),
        (
            "[compile]\nenabled = true\n[activation_checkpointing]\n"
            "mode = 'memory_budget'\nmemory_budget = 1.5\n",
            "activation_checkpointing.memory_budget",
        ),
        (
            "[activation_checkpointing]\nmode = 'memory_budget'\nmemory_budget = -0.1\n",
            "activation_checkpointing.memory_budget",
        ),
        ("[fsdp]\nparam_dtype = 'float64'\n", "fsdp.param_dtype"),
        ("[compile]\nenabled = 'yes please'\n", "compile.enabled"),
        ("[compile]\nenabled = true\nmode = 'max-autotune-fast'\n", "compile.mode"),
        ("[compile]\noptions = { max_autotun = true }\n", "compile.options"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_compile_config(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[activation_checkpointing]\nmode = 'full'\nmemory_budget = 0.3\n", "only applies"),
        ("[activation_checkpointing]\nmode = 'none'\nsave_every_other_matmul = true\n", "only"),
        (
            "[activation_checkpointing]\nmode = 'selective'\nsaved_ops = ['aten.nope']\n",
            "aten.nope",
        ),
        ("[float8]\nrecipe = 'rowwise'\nenable_fsdp_float8_all_gather = true\n", "tensorwise"),
        ("name = 'other'\n", "name"),
        ("[compile\n", "not valid TOML"),
    ],
)
def test_inconsistent_configs_are_rejected(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        load_compile_config(path)


def test_compile_mode_and_options_are_torchs_own(tmp_path):
    # The mode list and the option names come from torch itself, not from a copy.
    path = _write(tmp_path, "[compile]\nenabled = true\nmode = 'max-autotune-fast'\n")
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs") as err:
        load_compile_config(path)
    assert "reduce-overhead" in str(err.value)  # the message lists the known modes
    path = _write(tmp_path, "[compile]\noptions = { max_autotun = true, cpp.simdlen = 8 }\n")
    with pytest.raises(ValueError, match=r"unknown inductor option 'options\.max_autotun'\ "):
        load_compile_config(path)  # cpp.simdlen (a dotted TOML key) is known
    path = _write(tmp_path, "[compile.options]\nmax_autotune = true\ncpp.simdlen = 8\n")
    assert load_compile_config(path).compile.options == {"max_autotune": True, "cpp.simdlen": 8}
    path = _write(tmp_path, "[compile]\nbackend = 'aot_eager'\nmode = 'max-autotune'\n")
    with pytest.raises(ValueError, match="inductor settings"):
        load_compile_config(path)


def test_mode_and_options_reach_torch_compile_together():
    # torch.compile refuses mode= and options= at once: the mode's options are merged.
    section = CompileConfig(
        compile={
            "enabled": True,
            "mode": "max-autotune-no-cudagraphs",
            "options": {"cpp.simdlen": 8},
        }
    ).compile
    kwargs = section.torch_compile_kwargs()
    assert "mode" not in kwargs
    assert kwargs["options"] == {
        "max_autotune": True,
        "coordinate_descent_tuning": True,
        "cpp.simdlen": 8,
    }
    plain = CompileConfig(compile={"enabled": True, "mode": "reduce-overhead"}).compile
    assert plain.torch_compile_kwargs()["mode"] == "reduce-overhead"
    assert "mode" not in CompileConfig().compile.torch_compile_kwargs()


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_compile_config(tmp_path / "absent.toml")


def test_fsdp_section_gives_torch_dtypes(tmp_path):
    path = _write(tmp_path, "[fsdp]\nparam_dtype = 'bfloat16'\nreduce_dtype = 'float32'\n")
    fsdp = load_compile_config(path).fsdp
    assert fsdp.torch_param_dtype() is torch.bfloat16
    assert fsdp.torch_reduce_dtype() is torch.float32
    assert CompileConfig().fsdp.torch_param_dtype() is None
    assert fsdp.reshard_after_forward is None
