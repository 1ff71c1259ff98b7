"""Training with the Triton kernels follows training with the reference ops, step by step.

Same seed, same batches, same optimizer: a tiny GPT (2 layers, 2 heads of the odd head dim 21,
block 17) trains 20 AdamW steps on batches of 2 once on backend "triton" (every op of the table from
mingpt.kernels) and once on "reference". Then the train CLI runs a few steps with
`--backend triton` and with `--backend reference` on prepared review rows (whose padding
targets are -1, so the fused cross entropy's ignore_index is on the path too).

Tolerances, and why:
  loss at every step   |a - b| <= 5e-5. The losses are ~3.5-4, where one fp32 ulp is 2.4e-7 to
                       4.8e-7; observed differences are at most 7e-7 at any step. 5e-5
                       (~100 ulps) leaves room for a GPU's reduction orders while a wrong
                       gradient anywhere drives the curves apart by 1e-3 or more within steps.
  first-step grads     scaled error (as in test_triton_kernels) <= 1e-5, as for single ops.
  final parameters     max |a - b| <= 1e-3 and ||a - b|| / ||b|| <= 1e-4. AdamW moves an
                       element by up to about lr (3e-3) per step whatever its gradient's size
                       (it divides by the gradient's own running RMS), so an element whose
                       gradient is ~0 and rounding-dominated may differ by a fraction of lr:
                       observed max 4.7e-5 and 8e-6 in norm after 20 steps, first-step gradients
                       6e-8 apart and losses at most 7e-7 (1.5 ulps) apart.
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the kernels cannot run here",
                allow_module_level=True)

from mingpt import GPT, GPTConfig  # noqa: E402
from mingpt.checkpoint import load_checkpoint  # noqa: E402
from mingpt.data import TokenData  # noqa: E402
from mingpt import train as train_cli  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 20
BATCH = 2
LOSS_TOL = 5e-5
PARAM_MAX_TOL = 1e-3
PARAM_NORM_TOL = 1e-4


def _train(backend: str, data: TokenData, config: GPTConfig):
    torch.manual_seed(1234)
    model = GPT(config, backend=backend).to(DEVICE)
    assert set(model.ops.sources.values()) == {backend}
    optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(5678)
    losses, first_grads = [], None
    for step in range(STEPS):
        x, y = data.get_batch("train", BATCH, config.block_size, generator)
        _, loss = model(x.to(DEVICE), y.to(DEVICE))
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, first_grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_triton_training_tracks_reference_step_by_step(book_data_dir):
    data = TokenData(book_data_dir)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=42, block_size=17,
                       vocab_size=data.tokenizer.vocab_size, dropout=0.0, bias=True)
    ref_losses, ref_grads, ref_params = _train("reference", data, config)
    tri_losses, tri_grads, tri_params = _train("triton", data, config)

    assert ref_losses[-1] < ref_losses[0] - 0.3, f"the reference run did not learn: {ref_losses}"
    for step, (a, b) in enumerate(zip(tri_losses, ref_losses)):
        assert abs(a - b) <= LOSS_TOL, f"step {step}: triton loss {a:.7f} vs reference {b:.7f}"
    for name, g in ref_grads.items():
        e = ((tri_grads[name] - g).abs().max() / g.abs().max().clamp_min(1.0)).item()
        assert e <= 1e-5, f"first-step gradient of {name}: scaled error {e:.2e}"
    diff = torch.cat([(tri_params[n] - p).flatten() for n, p in ref_params.items()])
    norm = torch.cat([p.flatten() for p in ref_params.values()]).norm()
    assert diff.abs().max() <= PARAM_MAX_TOL, f"final parameters differ by up to {diff.abs().max():.2e}"
    assert diff.norm() / norm <= PARAM_NORM_TOL, f"final parameters differ by {diff.norm() / norm:.2e} in norm"


def test_train_cli_backend_triton_matches_reference(review_data_dir, tmp_path):
    """`python -m mingpt.train --backend triton` against `--backend reference`: a few steps of
    the tiny preset widened to head dim 21, same seed; final losses and weights agree."""
    results = {}
    for backend in ("reference", "triton"):
        out_dir = str(tmp_path / backend)
        argv = ["--preset", "tiny", "--data_dir", review_data_dir, "--out_dir", out_dir,
                "--backend", backend, "--max_iters", "4", "--eval_iters", "1", "--batch_size", "2",
                "--n_embd", "42", "--n_head", "2", "--progress", "false", "--warmup_iters", "2"]
        assert train_cli.main(argv) == 0
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        with open(os.path.join(out_dir, "metrics.csv"), encoding="utf-8") as f:
            results[backend] = (f.read().splitlines()[-1].split(","), ckpt["model"])
    (ref_row, ref_state), (tri_row, tri_state) = results["reference"], results["triton"]
    # iter, train_loss, val_loss as written (4 decimals): equal or one unit apart in the last digit
    assert ref_row[0] == tri_row[0]
    for i in (1, 2):
        assert abs(float(ref_row[i]) - float(tri_row[i])) <= 1.5e-4, (ref_row, tri_row)
    for name, p in ref_state.items():
        assert (tri_state[name] - p).abs().max() <= PARAM_MAX_TOL, name
