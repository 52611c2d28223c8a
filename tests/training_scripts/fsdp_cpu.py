"""`hf-mdm train` under Accelerate's FSDP2 on CPU processes (gloo), for the tests.

    torchrun --nproc_per_node 2 tests/training_scripts/fsdp_cpu.py TRAIN_FLAGS...

Accelerate turns FSDP on only for accelerator processes (GPU, XPU, ...): on CPU processes it ignores an FSDP
config and runs DDP. torch's FSDP2 itself runs on CPU with gloo, so this script switches Accelerate's state to
FSDP2 (each block a unit, sharded state dicts, as examples/accelerate/fsdp.yaml asks on GPUs) and runs the CLI
unchanged: the loop, Accelerate's FSDP prepare, sharded checkpoints, resume and the final gathered save are the
same code a GPU run uses.
"""

import os
import sys

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from hf_mdm.training import cli

BLOCKS = os.environ.get("FSDP_BLOCK_CLASS", "MDMBlock").split(",")  # MDMLlamaBlock for the Llama family
_init = state.AcceleratorState.__init__


def fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        if getattr(self, "fsdp_plugin", None) is None:
            self.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=BLOCKS,
                state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    state.AcceleratorState.__init__ = fsdp_on_cpu
    cli.main(sys.argv[1:])
