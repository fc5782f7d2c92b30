"""RRPO (random resets) under the same harness, defaults and recipes as train_srpo.py.

    python examples/train_rrpo.py
    python examples/train_rrpo.py --config RECIPE.yaml --print-config   # the resolved settings, each with its source
"""

from trl_resets.app.harness import main

if __name__ == "__main__":
    main("rrpo")
