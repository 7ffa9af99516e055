"""`benchmarks/sm90_registers.py` reads ptxas's resource lines (registers and spill bytes of the last function
reported, ptxas's wgmma-serialization advisory) and refuses output without a register count rather than reporting
zeros; it finds a kernel's main loop in SASS as its longest backward branch and counts the opcodes inside."""

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

    assert parse_ptxas(PTXAS_V) == {"registers": 255, "spill_store_bytes": 60, "spill_load_bytes": 56,
                                    "wgmma_serialized": False}
    advisory = "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
    assert parse_ptxas(advisory + PTXAS_V)["wgmma_serialized"]
    no_spill = PTXAS_V.replace("60 bytes spill stores, 56 bytes spill loads",
                               "0 bytes spill stores, 0 bytes spill loads")
    assert parse_ptxas(no_spill.replace("Used 255", "Used 192"))["registers"] == 192


def test_parse_ptxas_refuses_output_without_registers():
    from sm90_registers import parse_ptxas

    with pytest.raises(ValueError, match="no register count"):
        parse_ptxas("ptxas fatal   : Unresolved extern function")


SASS = """
        /*0100*/                   IMAD R1, R2, R3, RZ ;
        /*0110*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0120*/               @P0 FMUL R4, R4, R5 ;
        /*0130*/                   FMUL R6, R6, R5 ;
        /*0140*/              @!P1 BRA 0x110 ;
        /*0150*/                   EXIT ;
"""


def test_parse_loop_counts_the_longest_backward_branch_span():
    from sm90_registers import parse_loop

    got = parse_loop(SASS)
    assert got["loop_instructions"] == 4, got  # 0x110 .. 0x140: HGMMA, FMUL, FMUL, BRA
    assert got["loop_opcodes"] == {"FMUL": 2, "HGMMA": 1, "BRA": 1}, got
    assert parse_loop(SASS.replace("BRA 0x110", "BRA 0x150"))["loop_instructions"] == 0  # a forward branch
