"""``decode_attention: tp`` refuses attention projections it cannot slice by head."""

from types import SimpleNamespace

import pytest

from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from vllm_cp_nsa.adapter.model import check_heads_sliceable
from vllm_cp_nsa.config import CpNsaConfigError


class Fp8BlockMethod:  # stands in for a quantized linear method
    pass


def test_unquantized_projections_can_be_sliced_quantized_ones_are_refused():
    plain = SimpleNamespace(quant_method=UnquantizedLinearMethod())
    check_heads_sliceable(plain, plain)
    quantized = SimpleNamespace(quant_method=Fp8BlockMethod())
    with pytest.raises(CpNsaConfigError, match=r"needs them unquantized; this checkpoint quantizes them "
                                               r"\(Fp8BlockMethod\)\. Use decode_attention='split'"):
        check_heads_sliceable(plain, quantized)
