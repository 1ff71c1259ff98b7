"""Dropout of every backend against the reference (F.dropout): the same law, since masks cannot match.

Each backend draws its mask from its own generator (torch's Bernoulli, a hash of (seed, index) in
C++, Philox in Triton), so outputs are compared by what dropout must satisfy rather than element
by element: every output is 0 or x / (1 - p); the backward keeps exactly the forward's elements
and scales them the same way; the drop rate is p; neighbouring elements are independent; and a
seeded torch RNG gives the same mask again. The statistical bounds are 6 standard deviations of
a binomial share, a false failure about once in 5e8 runs.
"""
import math

import pytest
import torch

from mingpt import ops


ON_GPU = torch.cuda.is_available()
# The Triton kernels run on the GPU where there is one, else in the interpreter on the CPU.
DEVICES = {"reference": "cpu", "cpp": "cpu", "triton": "cuda" if ON_GPU else "cpu"}


def backend_ops(name):
    try:
        return ops.get_ops(name, DEVICES[name])
    except ops.BackendUnavailable as e:
        pytest.skip(str(e))


BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
DTYPES = {"reference": [torch.float32, torch.bfloat16], "cpp": [torch.float32, torch.bfloat16],
          "triton": [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])}
CASES = [pytest.param(b, d, id=f"{b}-{str(d).replace('torch.', '')}", marks=pytest.mark.triton if b == "triton" else ())
         for b in DEVICES for d in DTYPES[b]]


def nonzero_input(*shape, dtype=torch.float32, device="cpu"):
    x = torch.randn(shape)
    return (x + x.sign() * 0.5).to(device, dtype)  # |x| >= 0.5: a zero output can only mean dropped


def six_sigma(p, n):
    return 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", [(7,), (3, 17, 252), (2, 64, 1008)], ids=["7", "3x17x252", "2x64x1008"])
def test_kept_values_are_scaled_and_gradients_follow_the_mask(backend, dtype, shape):
    dropout = backend_ops(backend).dropout
    p = 0.3
    x = nonzero_input(*shape, dtype=dtype, device=DEVICES[backend]).requires_grad_()
    y = dropout(x, p, True)
    kept = y != 0
    assert y.dtype == dtype and y.shape == x.shape
    expected = torch.where(kept, x.detach().float() / (1 - p), 0.0)
    # one rounding of x / (1 - p) to dtype; torch's own bf16 multiply rounds the scale as well
    tol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert torch.allclose(y.float(), expected, rtol=tol, atol=0)
    grad = torch.randn(shape).to(x.device, dtype)
    y.backward(grad)
    expected_grad = torch.where(kept, grad.float() / (1 - p), 0.0)
    assert torch.allclose(x.grad.float(), expected_grad, rtol=tol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_rate_and_independence(backend):
    dropout = backend_ops(backend).dropout
    n = 1 << 18 if backend != "triton" or ON_GPU else 1 << 16
    ones = torch.ones(n, device=DEVICES[backend])
    for p in (0.1, 0.5):
        dropped = dropout(ones, p, True) == 0
        assert abs(dropped.float().mean().item() - p) < six_sigma(p, n), p
        both = (dropped[:-1] & dropped[1:]).float().mean().item()
        assert abs(both - p * p) < six_sigma(p * p, n - 1), f"neighbours dropped together: {both} vs {p * p}"
        again = dropout(ones, p, True) == 0
        same = (dropped == again).float().mean().item()
        want = p * p + (1 - p) ** 2  # two independent masks agree this often
        assert abs(same - want) < six_sigma(want, n), f"two calls share their mask ({same} vs {want})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_torch_rng_repeats_the_mask(backend):
    dropout = backend_ops(backend).dropout
    x = nonzero_input(4, 100, device=DEVICES[backend])
    torch.manual_seed(7)
    first = dropout(x, 0.2, True)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2, True), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_when_not_training_or_p_zero(backend):
    dropout = backend_ops(backend).dropout
    x = nonzero_input(3, 5, device=DEVICES[backend])
    assert torch.equal(dropout(x, 0.5, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_rate_outside_unit_interval_is_refused(backend, p):
    dropout = backend_ops(backend).dropout
    with pytest.raises(ValueError, match="p must be in"):
        dropout(torch.ones(4, device=DEVICES[backend]), p, True)


def test_cpp_kernel_checks_its_inputs():
    backend_ops("cpp")
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.mingpt.dropout(torch.ones(3), 1.0, torch.tensor(0))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.mingpt.dropout(torch.ones(3, dtype=torch.float64), 0.1, torch.tensor(0))
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        torch.ops.mingpt.dropout(torch.ones(3), 0.1, torch.tensor(0.5))


def test_cpp_mask_does_not_depend_on_thread_count():
    backend_ops("cpp")
    x = nonzero_input(1 << 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.mingpt.dropout(x, 0.25, torch.tensor(12345))
        torch.set_num_threads(max(2, threads))
        assert torch.equal(torch.ops.mingpt.dropout(x, 0.25, torch.tensor(12345)), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_non_contiguous_input(backend):
    x = nonzero_input(17, 40, device=DEVICES[backend]).t()
    y = backend_ops(backend).dropout(x, 0.5, True)
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()
    assert torch.allclose(y[kept], x[kept] * 2.0)
