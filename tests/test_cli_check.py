"""`softmax-jax check`: unknown or empty dtype lists are one-line errors (exit 2); the table
itself is exercised by tests/test_check.py."""

from __future__ import annotations

import contextlib
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from softmax_jax._cli import main


def check_exit(argv, command: str) -> None:
    """Exit 0, 1 or 2; on 2 one line ``softmax-jax <command>: error: ...``; no traceback."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert rc in (0, 1, 2) and "Traceback" not in err.getvalue()
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith(f"softmax-jax {command}: error: "), lines


@settings(max_examples=5, derandomize=True)
@given(dtypes=st.sampled_from(["int8", "", " , ", "float32,,x", "bfloat16,float99", "FLOAT32"]))
def test_check_exits_0_1_or_2_with_one_line(dtypes):
    """Unknown or empty dtype lists (the runs of the table itself are test_check.py's)."""
    check_exit(["check", "--quick", "--dtypes", dtypes], "check")
