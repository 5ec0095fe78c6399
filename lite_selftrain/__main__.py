"""`python -m lite_selftrain`: the `lite-selftrain` command."""

import os
import sys

# `python -m` puts the working directory first on sys.path. Run from a source checkout, its `kernels/` folder
# (installed as lite_selftrain.kernels) would hide the PyPI package `kernels` that transformers imports.
if sys.path and sys.path[0] in ("", os.getcwd()) and os.path.isfile(os.path.join("kernels", "triton_logprob.py")):
    del sys.path[0]

from lite_selftrain.cli import main  # noqa: E402

main()
