"""Bad input is refused before the first step, with an error naming the problem."""

import re

import pytest

from d9d.train.__main__ import main
from tests.helpers import run_spawned
from tests.train._loop_scenarios import write_corpus


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    corpus = write_corpus(folder)
    (result,) = run_spawned(
        1, "tests.train._loop_scenarios:bad_inputs", timeout_s=180, corpus=str(corpus)
    )
    return result


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("small_corpus", r"corpus is smaller than one batch: .*global_batch_size=100000"),
        ("vocab", r"tokenizer's vocabulary \(258 ids\) is larger than the model's \(100\)"),
        ("missing_file", r"token file .*nope\.bin does not exist"),
        ("microbatches", r"batch of 8 rows does not split into 3 microbatches"),
        ("layout", r"describes 2 processes .* but 1 were started"),
        # Checked before the layout's process count (no process group is built).
        (
            "context_parallel_seq",
            r"data\.seq_len 30 is not divisible by 2 x context-parallel degree = 4",
        ),
        ("other_model", r"step-0 holds an incompatible model: .*hidden_size: checkpoint 32, "),
        (
            "corrupted",
            r"checkpoint .*step-1 failed verification: .*step-1/__0_0\.distcp has 0 bytes, the "
            r"manifest records \d+; the newest verified checkpoint is .*step-0: set "
            r"checkpoint\.resume_from=.*step-0",
        ),
    ],
)
def test_refused_with_a_clear_message(errors, name, pattern):
    assert errors[name] is not None, f"{name} was accepted"

    assert re.search(pattern, errors[name]), errors[name]


def test_unknown_config_key_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[data]\nsequence_length = 8\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.toml" in err and "unknown key 'data.sequence_length'" in err


def test_hf_export_holds_the_trained_weights(errors):
    assert errors["export_matches"] is True


def test_non_finite_norms_skip_steps_then_stop(errors):
    result = errors["nonfinite"]
    assert (
        result["message"] is not None
        and "2 non-finite gradient norms in a row" in result["message"]
    )
    assert result["step"] == 2
    assert result["unchanged"], "a skipped step must not touch the parameters"
