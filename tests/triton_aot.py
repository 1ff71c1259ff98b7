"""Ahead-of-time compiles of the Triton kernels with Triton's real compiler, no GPU needed.

The launches come from the code itself: the `tiny`, `demo` and `seed` models take a training step
(forward and backward; float32, and bfloat16 and float16 autocast) with the triton op table, on plain
rows and on packed rows (`starts`: several reviews a row, the attention kernels' HAS_STARTS variants),
and every op is also called alone with float32, float16 and bfloat16 inputs of the presets' shapes
(attention with and without starts). Each
launch is recorded instead of run (the launchers' LaunchConfig.launch), turned into the signature,
constexprs, attributes and options Triton's JIT would build from those arguments, deduplicated, and
compiled for sm_80 and sm_90. ptxas's verbose report of the PTX gives registers and spills.

Must run in a process where TRITON_INTERPRET is unset (the kernels are then real JIT functions):
`python tests/triton_aot.py` prints one JSON object per compile, `--table` a readable table.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

ARCHS = (80, 90)
# Largest shared memory one block may use (the opt-in maximum), CUDA C Programming Guide, table 21.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PRESET_VOCAB = {"tiny": 64, "demo": 4620, "seed": 2212}  # the vocabularies docs/usage.md quotes; tiny: the tests'
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BATCH = 2


def record_launches(run) -> list:
    """[(kernel, args, constexprs, LaunchConfig)] of every launch `run()` makes; nothing is launched."""
    from mingpt.kernels import _common
    launches = []

    def record(config, kernel, grid, *args, **constexprs):
        launches.append((kernel, args, constexprs, config))

    with _patched(_common.LaunchConfig, "launch", record), _patched(_common, "interpreted", lambda: True):
        run()
    return launches


@contextlib.contextmanager
def _patched(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def packed_starts(T: int) -> torch.Tensor:
    """(BATCH, T) starts of rows packing reviews of 1 to T // 3 + 1 tokens (the launches depend only on
    starts being given, not on its values)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(BATCH):
        row, begin = [], 0
        while begin < T:
            n = int(torch.randint(1, T // 3 + 2, (1,), generator=generator))
            row += [begin] * min(n, T - begin)
            begin += n
        rows.append(row)
    return torch.tensor(rows)


def model_step(preset: str, dtype: str, packed: bool = False):
    """One forward and backward of the preset's model on the triton op table (on the CPU, kernels recorded);
    packed: on rows packing several reviews (starts)."""
    from mingpt.config import preset_config
    from mingpt.kernels.op_table import OPS
    from mingpt.model import GPT
    from mingpt.ops import Ops
    cfg = preset_config(preset).model
    cfg.vocab_size = PRESET_VOCAB[preset]
    model = GPT(cfg, backend="reference").train()
    model._ops = Ops.build("triton", {"triton": OPS})
    idx = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size))
    autocast = (contextlib.nullcontext() if dtype == "float32"
                else torch.autocast(device_type="cpu", dtype=DTYPES[dtype]))
    with autocast:
        _, loss = model(idx, idx, starts=packed_starts(cfg.block_size) if packed else None)
    loss.backward()


def packed_model_step(preset: str, dtype: str):
    model_step(preset, dtype, packed=True)


def op_calls(preset: str, dtype: str):
    """Every op called alone, forward and backward, with inputs of the preset's shapes in `dtype`."""
    from mingpt.config import preset_config
    from mingpt.kernels.op_table import OPS
    cfg = preset_config(preset).model
    C, T, V, dt = cfg.n_embd, cfg.block_size, PRESET_VOCAB[preset], DTYPES[dtype]

    def leaf(*shape):
        return torch.randn(*shape, dtype=dt).requires_grad_()

    outputs = [OPS["layer_norm"](leaf(BATCH, T, C), leaf(C), leaf(C)),
               OPS["bias_gelu"](leaf(BATCH, T, 4 * C), leaf(4 * C)),
               OPS["causal_attention"](leaf(BATCH, T, 3 * C), cfg.n_head),
               OPS["causal_attention"](leaf(BATCH, T, 3 * C), cfg.n_head, packed_starts(T)),
               OPS["cross_entropy"](leaf(BATCH, T, V), torch.randint(0, V, (BATCH, T))),
               OPS["dropout"](leaf(BATCH, T, C), 0.1, True)]
    rotary_heads = cfg.n_head if C // cfg.n_head % 2 == 0 else cfg.n_head // 2  # rotary turns pairs of channels
    angles = torch.rand(1, T, C // rotary_heads // 2) * 6.0
    outputs.append(OPS["rotary"](leaf(BATCH, T, 3 * C), angles.cos(), angles.sin(), rotary_heads))
    for out in outputs:
        out.float().sum().backward()


def jit_source(kernel, args, constexprs, config, arch: int):
    """The ASTSource and options Triton's JIT builds for this launch on `arch` (as JITFunction.run does)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(constexprs, **config.blocks, num_warps=config.num_warps, num_stages=config.num_stages,
                  debug=False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, consts, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, consts, attrs), options


def compile_jobs() -> list:
    """Unique (kernel, signature, constexprs, options) launches of every preset, dtype and op, as dicts."""
    jobs = {}
    for preset in PRESET_VOCAB:
        for dtype in DTYPES:
            for source, run in (("model", model_step), ("packed", packed_model_step), ("op", op_calls)):
                for kernel, args, constexprs, config in record_launches(lambda: run(preset, dtype)):
                    src, options = jit_source(kernel, args, constexprs, config, ARCHS[0])
                    key = (kernel.__name__, repr(sorted(src.signature.items())), repr(sorted(src.constants.items())),
                           repr(sorted(src.attrs.items())), config.num_warps, config.num_stages)
                    job = jobs.setdefault(key, dict(kernel=kernel, args=args, constexprs=constexprs, config=config,
                                                    uses=set()))
                    job["uses"].add(f"{preset}/{dtype}/{source}")
    return list(jobs.values())


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and static shared memory from ptxas -v, run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                                 f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", path + ".o"],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    used = re.search(r"Used (\d+) registers", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return {"registers": int(used.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "static_shared": int(smem.group(1)) if smem else 0}


def compile_job(job: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    src, options = jit_source(job["kernel"], job["args"], job["constexprs"], job["config"], arch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    report = ptxas_report(compiled.asm["ptx"], arch)
    return dict(kernel=job["kernel"].__name__, arch=f"sm_{arch}", signature=dict(src.signature),
                blocks=job["config"].blocks, num_warps=job["config"].num_warps,
                num_stages=job["config"].num_stages, uses=sorted(job["uses"]),
                dynamic_shared=compiled.metadata.shared, shared_limit=SHARED_LIMIT[arch], **report)


def print_table(results: list):
    print("| kernel | arch | blocks | warps | dtypes | registers | shared bytes | spills |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: (r["kernel"], r["arch"], repr(r["blocks"]))):
        dtypes = sorted({t.lstrip("*") for t in r["signature"].values() if t.startswith("*") and "i64" not in t})
        print(f"| {r['kernel']} | {r['arch']} | {r['blocks']} | {r['num_warps']} | {'/'.join(dtypes)} | "
              f"{r['registers']} | {r['dynamic_shared'] + r['static_shared']} | "
              f"{r['spill_stores']}/{r['spill_loads']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="a Markdown table instead of JSON lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_aot: TRITON_INTERPRET=1 is set; the real compiler needs it unset")
    results = [compile_job(job, arch) for job in compile_jobs() for arch in ARCHS]
    if args.table:
        print_table(results)
    else:
        for result in results:
            print(json.dumps(result))


if __name__ == "__main__":
    main()
