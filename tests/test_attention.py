"""Attention capture: exact probabilities at every grid, unchanged images, processors restored,
for SD 1.x and 2.x layouts."""

import gc

import numpy as np
import pytest
import torch

from syntagen_st.core.errors import UserError
from syntagen_st.generation.attention import capture_attention, layer_grid, plan_layers
from syntagen_st.generation.tiny import build_tiny_pipeline

MULTIRES = ([8, 4, 2], [2, 1])
"""The published setting's factors (cross 8/16/32 px and self 32/64 px grids at 512 px); at the
tests' 64 px (an 8x8 latent) these are cross grids 1x1, 2x2, 4x4 and self grids 4x4, 8x8."""


@pytest.fixture(scope="module")
def sd2_pipe():
    return build_tiny_pipeline("tiny-sd2")


@pytest.fixture(params=["sd1", "sd2"])
def pipe(request, tiny_generator, sd2_pipe):
    return tiny_generator.pipe if request.param == "sd1" else sd2_pipe


def _means(store):
    """Each grid's mean attention over the batch, (B, ...) per grid."""
    per_sample = [store.sample_means(i) for i in range(store.batch_size)]
    return tuple([torch.stack(maps) for maps in zip(*(sample[kind] for sample in per_sample))] for kind in (0, 1))


def _unet_inputs(pipe, batch=2):
    torch.manual_seed(0)
    latents = torch.randn(2 * batch, 4, 8, 8)  # [uncond, cond] halves, as with guidance
    context = torch.randn(2 * batch, 77, pipe.unet.config.cross_attention_dim)
    return latents, context


def test_layer_grid_follows_the_unet_levels():
    assert layer_grid("down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor", 4, (64, 64)) == (16, 16)
    assert layer_grid("up_blocks.1.attentions.2.transformer_blocks.0.attn2.processor", 4, (64, 64)) == (16, 16)
    assert layer_grid("up_blocks.2.attentions.0.transformer_blocks.0.attn1.processor", 4, (64, 64)) == (32, 32)
    assert layer_grid("mid_block.attentions.0.transformer_blocks.0.attn1.processor", 4, (64, 64)) == (8, 8)


def test_plan_records_only_the_needed_layers(tiny_generator):
    plan = plan_layers(tiny_generator.pipe.unet, (8, 8), [4], [2])
    assert sorted(k.split(".attentions")[0] for k, v in plan.items() if v == ("cross", (2, 2))) == [
        "down_blocks.2", "up_blocks.1", "up_blocks.1"]
    assert sorted(k.split(".attentions")[0] for k, v in plan.items() if v == ("self", (4, 4))) == [
        "down_blocks.1", "up_blocks.2", "up_blocks.2"]
    assert len(plan) < len(tiny_generator.pipe.unet.attn_processors)


@pytest.mark.parametrize("factors", [([4], [2]), MULTIRES], ids=["default", "multires"])
def test_captured_attention_equals_independent_probabilities(pipe, factors):
    """Recompute each recorded layer's softmax(q k^T / sqrt(d)) from hooked inputs with
    diffusers' own unfused path (get_attention_scores) and compare with each grid's running mean."""
    unet = pipe.unet
    plan = plan_layers(unet, (8, 8), *factors)
    inputs: dict[str, tuple] = {}
    hooks = []
    for name in plan:
        module = unet.get_submodule(name.removesuffix(".processor"))
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: inputs.__setitem__(
                name, (mod, args[0], kwargs.get("encoder_hidden_states"))),
            with_kwargs=True,
        ))
    latents, context = _unet_inputs(pipe)
    try:
        with capture_attention(unet, 2, (8, 8), *factors, 77) as store:
            store.begin(2)
            with torch.no_grad():
                unet(latents, 10, encoder_hidden_states=context)
            cross, self_attn = _means(store)
    finally:
        for h in hooks:
            h.remove()

    def reference(key):
        maps = []
        for name, (attn, hidden, ctx) in inputs.items():
            if plan[name] != key:
                continue
            hidden = hidden[2:]
            ctx = hidden if key[0] == "self" else ctx[2:]
            q = attn.head_to_batch_dim(attn.to_q(hidden))
            k = attn.head_to_batch_dim(attn.to_k(ctx))
            probs = attn.get_attention_scores(q, k)  # (B*heads, N, M)
            maps.append(probs.view(2, attn.heads, *probs.shape[1:]).mean(1))
        return torch.stack(maps).mean(0)

    recorded = dict(zip([("cross", hw) for hw in store.cross_grids] + [("self", hw) for hw in store.self_grids],
                        cross + self_attn, strict=True))
    assert len(recorded) == len(factors[0]) + len(factors[1])
    with torch.no_grad():
        for key, mean in recorded.items():
            assert torch.allclose(mean, reference(key), atol=1e-6), key
    assert torch.allclose(cross[-1].sum(-1), torch.ones(cross[-1].shape[:2]), atol=1e-5)


def test_capture_does_not_change_the_image(tiny_generator):
    pipe = tiny_generator.pipe

    def run():
        g = [torch.Generator().manual_seed(7)]
        return pipe("a photo of a horse; horse", height=64, width=64, num_inference_steps=3, generator=g,
                    output_type="np").images

    plain = run()
    with capture_attention(pipe.unet, 1, (8, 8), [4], [2], 77) as store:
        store.begin(1)
        captured = run()
        assert store.calls["cross", (2, 2)] == 3 * 3  # three layers, three steps
    assert np.array_equal(plain, captured)


def test_processors_restored_after_exit_and_on_error(tiny_generator):
    unet = tiny_generator.pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with capture_attention(unet, 1, (8, 8), [4], [2], 77):
            assert any(type(p).__name__ == "RecordingProcessor" for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach. The CPU allocator keeps no statistics and
    tracemalloc does not see tensor storage (it is malloc'd outside Python's allocator)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_capture_memory_does_not_grow_with_steps(tiny_generator):
    pipe = tiny_generator.pipe
    held = {}
    with capture_attention(pipe.unet, 1, (8, 8), [4], [2], 77) as store:
        for steps in (2, 6):
            store.begin(1)
            pipe("a cat; cat", height=64, width=64, num_inference_steps=steps, output_type="np")
            held[steps] = _live_tensor_bytes()
        one_map = store.sums["cross", (2, 2)][0].nbytes
    # Four more steps record 12 more cross-attention maps; none of them may be kept.
    assert held[6] - held[2] < one_map, held


def _blocks(plan, key):
    return sorted(name.split(".attentions")[0] for name, k in plan.items() if k == key)


@pytest.mark.parametrize("variant", ["tiny", "tiny-sd2"])
def test_multires_plan_records_the_right_layers_at_each_grid(variant, tiny_generator, sd2_pipe):
    unet = (tiny_generator.pipe if variant == "tiny" else sd2_pipe).unet
    if variant == "tiny-sd2":  # SD 2.x's layout: linear projections, a head count per level
        assert unet.config.use_linear_projection and isinstance(unet.config.attention_head_dim, (list, tuple))
    plan = plan_layers(unet, (8, 8), *MULTIRES)
    assert _blocks(plan, ("cross", (1, 1))) == ["mid_block"]
    assert _blocks(plan, ("cross", (2, 2))) == ["down_blocks.2", "up_blocks.1", "up_blocks.1"]
    assert _blocks(plan, ("cross", (4, 4))) == ["down_blocks.1", "up_blocks.2", "up_blocks.2"]
    assert _blocks(plan, ("self", (4, 4))) == ["down_blocks.1", "up_blocks.2", "up_blocks.2"]
    assert _blocks(plan, ("self", (8, 8))) == ["down_blocks.0", "up_blocks.3", "up_blocks.3"]
    assert all(name.endswith("attn2.processor") == (kind == "cross") for name, (kind, _) in plan.items())


def test_a_grid_the_unet_lacks_is_one_line(tiny_generator):
    with pytest.raises(UserError, match=r"no cross-attention layer at 1x1 \(latent / 16\); its cross-attention "
                                        r"grids are 16x16, 8x8, 4x4, 2x2: check label.cross_factor"):
        plan_layers(tiny_generator.pipe.unet, (16, 16), [4, 16], [2])


def test_multires_capture_leaves_the_image_unchanged_on_both_layouts(pipe):
    def run():
        g = [torch.Generator().manual_seed(7)]
        return pipe("a photo of a horse; horse", height=64, width=64, num_inference_steps=2, generator=g,
                    output_type="np").images

    plain = run()
    with capture_attention(pipe.unet, 1, (8, 8), *MULTIRES, 77) as store:
        store.begin(1)
        captured = run()
        cross, self_attn = _means(store)
    assert np.array_equal(plain, captured)
    # Every grid recorded its layers at every step (mid block: one layer; the others: three).
    assert store.calls == {("cross", (1, 1)): 2, ("cross", (2, 2)): 6, ("cross", (4, 4)): 6,
                           ("self", (4, 4)): 6, ("self", (8, 8)): 6}
    assert [c.shape for c in cross] == [(1, 1, 77), (1, 4, 77), (1, 16, 77)]
    assert [a.shape for a in self_attn] == [(1, 16, 16), (1, 64, 64)]
    for probs in [*cross, *self_attn]:
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)


def test_chunked_probabilities_equal_the_unchunked_ones(pipe):
    """A chunk budget of one byte computes one query row at a time; the sums must match."""
    latents, context = _unet_inputs(pipe)
    means = {}
    for chunk_bytes in (1, 2**30):
        with capture_attention(pipe.unet, 2, (8, 8), *MULTIRES, 77, chunk_bytes=chunk_bytes) as store:
            store.begin(2)
            with torch.no_grad():
                pipe.unet(latents, 10, encoder_hidden_states=context)
            means[chunk_bytes] = [m for group in _means(store) for m in group]
    for chunked, whole in zip(means[1], means[2**30], strict=True):
        assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)


def _probs_before_chunking(attn, hidden, context):
    """The capture's formula before multi-resolution capture existed (one (B, Nq, Nk) block)."""
    query, key = attn.to_q(hidden), attn.to_k(hidden if context is None else context)
    b, heads = query.shape[0], attn.heads
    query = query.view(b, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    key = key.view(b, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    total = torch.zeros(b, query.shape[2], key.shape[2])
    for h in range(heads):
        total += (torch.bmm(query[:, h].float(), key[:, h].float().transpose(1, 2)) * attn.scale).softmax(dim=-1)
    return total / heads


def test_default_grids_are_captured_bit_for_bit_as_before():
    """Entries recorded before chunking must reproduce: at the default budget the default grids
    are one chunk, computed exactly as before (5 heads, as SD 2.x's first level: no power of 2
    hides a change in rounding)."""
    from diffusers.models.attention_processor import Attention

    from syntagen_st.generation.attention import add_head_mean_probs

    torch.manual_seed(0)
    attn = Attention(query_dim=40, heads=5, dim_head=8)
    hidden = torch.randn(8, 32 * 32, 40)  # a 32x32 self grid, a batch of 8
    target = torch.zeros(8, 1024, 1024)
    with torch.no_grad():
        add_head_mean_probs(target, attn, hidden, None)
        assert torch.equal(target, _probs_before_chunking(attn, hidden, None))
