"""The fused MoE path on a GPU: its Triton kernels against the plain torch code, and the
MoE models through the engine on CUDA against the CPU.

Kernels: every case runs the fused path and the torch expert loop
(:func:`~aiolm.engine.layers.fused_moe.torch_experts`) on the same CUDA inputs, over expert
counts 4/8/64, top-k 1/2/8, 1 to 512 tokens, routing restricted to a few experts (the others
empty) or skewed towards one. float32 agrees to summation order; bfloat16 within a few
ulps of the output's scale (the kernel rounds gate/up and each expert's output once, as
the loop does, but sums in another order). A CUDA graph of the fused path replays with
new routing (no host sync inside).

Engine: tiny Mixtral / Qwen3-MoE models with large random weights (clear logit margins)
give the CPU's greedy tokens on CUDA (float32, CUDA graphs on); a divergence is accepted
only where the CPU's top two tokens nearly tie (``MARGIN`` nats).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
anyio = pytest.importorskip("anyio")

from test_gpu_engine import assert_same_greedy  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
MARGIN = 1e-3
NEW_TOKENS = 16

# (tokens, experts, top_k, routing): "all" any expert, "few" a third of them (the rest
# empty), "skewed" half of all choices on expert 0.
CASES = [
    (1, 8, 2, "all"), (1, 64, 8, "all"), (3, 4, 1, "few"), (7, 8, 2, "few"),
    (16, 64, 8, "skewed"), (33, 8, 2, "skewed"), (64, 4, 2, "all"), (100, 64, 8, "few"),
    (257, 8, 1, "skewed"), (333, 64, 8, "all"), (512, 8, 2, "all"), (512, 64, 8, "skewed"),
]


def routing(tokens, num_experts, top_k, kind, seed):
    from aiolm.engine.layers.fused_moe import torch_route

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    if kind == "few":
        allowed = torch.randperm(num_experts, generator=gen)[:max(top_k, num_experts // 3)]
        mask = torch.full((num_experts,), float("-inf"))
        mask[allowed] = 0.0
        logits = logits + mask
    elif kind == "skewed":
        logits[: tokens // 2, 0] += 20.0
    weights, ids = torch_route(logits, top_k, renormalize=True)
    return weights.to(DEVICE), ids.to(DEVICE)


def experts(num_experts, hidden, inter, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5)
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "kind"), CASES,
                         ids=lambda v: str(v))
def test_fused_experts_match_the_torch_loop(dtype, tokens, num_experts, top_k, kind):
    from aiolm.engine.layers.fused_moe import fused_experts, torch_experts

    hidden, inter = (512, 384) if num_experts <= 8 else (256, 128)
    w13, w2 = experts(num_experts, hidden, inter, dtype, seed=tokens)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    weights, ids = routing(tokens, num_experts, top_k, kind, seed=tokens)
    out = fused_experts(x, w13, w2, weights, ids)
    ref = torch_experts(x, w13, w2, weights, ids)
    torch.cuda.synchronize()
    assert out.dtype == dtype and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(("tokens", "num_experts", "top_k", "renormalize"), [
    (1, 8, 2, True), (300, 8, 2, True), (77, 128, 8, True), (64, 64, 6, False),
])
def test_route_kernel_matches_torch(tokens, num_experts, top_k, renormalize):
    from aiolm.engine.layers.fused_moe import route, torch_route

    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(tokens))
    weights, ids = route(logits.to(DEVICE, torch.bfloat16), top_k, renormalize)
    ref_weights, ref_ids = torch_route(logits.to(torch.bfloat16), top_k, renormalize)
    # bfloat16 logits tie often (128 experts): tied experts may come in either order, or
    # either of two tied experts may be the k-th. The chosen logits must be the same.
    rounded = logits.to(torch.bfloat16)
    got = rounded.gather(1, ids.long().cpu()).sort(dim=1, descending=True).values
    want = rounded.gather(1, ref_ids).sort(dim=1, descending=True).values
    assert torch.equal(got, want)
    torch.testing.assert_close(weights.cpu().sort(dim=1).values,
                               ref_weights.sort(dim=1).values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_m", [16, 64])
def test_alignment_covers_every_assignment_once(block_m):
    from aiolm.engine.layers.fused_moe import align_by_expert

    _w, ids = routing(200, 64, 8, "few", seed=3)
    sorted_ids, expert_ids, num_padded = align_by_expert(ids, 64, block_m)
    n = ids.numel()
    used = sorted_ids[: int(num_padded.item())].cpu()
    assert sorted(used[used < n].tolist()) == list(range(n))
    flat = ids.reshape(-1).cpu()
    for block in range(int(num_padded.item()) // block_m):
        rows = used[block * block_m:(block + 1) * block_m]
        rows = rows[rows < n].long()
        assert len(rows) and (flat[rows] == int(expert_ids[block])).all()


@pytest.mark.parametrize("tokens", [1, 4])  # 1: the one-token layout (decode at batch 1)
def test_fused_experts_replay_in_a_cuda_graph_with_new_routing(tokens):
    from aiolm.engine.layers.fused_moe import fused_experts, torch_experts

    w13, w2 = experts(8, 512, 384, torch.bfloat16, seed=0)
    x = torch.randn(tokens, 512, device=DEVICE, dtype=torch.bfloat16)
    weights, ids = routing(tokens, 8, 2, "all", seed=1)
    fused_experts(x, w13, w2, weights, ids)  # compile the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for seed in (5, 6):
        new_weights, new_ids = routing(tokens, 8, 2, "few", seed=seed)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        x.copy_(torch.randn(tokens, 512, device=DEVICE, dtype=torch.bfloat16))
        graph.replay()
        ref = torch_experts(x, w13, w2, weights, ids)
        torch.cuda.synchronize()
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


# ------------------------------------------------------------------------------ engine


def _load(directory, device):
    from aiolm.backends.engine import LoadedModel
    from aiolm.engine.loader import load_model

    model, config = load_model(directory, dtype="float32", device=device)
    return LoadedModel(model=model, model_config=config, tokenizer=None,
                       device=torch.device(device), source=str(directory), load_format="auto")


def _generate(loaded, prompts, **options):
    from aiolm.backends.engine import Engine

    async def main():
        results = [None] * len(prompts)
        async with Engine(loaded, max_total_tokens=4096, **options) as engine:
            async def one(i):
                results[i] = await engine.generate(
                    input_ids=prompts[i], max_tokens=NEW_TOKENS, ignore_eos=True,
                    temperature=0.0, logprobs=True, top_logprobs=5)

            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
        return results

    return anyio.run(main)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "qwen3-moe-dense-layers"])
def test_moe_models_on_cuda_give_the_cpu_greedy_tokens(family, tmp_path):
    from test_moe import FAMILIES, _hf_model

    hf = _hf_model(FAMILIES[family], seed=4321)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    gen = torch.Generator().manual_seed(0)
    vocab = FAMILIES[family]["vocab_size"]
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 20, 57, 140)]
    cpu = _generate(_load(tmp_path, "cpu"), prompts, device="cpu")
    cuda = _generate(_load(tmp_path, DEVICE), prompts, device=DEVICE, cuda_graphs=True)
    assert_same_greedy(cpu, cuda, MARGIN, new_tokens=NEW_TOKENS, min_compared=2 * NEW_TOKENS)
