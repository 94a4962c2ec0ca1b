"""The README's Python examples run, in order, in one namespace (as a user would paste them)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "the README lost its examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        code = block.replace('checkpoint_dir="/tmp/ckpt"', f'checkpoint_dir="{tmp_path}/ckpt"')
        if "jax.distributed.initialize()" in code or "reshape(2, 4)" in code:
            continue  # multi-device/-host snippets: covered by tests/test_parallel.py
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}")
