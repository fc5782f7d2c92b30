"""SRPO on the embedded SmolLM2-135M-Instruct and the multi-step arithmetic task (CPU, offline).

    python examples/train_srpo.py                                    # the CPU main job (warm-up included)
    accelerate launch examples/train_srpo.py --max_steps 10
    python examples/train_srpo.py --config RECIPE.yaml --print-config   # the resolved settings, each with its source
    accelerate launch examples/train_srpo.py --config examples/recipes/srpo_qwen2.5-1.5b_numina_gpu.yaml

Every setting is a command-line flag or a YAML recipe key: SRPOConfig, TRL's ModelConfig, and the
harness's TaskArguments and RunArguments (`python examples/train_srpo.py --help`). The harness is
`trl_resets.app.harness`, shared with train_rrpo.py and train_grpo.py.
"""

from trl_resets.app.harness import main

if __name__ == "__main__":
    main("srpo")
