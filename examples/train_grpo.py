"""The GRPO baseline under the same harness as train_srpo.py: no resets (k=0), 8 iid rollouts per prompt,
the same thought sampler, LoRA and task, so the three methods are compared like for like.

    python examples/train_grpo.py
    python examples/train_grpo.py --config RECIPE.yaml --print-config   # the resolved settings, each with its source
"""

from trl_resets.app.harness import main

if __name__ == "__main__":
    main("grpo")
