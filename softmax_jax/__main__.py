"""``python -m softmax_jax``: the ``softmax-jax`` command line."""

import sys

from softmax_jax._cli import main

if __name__ == "__main__":
    sys.exit(main())
