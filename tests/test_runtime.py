"""Device choice: --device auto takes CUDA, else Apple's MPS, else the CPU; MPS runs the reference ops."""
import pytest
import torch

from mingpt.ops import get_ops
from mingpt.runtime import resolve_device


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

