"""RRPO (random resets) under the same harness, defaults and recipes as train_srpo.py.

    python examples/train_rrpo.py
    python examples/train_rrpo.py --config examples/recipes/rrpo_smollm2_cpu.yaml
"""

from trl_resets.harness import main

if __name__ == "__main__":
    main("rrpo")
