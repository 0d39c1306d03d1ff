"""docs/configs.md, generated from the config files: every key, what it means, its value per variant.

    python -m biomedlm_jax.configdoc [REPO] > docs/configs.md    # REPO: the checkout, default .

`tests/test_configdoc.py` fails when docs/configs.md differs from what this prints, or when a config
gains a key without a description below, so the reference cannot go stale.
"""
from __future__ import annotations

import sys

from biomedlm_jax.training.configdoc import render

if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "."))
