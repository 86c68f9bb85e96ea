"""The contract between Python and the kernels is declared once (kdkernels/_options.py): the C++
extension was built from it and says so, a stale build is refused, and the options survive the
trip through the ops' float[] argument."""
import types

import pytest

from kdkernels import _options
from kdkernels._options import ENUMS, OPTION_NAMES, FusedOptions
from kdkernels.ops import cpp_distill


@pytest.mark.skipif(cpp_distill._C is None, reason=f"no C++ kernel: {cpp_distill._WHY_NOT}")
def test_cpp_extension_was_built_from_this_declaration():
    assert cpp_distill._C.OPTION_NAMES.split(",") == list(OPTION_NAMES)
    for name, value in ENUMS.items():
        assert getattr(cpp_distill._C, name) == value, name


def test_a_stale_build_is_refused_with_the_reason():
    stale = types.SimpleNamespace(OPTION_NAMES="temp_mode,temperature", **ENUMS)
    assert "options 'temp_mode,temperature'" in cpp_distill._contract_mismatch(stale)
    renumbered = types.SimpleNamespace(OPTION_NAMES=",".join(OPTION_NAMES),
                                       **dict(ENUMS, CORRECTION_SWAP=7))
    assert "CORRECTION_SWAP" in cpp_distill._contract_mismatch(renumbered)
    assert cpp_distill._contract_mismatch(types.SimpleNamespace(
        OPTION_NAMES=",".join(OPTION_NAMES), **ENUMS)) is None


def test_options_round_trip_through_the_float_list():
    options = FusedOptions(temp_mode=_options.TEMP_ROWS, temp_value=2.5, correction=3,
                           t2_scale=False, ignore_index=-7, compute_grad=False, grad_scale=0.25,
                           virtual_teacher=0.9)
    packed = options.pack()
    assert len(packed) == len(OPTION_NAMES) and all(isinstance(v, float) for v in packed)
    assert FusedOptions.unpack(packed) == options
    assert set(options.triton_kwargs()) == set(OPTION_NAMES)


def test_the_generated_header_declares_every_option_in_order():
    header = _options.cpp_header()
    positions = [header.index(f" {name};") for name in OPTION_NAMES]
    assert positions == sorted(positions)
    for name, value in ENUMS.items():
        assert f'{{"{name}", {value}}}' in header
