"""`benchmarks/sm90_registers.py` reads ptxas's resource lines: registers and spill bytes of the last function
reported, and refuses output without a register count rather than reporting zeros."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

PTXAS_V = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_dkv_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_dkv_kernel
    60 bytes stack frame, 60 bytes spill stores, 56 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 60 bytes cumulative stack size
"""


def test_parse_ptxas_reads_registers_and_spills():
    from sm90_registers import parse_ptxas

    assert parse_ptxas(PTXAS_V) == {"registers": 255, "spill_store_bytes": 60, "spill_load_bytes": 56}
    no_spill = PTXAS_V.replace("60 bytes spill stores, 56 bytes spill loads",
                               "0 bytes spill stores, 0 bytes spill loads")
    assert parse_ptxas(no_spill.replace("Used 255", "Used 192"))["registers"] == 192


def test_parse_ptxas_refuses_output_without_registers():
    from sm90_registers import parse_ptxas

    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas fatal   : Unresolved extern function")
