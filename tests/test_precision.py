"""Tests for diffusion/precision.py: what "auto" resolves to and what each setting runs in."""

import pytest
import torch

import diffusion.precision as precision
from diffusion.errors import UserError


def test_auto_mixed_precision_is_bf16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert precision.resolve_mixed_precision("auto", cpu) == expected
    for setting in ("no", "bf16", "fp16"):  # an explicit setting is kept as it is
        assert precision.resolve_mixed_precision(setting, cpu) == setting
    assert precision.native_bf16(torch.device("meta")) is False


def test_unknown_setting_names_the_choices():
    with pytest.raises(UserError, match="unknown mixed precision 'fp8'; choose one of auto, no, fp16, bf16"):
        precision.resolve_mixed_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("setting, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_matmuls_in_the_setting_dtype(setting, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with precision.autocast(torch.device("cpu"), setting):
        assert (a @ b).dtype == dtype
