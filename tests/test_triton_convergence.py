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
  first-step grads     scaled error (as in tests/op_check.py) <= 1e-5, as for single ops.
  final parameters     max |a - b| <= 1e-3 and ||a - b|| / ||b|| <= 1e-4. AdamW moves an
                       element by up to about lr (3e-3) per step whatever its gradient's size
                       (it divides by the gradient's own running RMS), so an element whose
                       gradient is ~0 and rounding-dominated may differ by a fraction of lr:
                       observed max 4.7e-5 and 8e-6 in norm after 20 steps, first-step gradients
                       6e-8 apart and losses at most 7e-7 (1.5 ulps) apart.
"""
import pytest

from mingpt import GPTConfig
from mingpt.data.tokens import TokenData
from op_check import BACKENDS
from train_check import assert_cli_runs_agree, assert_tracks_reference, run_train_cli, train_steps

DEVICE = BACKENDS["triton"].load().device
pytestmark = pytest.mark.triton


def test_triton_training_tracks_reference_step_by_step(book_data_dir):
    data = TokenData(book_data_dir)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=42, block_size=17,
                       vocab_size=data.tokenizer.vocab_size, dropout=0.0, bias=True)
    reference = train_steps("reference", data, config, steps=20, batch=2, device=DEVICE)
    triton = train_steps("triton", data, config, steps=20, batch=2, device=DEVICE)
    assert reference.losses[-1] < reference.losses[0] - 0.3, f"the reference run did not learn: {reference.losses}"
    assert_tracks_reference(triton, reference, "triton")


def test_train_cli_backend_triton_matches_reference(review_data_dir, tmp_path):
    """`python -m mingpt.train --backend triton` against `--backend reference`: a few steps of
    the tiny preset widened to head dim 21, same seed; final losses and weights agree."""
    reference = run_train_cli("reference", review_data_dir, str(tmp_path / "reference"))
    triton = run_train_cli("triton", review_data_dir, str(tmp_path / "triton"))
    assert_cli_runs_agree(triton, reference, "triton")
