"""Triton kernels for the training hot path (installed as mingpt.kernels).

One file per op, each holding its kernels, its torch.autograd.Function and a launcher whose
signature matches the reference op in mingpt.ops:

  layer_norm        layer_norm(x, weight, bias, eps=1e-5); add_layer_norm fuses the residual add
  bias_gelu         bias_gelu(x, bias): bias add + tanh GELU
  causal_attention  causal_attention(qkv, n_head, starts=None): flash-style, reads q/k/v from the fused qkv;
                    starts (B, T) keeps each query within its own review of a packed row
  cross_entropy     cross_entropy(logits, targets): fused softmax + NLL, ignore_index -1

The kernels run on CUDA tensors; on a CPU only in Triton's interpreter (TRITON_INTERPRET=1 set
before triton is imported), which checks correctness and is never a speed path.

Importing this package imports nothing: the op table lives in mingpt.kernels.op_table, so tools
that probe for an unrelated top-level package named `kernels` (transformers does) never load triton.
"""
