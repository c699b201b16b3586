"""The dtype chosen by what the machine has: bfloat16 exactly where the CPU lists native bfloat16 instructions."""

from pathlib import Path

import pytest
import torch

from hf_layerskip.cli.measure_options import resolve_dtype
from hf_layerskip.generation.hardware import fastest_dtype, native_bfloat16

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.is_file(), reason="reads the CPU's flags from /proc/cpuinfo (Linux)")
def test_native_bfloat16_follows_the_cpu_flags():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    assert native_bfloat16(torch.device("cpu")) == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_is_the_fastest_dtype_and_a_named_dtype_wins():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native_bfloat16(cpu) else torch.float32
    assert fastest_dtype(cpu) == resolve_dtype("auto", cpu) == expected
    assert resolve_dtype("float32", cpu) == torch.float32 and resolve_dtype("bfloat16", cpu) == torch.bfloat16
