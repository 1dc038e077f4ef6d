#!/usr/bin/env python3
"""The root cause of the illegal address in flashinfer's paged prefill, shown alone.

flashinfer's SM90 paged prefill (``BatchPrefillWithPagedKVCacheSM90Run``) gathers the page
indices of a request's whole last KV tile before masking the loads past the sequence, so
for the batch's last request it reads up to ``TILE_KV - 1`` page indices past
``indptr[-1]``. aiolm made its page list exactly ``indptr[-1]`` long until it padded it
(``aiolm.engine.attention.flashinfer.KV_INDICES_PAD``). This probe runs one prefill of the
engine's shape (page size 1, bf16, 32 query / 8 KV heads, head dim 128) with an index list
padded by ``--pad`` entries, each tensor its own cudaMalloc allocation. Run it under
compute-sanitizer to see the out-of-bounds reads (``--pad 0``) and their absence
(``--pad 256``)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python3 benchmarks/flashinfer_index_probe.py --pad 0

Without the sanitizer a read past the tensor faults only when the tensor ends a mapped
segment, which is why the engine crashed after some workloads and not others. It also
checks the output against a float32 reference.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    import flashinfer
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pad", type=int, default=0, help="extra page indices (slot 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dev = torch.device("cuda")
    heads, kv_heads, dim = 32, 8, 128
    # Sequence lengths that end mid-tile (the last request: 37 tokens, under one tile).
    kv_lens, qo_lens = [1000, 613, 37], [100, 613, 37]
    pool = sum(kv_lens) + 1
    k = torch.randn(pool, 1, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    v = torch.randn(pool, 1, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    perm = torch.randperm(pool - 1) + 1  # slots 1.. in a scrambled order, like a used pool
    total = sum(kv_lens)
    indices = torch.zeros(total + args.pad, dtype=torch.int32, device=dev)
    indices[:total] = perm[:total].to(torch.int32)
    indptr = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32)
    qo_indptr = torch.tensor([0, *torch.tensor(qo_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(qo_lens), heads, dim, dtype=torch.bfloat16, device=dev)

    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    wrapper.plan(qo_indptr, indptr, indices, torch.ones(len(kv_lens), dtype=torch.int32),
                 heads, kv_heads, dim, 1, causal=True, sm_scale=dim ** -0.5,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    out = wrapper.run(q, (k, v))
    torch.cuda.synchronize()

    errors = []
    for i, (n_kv, n_q) in enumerate(zip(kv_lens, qo_lens, strict=True)):
        pages = indices[indptr[i]:indptr[i + 1]].long()
        kk = k[pages, 0].float().repeat_interleave(heads // kv_heads, dim=1)
        vv = v[pages, 0].float().repeat_interleave(heads // kv_heads, dim=1)
        qi = q[qo_indptr[i]:qo_indptr[i + 1]].float()
        s = torch.einsum("thd,shd->hts", qi, kk) * dim ** -0.5
        allowed = torch.arange(n_kv, device=dev)[None, :] <= (
            torch.arange(n_q, device=dev)[:, None] + n_kv - n_q)
        ref = torch.einsum("hts,shd->thd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
        got = out[qo_indptr[i]:qo_indptr[i + 1]].float()
        errors.append(float((got - ref).norm() / ref.norm()))
    # The GPU tests' bf16 tolerance for attention against the float32 torch backend.
    worst = max(errors)
    print(f"pad={args.pad} relative error per request "
          f"{', '.join(f'{e:.2e}' for e in errors)} ({'ok' if worst < 1.6e-2 else 'HIGH'})",
          flush=True)
    return 0 if worst < 1.6e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
