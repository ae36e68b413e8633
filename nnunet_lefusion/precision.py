"""What this machine's CPU runs natively, and the bf16 autocast nnU-Net's steps run under on it."""
import contextlib

import torch


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 autocast is emulated and runs
    several times slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


CPU_BF16_LOG_LINE = "LeFusion: bf16 autocast on the CPU (cpu_bf16)"   # the trainer's log line when it applies


def cpu_bf16_autocast(enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU where ``enabled`` (the trainer's ``cpu_bf16``), else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
