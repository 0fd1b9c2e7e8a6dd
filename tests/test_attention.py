"""Attention capture: exact probabilities, unchanged images, processors restored."""

import gc

import numpy as np
import pytest
import torch

from syntagen_st.generation.attention import capture_attention, layer_grid, plan_layers


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
    plan = plan_layers(tiny_generator.pipe.unet, (8, 8), 4, 2)
    assert sorted(k.split(".attentions")[0] for k, v in plan.items() if v == "cross") == [
        "down_blocks.2", "up_blocks.1", "up_blocks.1"]
    assert sorted(k.split(".attentions")[0] for k, v in plan.items() if v == "self") == [
        "down_blocks.1", "up_blocks.2", "up_blocks.2"]
    assert len(plan) < len(tiny_generator.pipe.unet.attn_processors)


def test_captured_cross_attention_equals_independent_probabilities(tiny_generator):
    """Recompute each recorded layer's softmax(q k^T / sqrt(d)) from hooked inputs with
    diffusers' own unfused path (get_attention_scores) and compare with the running mean."""
    unet = tiny_generator.pipe.unet
    plan = plan_layers(unet, (8, 8), 4, 2)
    inputs: dict[str, tuple] = {}
    hooks = []
    for key, kind in plan.items():
        module = unet.get_submodule(key.removesuffix(".processor"))
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, key=key: inputs.__setitem__(key, (mod, args[0], kwargs.get("encoder_hidden_states"))),
            with_kwargs=True,
        ))
    latents, context = _unet_inputs(tiny_generator.pipe)
    try:
        with capture_attention(unet, 2, (8, 8), 4, 2, 77) as store:
            store.begin(2)
            with torch.no_grad():
                unet(latents, 10, encoder_hidden_states=context)
            cross, self_attn = store.means()
    finally:
        for h in hooks:
            h.remove()

    def reference(kind):
        maps = []
        for key, (attn, hidden, ctx) in inputs.items():
            if plan[key] != kind:
                continue
            hidden = hidden[2:]
            ctx = hidden if kind == "self" else ctx[2:]
            q = attn.head_to_batch_dim(attn.to_q(hidden))
            k = attn.head_to_batch_dim(attn.to_k(ctx))
            probs = attn.get_attention_scores(q, k)  # (B*heads, N, M)
            maps.append(probs.view(2, attn.heads, *probs.shape[1:]).mean(1))
        return torch.stack(maps).mean(0)

    with torch.no_grad():
        assert torch.allclose(cross, reference("cross"), atol=1e-6)
        assert torch.allclose(self_attn, reference("self"), atol=1e-6)
    assert torch.allclose(cross.sum(-1), torch.ones(2, 4), atol=1e-5)


def test_capture_does_not_change_the_image(tiny_generator):
    pipe = tiny_generator.pipe

    def run():
        g = [torch.Generator().manual_seed(7)]
        return pipe("a photo of a horse; horse", height=64, width=64, num_inference_steps=3, generator=g,
                    output_type="np").images

    plain = run()
    with capture_attention(pipe.unet, 1, (8, 8), 4, 2, 77) as store:
        store.begin(1)
        captured = run()
        assert store.cross_calls == 3 * 3  # three layers, three steps
    assert np.array_equal(plain, captured)


def test_processors_restored_after_exit_and_on_error(tiny_generator):
    unet = tiny_generator.pipe.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError):
        with capture_attention(unet, 1, (8, 8), 4, 2, 77):
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
    with capture_attention(pipe.unet, 1, (8, 8), 4, 2, 77) as store:
        for steps in (2, 6):
            store.begin(1)
            pipe("a cat; cat", height=64, width=64, num_inference_steps=steps, output_type="np")
            held[steps] = _live_tensor_bytes()
        one_map = store.cross_sum[0].nbytes
    # Four more steps record 12 more cross-attention maps; none of them may be kept.
    assert held[6] - held[2] < one_map, held
