"""`_cli_common`: the one-line parser errors, fit's argument names as flags, --device."""

from __future__ import annotations

import pytest

from softmax_jax._cli_common import CLIError, Parser, as_flags, select_device


def test_parser_errors_are_one_line_with_exit_2(capsys):
    parser = Parser(prog="softmax-jax x")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--n", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("softmax-jax x: error: argument --n")


@pytest.mark.parametrize(
    "message, expected",
    [
        ("`batch_size` must be a positive integer", "--batch-size must be a positive integer"),
        ("or use another checkpoint_dir", "or use another --checkpoint-dir"),
        ("ask for `epochs` >= 5; all 5 epochs", "ask for --epochs >= 5; all 5 epochs"),
        ("`learning_rate` must be None", "--lr must be None"),
        ("my_checkpoint_dir_2 stays", "my_checkpoint_dir_2 stays"),
    ],
)
def test_as_flags_names_the_flags(message, expected):
    assert as_flags(message) == expected


def test_unknown_device_is_a_cli_error():
    select_device(None)  # JAX's default: nothing to do
    try:
        select_device("gpu")
    except CLIError as e:
        assert str(e).startswith("--device gpu: no gpu device available to JAX")
