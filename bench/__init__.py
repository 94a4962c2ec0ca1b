"""The benchmark suites of ``softmax-jax bench``: one module per suite, ``run(quick) -> dict``."""
