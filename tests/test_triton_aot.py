"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with Triton's real compiler, at every
launch the tiny, demo and seed models make (fp32, bf16 and fp16 autocast; plain and packed rows) and
every op makes alone in fp32, fp16 and bf16 (tests/triton_aot.py), within the architecture's shared
memory per block and without register spills. The attention kernels compile both with and without
starts (packed rows).

The interpreter ignores those limits, and this process runs the kernels in it (conftest), so the
compiles run in a child process without TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import triton_aot  # noqa: E402  (tests/ is on the path: pytest's rootdir-relative import of test helpers)

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = sorted({kernel.__name__ for kernel, *_ in triton_aot.record_launches(
    lambda: triton_aot.op_calls("tiny", "float32"))})


@pytest.fixture(scope="module")
def compiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py")], env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_op_launches_a_kernel_of_each_file():
    assert set(KERNELS) >= {"_layer_norm_fwd", "_layer_norm_bwd", "_bias_gelu_fwd", "_bias_gelu_bwd", "_attn_fwd",
                            "_attn_bwd_preprocess", "_attn_bwd", "_ce_fwd", "_ce_bwd", "_dropout", "_rotary"}


@pytest.mark.parametrize("arch", triton_aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_fits_the_architecture(compiles, kernel, arch):
    results = [r for r in compiles if r["kernel"] == kernel and r["arch"] == f"sm_{arch}"]
    assert results, f"{kernel} was not compiled for sm_{arch}"
    for r in results:
        where = f"{kernel} sm_{arch} {r['blocks']} num_warps={r['num_warps']} ({', '.join(r['uses'])})"
        shared = r["dynamic_shared"] + r["static_shared"]
        assert shared <= triton_aot.SHARED_LIMIT[arch], f"{where}: {shared} bytes of shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
            f"{where}: {r['spill_stores']} bytes of spill stores, {r['spill_loads']} of spill loads")
        assert r["registers"] <= 255, f"{where}: {r['registers']} registers"


def test_each_preset_and_dtype_is_compiled(compiles):
    uses = {use for r in compiles for use in r["uses"]}
    for preset in triton_aot.PRESET_VOCAB:
        for dtype in triton_aot.DTYPES:
            assert {f"{preset}/{dtype}/model", f"{preset}/{dtype}/packed", f"{preset}/{dtype}/op"} <= uses


@pytest.mark.parametrize("arch", triton_aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("kernel", ["_attn_fwd", "_attn_bwd"])
def test_attention_compiles_with_and_without_starts(compiles, kernel, arch):
    """Packed rows pass STARTS (an int32 pointer); plain rows pass None, which Triton makes a constexpr."""
    kinds = {r["signature"]["STARTS"] for r in compiles if r["kernel"] == kernel and r["arch"] == f"sm_{arch}"}
    assert kinds == {"*i32", "constexpr"}, f"{kernel} sm_{arch}: STARTS compiled as {sorted(kinds)}"
