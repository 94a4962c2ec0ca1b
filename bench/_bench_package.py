"""Makes the folder holding this file importable as the package ``bench``.

The folder is ``bench/`` in a source tree but ``softmax_jax/_bench`` inside an installed wheel, so
adding its parent to ``sys.path`` is not enough. Importing this module registers its folder: a
suite run as a script does ``import _bench_package`` (the script's folder is first on
``sys.path``), and ``bench/run.py`` loads it by path. Nothing of ``softmax_jax`` is needed, so
the suites use the library's public names only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def import_bench_package(bench_dir: str | Path) -> None:
    """Makes the folder ``bench_dir`` importable as the package ``bench`` (once per process)."""
    bench_dir = Path(bench_dir).resolve()
    existing = sys.modules.get("bench")
    if existing is not None and Path(getattr(existing, "__file__", "")).parent == bench_dir:
        return
    spec = importlib.util.spec_from_file_location(
        "bench", bench_dir / "__init__.py", submodule_search_locations=[str(bench_dir)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the benchmark package from {bench_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    for name in [m for m in sys.modules if m.startswith("bench.")]:  # a previous bench/
        del sys.modules[name]
    spec.loader.exec_module(module)


import_bench_package(Path(__file__).resolve().parent)
