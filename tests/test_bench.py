"""The bench's accounting: the matrix products it times as a step's are the work the step's MFU counts."""
import pytest
import torch

from bench import bench_model, step_matmul_shapes


@pytest.mark.parametrize("preset", ["tiny", "demo", "speedrun", "seed"])
def test_step_matmuls_are_the_flops_the_model_counts_per_token(preset):
    model = bench_model(preset, vocab_size=4649, device=torch.device("cpu"))
    shapes = step_matmul_shapes(model, batch_size=32)
    tokens = 32 * model.config.block_size
    flops = sum(2 * b * m * k * n for b, m, k, n in shapes)
    # flops_per_token's 6N also counts the norms' gains and the biases as if they were multiplied: under 1 %
    assert flops == pytest.approx(model.flops_per_token() * tokens, rel=0.01)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(shapes) == 3 * linears + 6 * model.config.n_layer
