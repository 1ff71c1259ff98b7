"""Muon (mingpt.optim): torch's, bit for bit, with its Newton-Schulz iterations in bfloat16 and the matrices of
one shape orthogonalised as one batch; in float32 on machines that emulate bfloat16, the same update to within
bfloat16's rounding."""
import torch

from mingpt.optim import Muon, orthogonalize


def steps(optimizer_class, shapes, n=3, **kwargs):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return params, optimizer


# wide, tall (orthogonalised transposed) and square; two and three of a shape (each shape one batch)
SHAPES = [(12, 36), (48, 12), (20, 20), (12, 36), (48, 12), (48, 12)]


def test_bf16_iterations_are_torchs_muon_bit_for_bit():
    ours, optimizer = steps(Muon, SHAPES, ns_dtype=torch.bfloat16)
    theirs, reference = steps(torch.optim.Muon, SHAPES)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # the same state: a checkpoint of either resumes the other
    assert optimizer.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    assert all(torch.equal(optimizer.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
               for a, b in zip(ours, theirs))


def test_fp32_iterations_agree_within_bf16_rounding():
    fp32, _ = steps(Muon, SHAPES, ns_dtype=torch.float32)
    bf16, _ = steps(Muon, SHAPES, ns_dtype=torch.bfloat16)
    start, _ = steps(Muon, SHAPES, n=0)
    for a, b, p0 in zip(fp32, bf16, start):
        moved = (b - p0).norm()
        assert (a - b).norm() < 0.05 * moved, "fp32 and bf16 orthogonalisation should move the weights alike"


def test_orthogonalize_flattens_the_singular_values():
    torch.manual_seed(2)
    g = torch.randn(16, 40) @ torch.diag(torch.logspace(-2, 1, 40))  # singular values over three decades
    s = torch.linalg.svdvals(orthogonalize(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32))
    assert s.min() > 0.5 and s.max() < 1.5  # Muon's iteration lands them in about (0.7, 1.2)
