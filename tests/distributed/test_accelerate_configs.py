"""The launch configs in examples/accelerate_configs load with accelerate's own reader, describe the layout their
name says, and each has its launch line in docs/scaling.md."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate_configs"
EXPECTED = {  # file: (distributed type, machines, ZeRO stage or FSDP version, offloaded)
    "single_gpu.yaml": (DistributedType.NO, 1, None, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 1, None, False),
    "zero2.yaml": (DistributedType.DEEPSPEED, 1, 2, False),
    "zero3.yaml": (DistributedType.DEEPSPEED, 1, 3, False),
    "zero3_offload.yaml": (DistributedType.DEEPSPEED, 1, 3, True),
    "fsdp2.yaml": (DistributedType.FSDP, 1, 2, False),
    "two_nodes.yaml": (DistributedType.DEEPSPEED, 2, 3, False),
}


def test_every_config_is_expected_and_documented():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    guide = (ROOT / "docs" / "scaling.md").read_text()
    for name in EXPECTED:
        assert f"--config_file examples/accelerate_configs/{name}" in guide, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_describes_its_layout(name):
    config = load_config_from_file(str(CONFIGS / name))
    kind, machines, level, offloaded = EXPECTED[name]
    assert config.distributed_type == kind and config.num_machines == machines
    assert not config.use_cpu and config.mixed_precision == "bf16"
    if kind == DistributedType.DEEPSPEED:
        ds = config.deepspeed_config
        assert ds["zero_stage"] == level
        assert (ds["offload_param_device"] == "cpu") == offloaded == (ds["offload_optimizer_device"] == "cpu")
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == level
    if machines > 1:
        assert config.num_processes % machines == 0 and config.main_process_ip and config.main_process_port
