"""Packed rows: several whole reviews to a training row, so that the model computes on reviews, not padding.

The review layout stores each review as its own row padded to block_size+1 tokens; for short reviews
most of such a row is padding. A `ReviewPacker` fills each row of a batch with whole stored rows
(best fit: each review goes where it leaves the smallest gap), and `load_packed` gives the model
inputs, targets and `starts`: where the review of each position begins. Positions restart there and
attention never crosses it (GPT.forward), and a review's end token predicts nothing.

A review drawn for a batch that fits no row waits, and is placed first in the next batch, so packing
keeps the sampled mix of reviews (long ones included). The waiting reviews are the packer's state,
saved in checkpoints so that a resumed run draws what the straight run drew.
"""
import collections

import numpy as np
import torch


class ReviewPacker:
    """Plans batches of packed rows from the rows of a review-layout split."""

    def __init__(self, rows: np.ndarray, pad_id: int):
        self.row_len = rows.shape[1]
        self.lengths = (np.asarray(rows) != pad_id).sum(axis=1).tolist()  # padding only ever ends a row
        self.waiting = []

    def plan(self, batch_size: int, draw) -> list:
        """Row indices for each of batch_size packed rows. `draw(n)` returns n freshly sampled row indices;
        the packer draws until the rows are full (no gap a review fits, or batch_size reviews in a row that
        fit nowhere) and keeps the reviews it drew but could not place for the next batch."""
        free = [self.row_len] * batch_size
        packed = [[] for _ in range(batch_size)]
        queue = collections.deque(self.waiting)
        misfits = []
        shortest = min(self.lengths)
        while len(misfits) < batch_size and max(free) >= shortest:
            if not queue:
                queue.extend(draw(batch_size).tolist())
            review = queue.popleft()
            length = self.lengths[review]
            fits = [row for row in range(batch_size) if free[row] >= length]
            if not fits:
                misfits.append(review)
                continue
            row = min(fits, key=free.__getitem__)
            packed[row].append(review)
            free[row] -= length
        self.waiting = misfits + list(queue)
        return packed


def load_packed(rows: np.ndarray, plan: list, pad_id: int):
    """Inputs x, targets y (-1 where there is nothing to predict) and starts, each (B, row_len-1), for the
    packed rows of `plan`. The padding after the last review of a row is a segment of its own."""
    row_len = rows.shape[1]
    buffer = np.full((len(plan), row_len), pad_id, dtype=np.int64)
    targets = np.full((len(plan), row_len), -1, dtype=np.int64)
    starts = np.zeros((len(plan), row_len), dtype=np.int64)
    for b, reviews in enumerate(plan):
        offset = 0
        for review in reviews:
            tokens = rows[review]
            length = int((tokens != pad_id).sum())
            buffer[b, offset:offset + length] = tokens[:length]
            targets[b, offset:offset + length - 1] = tokens[1:length]
            starts[b, offset:offset + length] = offset
            offset += length
        starts[b, offset:] = offset
    x = torch.from_numpy(buffer[:, :-1])
    y = torch.from_numpy(targets[:, :-1])
    return x, y, torch.from_numpy(starts[:, :-1])
