"""Run accelerate's FSDP path on CPU processes (gloo), for the engine tests; imported at start-up when this folder
is on PYTHONPATH, and active only with ARK_HF_FSDP_ON_CPU=1.

accelerate turns `distributed_type: FSDP` into FSDP only on accelerators: on CPU the state stays MULTI_CPU and the
model is never sharded. torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo, so this lifts that one
refusal, setting the distributed type the way accelerate does on a GPU (on the accelerator state and the partial
state). Everything else (`prepare`, `fully_shard` per layer, `no_sync`, the full-state-dict gather, the FSDP
checkpoint files, resume) is accelerate's and torch's own code.
"""

import os

if os.environ.get("ARK_HF_FSDP_ON_CPU") == "1":
    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _init = _state.AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = __init__
