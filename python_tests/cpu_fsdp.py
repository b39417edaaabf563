"""Test-only shim: let accelerate turn on FSDP for a CPU (gloo) run.

accelerate 1.15's AcceleratorState switches `distributed_type` to FSDP only for accelerator devices (MULTI_GPU,
MULTI_XPU, ...), never for MULTI_CPU: with `use_cpu=True` a Trainer's `fsdp`/`fsdp_config` is silently ignored
(`is_fsdp_enabled` False, plain data parallel), and without `use_cpu` a CPU-only machine is not distributed at all
("Using fsdp only works in distributed training."). While the AcceleratorState is first built with an FSDP plugin on
MULTI_CPU, this shim shows it MULTI_GPU, so that it takes its FSDP branch; the device (cpu) and backend (gloo) stay
those PartialState chose.
"""

from accelerate.state import AcceleratorState, DistributedType, PartialState

_original_init = AcceleratorState.__init__


def _init(self, *args, **kwargs):
    shared = PartialState._shared_state
    wants_fsdp = kwargs.get("fsdp_plugin") is not None
    if (
        wants_fsdp
        and not AcceleratorState._shared_state
        and shared.get("distributed_type") == DistributedType.MULTI_CPU
    ):
        shared["distributed_type"] = DistributedType.MULTI_GPU
        try:
            return _original_init(self, *args, **kwargs)
        finally:  # accelerate copies FSDP back into PartialState; anything else goes back to MULTI_CPU
            if shared.get("distributed_type") == DistributedType.MULTI_GPU:
                shared["distributed_type"] = DistributedType.MULTI_CPU
    return _original_init(self, *args, **kwargs)


def enable() -> None:
    AcceleratorState.__init__ = _init
