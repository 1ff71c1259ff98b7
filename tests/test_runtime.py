"""Device choice: --device auto takes CUDA, else Apple's MPS, else the CPU; MPS runs the reference ops.
dtype choice: --dtype auto takes bfloat16 where it is faster than float32 here."""
import subprocess
import sys

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



FAULTS_PER_STEP = """
import resource, sys, torch
from mingpt import GPT, GPTConfig
from mingpt.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=6, n_embd=192, block_size=64, vocab_size=4649))
[optimizer] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
idx = torch.randint(4649, (32, 64))  # the speedrun's batch: 19 MB of bf16 logits and as much of their gradient


def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_without_faulting_pages_in_again():
    """A training step frees tensors of MiBs that the next step allocates again: by default glibc hands many
    back to the system and the next step faults their pages in anew; with keep_freed_memory (which training
    and the bench call) it keeps them (5,500-13,600 page faults a step of this bf16 training step against
    1,600-2,000 here, in three runs each)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        kept, per_step = out.stdout.split()
        return kept == "True", float(per_step)

    default_faults = faults("default")[1]
    kept, kept_faults = faults("keep")
    assert kept and kept_faults < default_faults / 2, (kept_faults, default_faults)
