"""Device choice: --device auto takes CUDA, else Apple's MPS, else the CPU; MPS runs the reference ops.
dtype choice: --dtype auto takes bfloat16 where it is faster than float32 here."""
import pytest
import torch

from mingpt import runtime
from mingpt.ops import get_ops
from mingpt.runtime import resolve_device, resolve_dtype


def present(monkeypatch, cuda: bool, mps: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    present(monkeypatch, cuda, mps)
    assert resolve_device("auto") == torch.device(expected)


def test_asking_for_an_absent_mps_is_an_error(monkeypatch):
    present(monkeypatch, cuda=False, mps=False)
    with pytest.raises(ValueError, match="no Apple MPS device"):
        resolve_device("mps")


def test_mps_runs_the_reference_ops():
    ops = get_ops("auto", torch.device("mps"))
    assert ops.name == "reference" and set(ops.sources.values()) == {"reference"}



@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.25, "bfloat16"), (1.0, 0.7, "float32"),
                                                       (1.0, 40.0, "float32")])
def test_dtype_auto_on_a_cpu_takes_bf16_only_where_its_matmuls_are_faster(monkeypatch, fp32_s, bf16_s, expected):
    """An AVX-512 BF16 machine runs bf16 products ~4x faster than fp32; an AVX2 one emulates them ~100x slower."""
    monkeypatch.setattr(runtime, "matmul_seconds", lambda dtype: fp32_s if dtype == torch.float32 else bf16_s)
    dtype, why = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == expected and f"{fp32_s / bf16_s:.2f}x" in why


def test_dtype_auto_measures_this_machine_and_explicit_dtypes_stand():
    assert resolve_dtype("auto", torch.device("cpu"))[0] in ("float32", "bfloat16")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == ("bfloat16", "as asked")
