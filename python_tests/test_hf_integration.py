"""SF-Attn inside transformers' LLaMA, attention switching, the paged H2O cache in ``generate``, LoRA+
through peft, RoPE context extension (tiny random models)."""

import warnings

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import sdpa_mask

import sinklora_ext  # noqa: F401
from sinklora_ext.hf.attention import SETTINGS, implementation_name, set_attention, use_attention
from sinklora_ext.hf.cache import PagedH2OCache, cache_kwarg, generate_with_policy
from sinklora_ext.hf.lora import PEFT_DEPRECATION, apply_lora_plus, extend_context, load_adapter, peft_quiet, \
    trainable_parameter_names
from sinklora_ext.kv_cache import CachePolicy
from sinklora_ext.patterns import PRESETS
from conftest import reference_attention

peft = pytest.importorskip("peft")


def tiny_llama(seed=0, heads=4, kv_heads=2, max_pos=256, tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
                      tie_word_embeddings=tie, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 97, (2, 64))


def test_full_preset_reproduces_stock_attention(ids):
    model = tiny_llama().eval()
    model.set_attn_implementation("sdpa")
    stock = model(ids).logits
    set_attention(model, "full")
    assert model.config._attn_implementation == "sinklora_full"
    torch.testing.assert_close(model(ids).logits, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_matches_reference_pattern(preset, ids):
    name = f"test_reference_{preset}"
    AttentionInterface.register(name, reference_attention(preset))
    AttentionMaskInterface.register(name, sdpa_mask)
    model = tiny_llama()
    model.train()
    model.set_attn_implementation(name)
    expected = model(ids).logits
    set_attention(model, preset)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_eval_uses_full_attention_unless_always(ids):
    model = tiny_llama().eval()
    model.set_attn_implementation("sdpa")
    full = model(ids).logits
    set_attention(model, "sf")
    torch.testing.assert_close(model(ids).logits, full, rtol=1e-5, atol=1e-5)
    set_attention(model, "sf", during="always")
    assert (model(ids).logits - full).abs().max() > 1e-3
    model.train()
    trained = model(ids).logits
    model.eval()
    torch.testing.assert_close(model(ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_from_pretrained_selects_preset(tmp_path, ids):
    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation_name("s2_nowrap"))
    assert model.config._attn_implementation == "sinklora_s2_nowrap"
    model.eval()
    logits = model(ids).logits  # eval mode: full causal attention
    stock = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    torch.testing.assert_close(logits, stock(ids).logits, rtol=1e-5, atol=1e-5)


def test_cached_generate_of_a_padded_batch_equals_stock_attention():
    """Left-padded prompts through ``generate`` with a KV cache: the prompt through the varlen op,
    each new token through the cached-step path, greedy tokens and logits as with SDPA (eval mode:
    full causal attention)."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0  # the second prompt is 13 tokens, left-padded
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    model.set_attn_implementation("sdpa")
    stock = model.generate(ids, **kwargs)
    set_attention(model, "sf", group_size=8)
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, stock.sequences)
    for a, b in zip(ours.logits, stock.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cached_generate_with_the_pattern_always_on_matches_the_reference():
    """``during="always"`` (eval-passkey --attn sf): the prompt under the SF pattern, then cached steps
    over every key, against the float64-capable reference attention."""
    name = "test_reference_cached_sf"
    AttentionInterface.register(name, reference_attention("sf"))
    AttentionMaskInterface.register(name, sdpa_mask)
    model = tiny_llama().eval()
    ids = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    model.set_attn_implementation(name)
    expected = model.generate(ids, **kwargs)
    set_attention(model, "sf", during="always")
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, expected.sequences)
    for a, b in zip(ours.logits, expected.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model.set_attn_implementation("sdpa")
    assert not torch.equal(model.generate(ids, **kwargs).logits[0], ours.logits[0])  # the pattern did matter


def test_padding_free_packed_batch_equals_each_sequence_alone():
    """Sequences packed into one row with flash-attention's ``cu_seq_lens_q`` (transformers'
    padding-free training): each sequence's logits as when it runs alone."""
    model = tiny_llama()
    set_attention(model, "sf", group_size=16)
    model.train()
    lengths = [40, 9, 64]
    seqs = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    cu = torch.tensor([0, 40, 49, 113], dtype=torch.int32)
    packed = model(torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=64, max_length_k=64).logits[0]
    for seq, start, end in zip(seqs, cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(packed[start:end], model(seq[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_refused():
    model = tiny_llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    set_attention(model, "sf")
    model.train()
    with pytest.raises(ValueError, match="sinklora_sf attention has no dropout; got dropout=0.1"):
        model(torch.randint(0, 97, (1, 16)))
    model.eval()  # no dropout in eval mode
    assert model(torch.randint(0, 97, (1, 16))).logits.shape == (1, 16, 97)


def test_padded_batch_equals_each_sequence_alone():
    model = tiny_llama()
    set_attention(model, "sf", group_size=16)
    model.train()
    torch.manual_seed(2)
    lengths = [64, 37, 1]
    ids = torch.randint(0, 97, (3, 64))
    mask = torch.zeros(3, 64, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    batch = model(ids, attention_mask=mask).logits
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, :n]).logits[0]
        torch.testing.assert_close(batch[b, :n], alone, rtol=1e-5, atol=1e-5)


def test_lora_plus_trains_only_lora_embeddings_and_norms(ids):
    model = apply_lora_plus(tiny_llama())
    set_attention(model, "sf")
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable_parameter_names(model))
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(n in nonzero for n in with_grad if "lora_A" not in n)  # B starts at zero, so dA is zero
    for name in with_grad:
        assert "lora_" in name or "embed_tokens" in name or "norm" in name, name
    assert any("embed_tokens" in n for n in with_grad) and any("layernorm" in n for n in with_grad)
    assert any(n.endswith("model.norm.modules_to_save.default.weight") for n in with_grad)
    for target in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(target in n and "lora_A" in n for n in with_grad)
    assert not any("mlp" in n for n in with_grad)


def test_save_reload_with_plain_peft_reproduces_logits(tmp_path, ids):
    base = tiny_llama(max_pos=32)
    factor = extend_context(base, 64)
    assert factor == 2.0
    model = apply_lora_plus(base)
    set_attention(model, "sf")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    base.config.save_pretrained(tmp_path / "base")

    reloaded_config = LlamaConfig.from_pretrained(tmp_path / "base")
    assert reloaded_config.rope_parameters["rope_type"] == "linear"
    assert reloaded_config.rope_parameters["factor"] == 2.0
    assert reloaded_config.max_position_embeddings == 64
    fresh = tiny_llama(max_pos=32)  # same seed: the same base weights
    extend_context(fresh, 64)
    with peft_quiet():
        reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    set_attention(reloaded, "sf")
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    again = tiny_llama(max_pos=32)
    extend_context(again, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = load_adapter(again, tmp_path / "adapter").eval()
    assert not [w for w in caught if PEFT_DEPRECATION in str(w.message)]
    set_attention(reloaded, "sf")
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_context_extension_interpolates_positions():
    model = tiny_llama(max_pos=32)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    assert extend_context(model, 16) == 1.0  # fits: unchanged
    assert extend_context(model, 128) == 4.0
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq / 4.0)
    # position p at factor 4 rotates like position p / 4 did before
    x = torch.ones(1, 1, 8)
    cos_new, _ = model.model.rotary_emb(x, torch.tensor([[8]]))
    plain = tiny_llama(max_pos=32)
    cos_old, _ = plain.model.rotary_emb(x, torch.tensor([[2]]))
    torch.testing.assert_close(cos_new, cos_old)


def test_gradient_checkpointing_gives_the_same_loss_and_grads(ids):
    losses, grads = [], []
    for checkpointing in (False, True):
        model = apply_lora_plus(tiny_llama())
        set_attention(model, "sf_nowrap")
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_set_attention_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LoRA rank r must be >= 1, got 0"):
        apply_lora_plus(model, r=0)
    with pytest.raises(ValueError, match="preset"):
        set_attention(model, "bogus")
    with pytest.raises(ValueError, match="group_ratio"):
        set_attention(model, "sf", group_ratio=0.0)
    with pytest.raises(ValueError, match="during"):
        set_attention(model, "sf", during="sometimes")
    with pytest.raises(ValueError, match="group_size"):
        set_attention(model, "sf", group_size=0)


# ------------------------------------------------------------------------------------------
# No model left switched: use_attention, the paged cache, generate_with_policy
# ------------------------------------------------------------------------------------------


def attention_state(model):
    config = model.config
    return config._attn_implementation, {key: getattr(config, key) for key in SETTINGS if hasattr(config, key)}


def test_use_attention_restores_the_attention_on_exit_and_on_error(ids):
    model = tiny_llama().eval()
    model.set_attn_implementation("sdpa")
    stock = model(ids).logits
    with use_attention(model, "sf", group_size=8, during="always") as inside:
        assert inside is model and attention_state(model)[0] == "sinklora_sf"
        assert model.config.sinklora_group_size == 8
        patterned = model(ids).logits
    assert attention_state(model) == ("sdpa", {})  # settings it did not have are gone
    torch.testing.assert_close(model(ids).logits, stock)
    assert (patterned - stock).abs().max() > 1e-3

    set_attention(model, "s2", group_ratio=0.5)
    before = attention_state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with use_attention(model, "sf_nowrap", num_sinks=2):
            raise RuntimeError("inside")
    assert attention_state(model) == before
    with pytest.raises(ValueError, match="group_ratio"), use_attention(model, "sf", group_ratio=0.0):
        pass
    with pytest.raises(ValueError, match="apply to a preset"), use_attention(model, "eager", group_size=8):
        pass
    with pytest.raises(ValueError, match="no-such-attention"), use_attention(model, "no-such-attention"):
        pass
    assert attention_state(model) == before

    wrapped = apply_lora_plus(tiny_llama())
    with use_attention(wrapped, "eager"):
        assert wrapped.get_base_model().config._attn_implementation == "eager"
    assert wrapped.get_base_model().config._attn_implementation == "sdpa"


class FailOnCall:
    """A forward pre-hook on one module that raises on its ``n``-th call (1-based)."""

    def __init__(self, module, n):
        self.calls, self.n = 0, n
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected failure")


def test_paged_cache_switches_the_attention_only_for_its_forward_calls():
    model = tiny_llama().eval()
    model.set_attn_implementation("eager")
    prompt = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(5))
    stock = model(prompt).logits
    with PagedH2OCache(model, CachePolicy("h2o", 8, 2), max_tokens=64, max_prompt=21) as cache:
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(prompt).logits, stock)  # a call without the cache: untouched
        seen = []
        probe = model.model.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
        out = model.generate(prompt, **{cache_kwarg(model): cache}, max_new_tokens=4, do_sample=False)
        probe.remove()
        assert seen == ["sinklora_paged"] * 4 and model.config._attn_implementation == "eager"
        assert cache.tokens_seen == 21 + 3
        assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    assert not model._forward_pre_hooks and not model._forward_hooks  # detached on leaving the block
    torch.testing.assert_close(model(prompt).logits, stock)
    with pytest.raises(RuntimeError, match="detached"):  # not silently the stock attention over one token
        model.generate(prompt, **{cache_kwarg(model): cache}, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="not the one it was made for"):
        model(prompt, **{cache_kwarg(model): PagedH2OCache(tiny_llama(), CachePolicy("full"), max_tokens=32)})

    assert torch.equal(generate_with_policy(model, prompt, CachePolicy("h2o", 8, 2), max_new_tokens=4,
                                            do_sample=False), out)
    assert model.config._attn_implementation == "eager" and not model._forward_pre_hooks
    wrapped = apply_lora_plus(tiny_llama()).eval()  # B = 0: the same model under peft
    assert torch.equal(generate_with_policy(wrapped, prompt, CachePolicy("h2o", 8, 2), max_new_tokens=4,
                                            do_sample=False), out)
    assert wrapped.get_base_model().config._attn_implementation == "sdpa"
    assert not wrapped.get_base_model()._forward_pre_hooks
    failure = FailOnCall(model.model.layers[1].mlp, 3)
    with pytest.raises(RuntimeError, match="injected failure"):
        generate_with_policy(model, prompt, CachePolicy("h2o", 8, 2), max_new_tokens=6, do_sample=False)
    failure.handle.remove()
    assert model.config._attn_implementation == "eager" and not model._forward_pre_hooks
    assert not model._forward_hooks


@pytest.mark.parametrize("where", ["model.layers.1.self_attn", "lm_head"])  # midway through a step; after it
@pytest.mark.parametrize("failing_call", [1, 5])  # the prompt; the fourth decoding step
def test_a_failed_forward_call_leaves_the_paged_cache_as_it_was(failing_call, where):
    """A forward call that raises (in the last layer, after layer 0 wrote the pool, or in the head,
    after every layer did) is undone: the cache then decodes exactly as one that never saw it."""
    model = tiny_llama().eval()
    prompt = torch.randint(0, 97, (1, 21), generator=torch.Generator().manual_seed(6))
    policy = CachePolicy("h2o", 8, 2)
    reference, cache = (PagedH2OCache(model, policy, max_tokens=64, max_prompt=21) for _ in range(2))
    step = prompt
    if failing_call > 1:
        kwargs = {"do_sample": False, "max_new_tokens": failing_call - 1}
        sequence = model.generate(prompt, **{cache_kwarg(model): reference}, **kwargs)
        assert torch.equal(model.generate(prompt, **{cache_kwarg(model): cache}, **kwargs), sequence)
        step = sequence[:, -1:]
    failure = FailOnCall(model.get_submodule(where), 1)
    with pytest.raises(RuntimeError, match="injected failure"), torch.no_grad():
        model(step, **{cache_kwarg(model): cache})
    failure.handle.remove()
    assert model.config._attn_implementation == "sdpa"
    assert cache.tokens_seen == reference.tokens_seen == (0 if failing_call == 1 else 21 + failing_call - 2)
    assert cache.paged.lengths[cache.seq] == reference.paged.lengths[reference.seq]
    assert cache.paged.free_blocks == reference.paged.free_blocks
    with torch.no_grad():
        ours = model(step, **{cache_kwarg(model): cache}).logits
        theirs = model(step, **{cache_kwarg(model): reference}).logits
    assert torch.equal(ours, theirs)
    assert cache.tokens_seen == reference.tokens_seen


@pytest.mark.parametrize("name", ["h2o", "tova", "ema", "snapkv-mean", "pyramidkv-ema"])
def test_generate_through_the_paged_cache_equals_the_decode_engine(name):
    """transformers' ``generate`` over :class:`PagedH2OCache` keeps what the engine keeps under
    every rule (the prompt's decayed or window scores, the per-step decay): the same greedy tokens."""
    from sinklora_ext.engine import DecodeEngine, Request

    model = tiny_llama().eval()
    prompt = torch.randint(0, 97, (1, 45), generator=torch.Generator().manual_seed(11))
    policy = CachePolicy(name, 12, 2, 4)
    ours = generate_with_policy(model, prompt, policy, max_new_tokens=12, do_sample=False)[0, 45:].tolist()
    engine = DecodeEngine(model, policy, max_seqs=1, max_tokens=64)
    (req,) = engine.run([Request(prompt[0].tolist(), 12)])
    assert ours == req.output_ids
