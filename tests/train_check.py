"""Training on a fused backend against the same training on `reference`, and the checks between them.

Both step-by-step convergence tests (tests/test_cpp_convergence.py, tests/test_triton_convergence.py)
hold their runs to these bounds; their docstrings say why, with what each run observes.
"""
import os
from dataclasses import dataclass

import torch

from mingpt import GPT, GPTConfig, ops
from mingpt.train import __main__ as train_cli
from mingpt.checkpoint import load_checkpoint
from mingpt.data.tokens import TokenData

LOSS_TOL = 5e-5
FIRST_GRAD_TOL = 1e-5
PARAM_MAX_TOL = 1e-3
PARAM_NORM_TOL = 1e-4


@dataclass
class TrainRun:
    losses: list
    first_grads: dict  # parameter name -> its gradient at the first step
    params: dict  # parameter name -> its value after the last step


def train_steps(backend: str, data: TokenData, config: GPTConfig, steps: int, batch: int, device="cpu") -> TrainRun:
    """`steps` AdamW steps of a fresh model on `backend`; the seeds are fixed, so every backend sees
    the same initial weights and batches."""
    torch.manual_seed(1234)
    model = GPT(config, backend=backend).to(device)
    assert {model.ops.sources[op] for op in ops.OP_NAMES} == {backend}
    [optimizer] = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(5678)
    losses, first_grads = [], None
    for step in range(steps):
        x, y = data.get_batch("train", batch, config.block_size, generator)
        _, loss = model(x.to(device), y.to(device))
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return TrainRun(losses, first_grads, {n: p.detach().clone() for n, p in model.named_parameters()})


def assert_tracks_reference(run: TrainRun, reference: TrainRun, backend: str):
    """The loss at every step, the first step's gradients and the final parameters agree."""
    for step, (a, b) in enumerate(zip(run.losses, reference.losses)):
        assert abs(a - b) <= LOSS_TOL, f"step {step}: {backend} loss {a:.7f} vs reference {b:.7f}"
    for name, g in reference.first_grads.items():
        e = ((run.first_grads[name] - g).abs().max() / g.abs().max().clamp_min(1.0)).item()
        assert e <= FIRST_GRAD_TOL, f"first-step gradient of {name}: scaled error {e:.2e}"
    diff = torch.cat([(run.params[n] - p).flatten() for n, p in reference.params.items()])
    norm = torch.cat([p.flatten() for p in reference.params.values()]).norm()
    assert diff.abs().max() <= PARAM_MAX_TOL, f"final parameters differ by up to {diff.abs().max():.2e}"
    assert diff.norm() / norm <= PARAM_NORM_TOL, f"final parameters differ by {diff.norm() / norm:.2e} in norm"


def run_train_cli(backend: str, data_dir: str, out_dir: str):
    """A few steps of the tiny preset widened to head dim 21 through the train CLI; returns the last
    metrics row (iter, train_loss, val_loss, ...) and the checkpoint's weights."""
    argv = ["--preset", "tiny", "--data_dir", data_dir, "--out_dir", out_dir, "--backend", backend,
            "--max_iters", "4", "--eval_iters", "1", "--batch_size", "2", "--n_embd", "42", "--n_head", "2",
            "--progress", "false", "--warmup_iters", "2"]
    assert train_cli.main(argv) == 0
    with open(os.path.join(out_dir, "metrics.csv"), encoding="utf-8") as f:
        row = f.read().splitlines()[-1].split(",")
    return row, load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]


def assert_cli_runs_agree(run, reference, backend: str):
    """Two run_train_cli results: the same last iteration, losses as written (4 decimals) equal or one
    unit apart in the last digit, and weights within PARAM_MAX_TOL."""
    (row, state), (ref_row, ref_state) = run, reference
    assert row[0] == ref_row[0]
    for i in (1, 2):
        assert abs(float(row[i]) - float(ref_row[i])) <= 1.5e-4, (backend, row, ref_row)
    for name, p in ref_state.items():
        assert (state[name] - p).abs().max() <= PARAM_MAX_TOL, (backend, name)
