"""The docstring examples of every public name run, in JAX's default (float32) configuration.

Equivalent to ``pytest --doctest-modules softmax_jax`` restricted to the public API, but collected
with the rest of the suite (and its conftest: no x64, warnings are errors), one test per name.
"""

import doctest

import pytest

import softmax_jax as sj

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _examples(name):
    obj = getattr(sj, name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(obj, name, globs={}) if t.examples]


@pytest.mark.parametrize("name", sorted(sj.__all__))
def test_docstring_examples(name):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of sj.{name} failed"


def test_public_functions_have_examples():
    """Guards the test above against running nothing: the core functions carry examples."""
    for name in ("loss", "grad", "value_and_grad", "check_grad", "linear_cross_entropy", "fit"):
        assert _examples(name), f"sj.{name} has no docstring example"
