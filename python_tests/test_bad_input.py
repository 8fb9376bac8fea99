"""Bad input at every entry point a user reaches (issue 10, item 4): every `sinklora` subcommand with
missing, empty, binary and non-UTF-8 files, directories for files, text shorter than one window,
zero, negative and huge sizes, unknown choices, corrupt and foreign adapters and models. Each ends
with one `sinklora: error:` line (argparse's own: `sinklora ...: error:`) naming the argument and
the rule, exit code 2 and no traceback. Most fail before any model loads; the rest load a tiny
random LLaMA. `train` killed with SIGKILL while saving a checkpoint, mid-step and while writing
its output, then `--resume`d: nothing half-written is ever read."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from sinklora_ext import cli
from sinklora_ext.data import debian_text_file

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
HUGE = str(2**40)


@pytest.fixture(autouse=True)
def _quiet_stale_log_handlers(monkeypatch):
    """transformers' log handler writes to the sys.stderr of the test that first imported it, which
    pytest has closed since; logging would print its own traceback of that into our stderr."""
    import logging

    monkeypatch.setattr(logging, "raiseExceptions", False)


def sinklora(argv: list[str], capsys) -> tuple[int, str]:
    """`sinklora ARGV` in this process: (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_usage_error(code: int, stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code == 2, (code, stderr)
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("sinklora") and ": error: " in line, stderr
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad (and a few good) inputs, by name."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {name: root / name for name in ("missing.txt", "empty.txt", "blank.txt", "binary.bin", "latin1.txt",
                                            "short.txt", "broken.json", "object.json", "no-output.json",
                                            "a-file", "directory")}
    paths["empty.txt"].write_bytes(b"")
    paths["blank.txt"].write_text("\n  \n")
    paths["binary.bin"].write_bytes(bytes(range(256)) * 4)
    paths["latin1.txt"].write_bytes("Debian est un système d'exploitation libre.".encode("latin-1"))
    paths["short.txt"].write_text("Debian is a free operating system.")
    paths["broken.json"].write_text('[{"instruction": "x", ')
    paths["object.json"].write_text('{"instruction": "x", "output": "y"}')
    paths["no-output.json"].write_text('[{"instruction": "x"}]')
    paths["a-file"].write_text("not a directory")
    (root / "a-file-x.checkpoints").write_text("not a directory either")
    paths["directory"].mkdir()
    os.mkfifo(root / "fifo")  # reading it would block forever
    paths["fifo"] = root / "fifo"
    (root / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    paths["garbage.gguf"] = root / "garbage.gguf"
    return {name.split(".")[0] if name != "garbage.gguf" else "gguf": str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sinklora_ext.hf.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """The tiny LLaMA every model-loading case uses, LoRA+ adapters of it and of other models, and
    broken copies of both."""
    from sinklora_ext.hf.lora import apply_lora_plus
    from sinklora_ext.hf.models import load_model

    root = tmp_path_factory.mktemp("models")
    tiny = save_tiny_llama(root / "tiny", tokenizer)
    paths = {"tiny": tiny}
    for name, source, r in (("adapter", tiny, 8),
                            ("adapter-wider", save_tiny_llama(root / "wider", tokenizer, hidden=128), 8),
                            ("adapter-deeper", save_tiny_llama(root / "deeper", tokenizer, layers=3), 8)):
        model, _ = load_model(source, device="cpu")
        apply_lora_plus(model, r=r).save_pretrained(root / name)
        paths[name] = str(root / name)

    def copy_of(name: str, source: str) -> Path:
        target = root / name
        target.mkdir()
        for f in Path(source).iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        paths[name] = str(target)
        return target

    config = json.loads((Path(tiny) / "config.json").read_text())
    copy_of("gpt2", tiny).joinpath("config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    copy_of("garbage-config", tiny).joinpath("config.json").write_text("{model_type: llama")
    copy_of("garbage-weights", tiny).joinpath("model.safetensors").write_bytes(b"\x08" * 64)
    copy_of("narrower-config", tiny).joinpath("config.json").write_text(json.dumps(dict(config, hidden_size=32)))
    copy_of("deeper-config", tiny).joinpath("config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    adapter_config = json.loads((Path(paths["adapter"]) / "adapter_config.json").read_text())
    copy_of("adapter-rank4", paths["adapter"]).joinpath("adapter_config.json").write_text(
        json.dumps(dict(adapter_config, r=4)))
    copy_of("adapter-garbage-weights", paths["adapter"]).joinpath("adapter_model.safetensors").write_bytes(
        b"\xff" * 100)
    copy_of("adapter-garbage-config", paths["adapter"]).joinpath("adapter_config.json").write_text("{")
    copy_of("adapter-no-peft-type", paths["adapter"]).joinpath("adapter_config.json").write_text('{"r": 8}')
    copy_of("adapter-no-weights", paths["adapter"]).joinpath("adapter_model.safetensors").unlink()
    copy_of("adapter-no-config", paths["adapter"]).joinpath("adapter_config.json").unlink()
    copy_of("adapter-garbage-meta", paths["adapter"]).joinpath("sinklora.json").write_text("[1,")
    copy_of("adapter-bad-context", paths["adapter"]).joinpath("sinklora.json").write_text(
        json.dumps({"base_model": None, "context": "16k"}))
    copy_of("adapter-missing-base", paths["adapter"]).joinpath("sinklora.json").write_text(
        json.dumps({"base_model": str(root / "gone"), "context": 128}))
    return paths


@pytest.fixture(scope="module")
def text_file():
    return str(debian_text_file())


# (case id, argv, fragments of the error line). {name} is a path of the `files` fixture, {text} the
# Debian text. Every one of them fails before a model loads.
TRAIN = ["train", "--data", "{text}", "--context", "64", "--steps", "1", "--output", "{directory}/out"]
EVAL_PPL = ["eval-ppl", "--text", "{text}", "--context", "64"]
EVAL_KV = ["eval-kv", "--text", "{text}", "--context", "64", "--policy", "h2o", "--kv-budget", "16"]
GENERATE = ["generate", "--prompt", "Debian is"]
PASSKEY = ["eval-passkey", "--length", "200"]


def _with(base: list[str], *extra: str) -> list[str]:
    """``base`` with options replaced or added."""
    argv = list(base)
    for flag_, value in zip(extra[::2], extra[1::2]):
        if flag_ in argv:
            argv[argv.index(flag_) + 1] = value
        else:
            argv += [flag_, value]
    return argv


EARLY_CASES = [
    # train: files
    ("train-data-missing", _with(TRAIN, "--data", "{missing}"), ["--data", "no such file"]),
    ("train-data-empty", _with(TRAIN, "--data", "{empty}"), ["--data", "is empty"]),
    ("train-data-blank", _with(TRAIN, "--data", "{blank}"), ["--data", "is empty"]),
    ("train-data-binary", _with(TRAIN, "--data", "{binary}"), ["--data", "binary file"]),
    ("train-data-latin1", _with(TRAIN, "--data", "{latin1}"), ["--data", "not UTF-8", "0xe8"]),
    ("train-data-directory", _with(TRAIN, "--data", "{directory}"), ["--data", "is a directory"]),
    ("train-data-fifo", _with(TRAIN, "--data", "{fifo}"), ["--data", "is not a regular file"]),
    ("train-data-second-missing", ["train", "--data", "{text}", "{missing}", "--context", "64"], ["no such file"]),
    ("train-json-broken", _with(TRAIN, "--data", "{broken}"), ["--data", "not valid JSON"]),
    ("train-json-object", _with(TRAIN, "--data", "{object}"), ["--data", "JSON list of objects, got dict"]),
    ("train-json-no-output", _with(TRAIN, "--data", "{no-output}"), ["--data", "[0]", "'output'"]),
    # train: sizes
    ("train-context-0", _with(TRAIN, "--context", "0"), ["--context must be >= 2, got 0"]),
    ("train-context-1", _with(TRAIN, "--context", "1"), ["--context must be >= 2, got 1"]),
    ("train-context-negative", _with(TRAIN, "--context", "-64"), ["--context must be >= 2"]),
    ("train-context-huge", _with(TRAIN, "--context", HUGE), ["--context must be <= 2147483647"]),
    ("train-context-not-int", _with(TRAIN, "--context", "1e3"), ["--context", "invalid int value"]),
    ("train-steps-0", _with(TRAIN, "--steps", "0"), ["--steps must be >= 1, got 0"]),
    ("train-steps-negative", _with(TRAIN, "--steps", "-3"), ["--steps must be >= 1"]),
    ("train-steps-huge", _with(TRAIN, "--steps", HUGE), ["--steps must be <= "]),
    ("train-sinks-negative", _with(TRAIN, "--sinks", "-1"), ["--sinks must be >= 0"]),
    ("train-group-ratio-0", _with(TRAIN, "--group-ratio", "0"), ["--group-ratio must be in (0, 1]"]),
    ("train-group-ratio-big", _with(TRAIN, "--group-ratio", "1.5"), ["--group-ratio must be in (0, 1]"]),
    ("train-group-ratio-nan", _with(TRAIN, "--group-ratio", "nan"), ["--group-ratio must be in (0, 1]"]),
    ("train-lr-0", _with(TRAIN, "--lr", "0"), ["--lr must be a finite number > 0"]),
    ("train-lr-inf", _with(TRAIN, "--lr", "inf"), ["--lr must be a finite number > 0"]),
    ("train-lora-r-0", _with(TRAIN, "--lora-r", "0"), ["--lora-r must be >= 1"]),
    ("train-lora-alpha-negative", _with(TRAIN, "--lora-alpha", "-16"), ["--lora-alpha must be a finite number > 0"]),
    ("train-batch-size-0", _with(TRAIN, "--batch-size", "0"), ["--batch-size must be >= 1"]),
    ("train-grad-accum-0", _with(TRAIN, "--grad-accum", "0"), ["--grad-accum must be >= 1"]),
    ("train-max-windows-0", _with(TRAIN, "--max-windows", "0"), ["--max-windows must be >= 1"]),
    ("train-save-steps-0", _with(TRAIN, "--save-steps", "0"), ["--save-steps must be >= 1"]),
    ("train-warmup-negative", _with(TRAIN, "--warmup-steps", "-1"), ["--warmup-steps must be >= 0"]),
    ("train-original-context-0", _with(TRAIN, "--original-context", "0"), ["--original-context must be >= 1"]),
    # train: choices, devices, models, outputs
    ("train-attn-unknown", _with(TRAIN, "--attn", "sliding"), ["--attn", "invalid choice: 'sliding'"]),
    ("train-dtype-unknown", _with(TRAIN, "--dtype", "float8"), ["--dtype", "invalid choice"]),
    ("train-device-unknown", _with(TRAIN, "--device", "tpu"), ["--device must be cpu, cuda or cuda:N"]),
    ("train-device-cuda", _with(TRAIN, "--device", "cuda"), ["--device cuda: no CUDA device"]),
    ("train-model-missing", _with(TRAIN, "--model", "{missing}"), ["--model", "not a local directory"]),
    ("train-model-file", _with(TRAIN, "--model", "{short}"), ["--model", "not a local directory"]),
    ("train-model-no-config", _with(TRAIN, "--model", "{directory}"), ["--model", "has no config.json"]),
    ("train-output-file", _with(TRAIN, "--output", "{a-file}"), ["--output", "exists and is not a directory"]),
    ("train-checkpoints-file", _with(TRAIN, "--output", "{a-file}-x"),
     ["--output (its checkpoints)", "a-file-x.checkpoints exists and is not a directory"]),
    ("train-output-under-file", _with(TRAIN, "--output", "{a-file}/out"), ["--output", "is not a directory"]),
    ("train-deepspeed-missing", _with(TRAIN, "--deepspeed", "{missing}"), ["--deepspeed: no such config file"]),
    ("train-deepspeed-binary", _with(TRAIN, "--deepspeed", "{binary}"), ["--deepspeed", "binary file"]),
    ("train-deepspeed-list", _with(TRAIN, "--deepspeed", "{broken}"), ["--deepspeed", "not valid JSON"]),
    ("train-fsdp-on-cpu", _with(TRAIN, "--fsdp", "full_shard", "--device", "cpu"), ["--fsdp needs CUDA"]),
    # eval-ppl
    ("eval-ppl-text-missing", _with(EVAL_PPL, "--text", "{missing}"), ["--text", "no such file", "corpus name"]),
    ("eval-ppl-text-empty", _with(EVAL_PPL, "--text", "{empty}"), ["--text", "is empty"]),
    ("eval-ppl-text-binary", _with(EVAL_PPL, "--text", "{binary}"), ["--text", "binary file"]),
    ("eval-ppl-text-latin1", _with(EVAL_PPL, "--text", "{latin1}"), ["--text", "not UTF-8"]),
    ("eval-ppl-text-directory", _with(EVAL_PPL, "--text", "{directory}"), ["--text", "is a directory"]),
    ("eval-ppl-text-fifo", _with(EVAL_PPL, "--text", "{fifo}"), ["--text", "is not a regular file"]),
    ("eval-ppl-context-1", _with(EVAL_PPL, "--context", "1"), ["--context must be >= 2, got 1"]),
    ("eval-ppl-context-negative", _with(EVAL_PPL, "--context", "-8"), ["--context must be >= 2"]),
    ("eval-ppl-context-huge", _with(EVAL_PPL, "--context", HUGE), ["--context must be <= "]),
    ("eval-ppl-max-windows-0", _with(EVAL_PPL, "--max-windows", "0"), ["--max-windows must be >= 1"]),
    ("eval-ppl-batch-size-0", _with(EVAL_PPL, "--batch-size", "0"), ["--batch-size must be >= 1"]),
    ("eval-ppl-group-ratio", _with(EVAL_PPL, "--attn", "sf", "--group-ratio", "-0.25"), ["--group-ratio"]),
    ("eval-ppl-sinks-negative", _with(EVAL_PPL, "--attn", "sf", "--sinks", "-4"), ["--sinks must be >= 0"]),
    ("eval-ppl-attn-unknown", _with(EVAL_PPL, "--attn", "local"), ["--attn", "invalid choice"]),
    ("eval-ppl-adapter-missing", _with(EVAL_PPL, "--adapter", "{missing}"), ["--adapter", "no such directory"]),
    ("eval-ppl-adapter-file", _with(EVAL_PPL, "--adapter", "{short}"), ["--adapter", "is a file"]),
    ("eval-ppl-adapter-empty-dir", _with(EVAL_PPL, "--adapter", "{directory}"), ["--adapter", "no adapter_config"]),
    ("eval-ppl-model-missing", _with(EVAL_PPL, "--model", "{missing}"), ["--model", "not a local directory"]),
    ("eval-ppl-device-unknown", _with(EVAL_PPL, "--device", "gpu0"), ["--device must be cpu, cuda or cuda:N"]),
    # eval-passkey
    ("eval-passkey-length-0", _with(PASSKEY, "--length", "0"), ["--length must be >= 1, got 0"]),
    ("eval-passkey-length-negative", _with(PASSKEY, "--length", "-100"), ["--length must be >= 1"]),
    ("eval-passkey-length-huge", _with(PASSKEY, "--length", HUGE), ["--length must be <= "]),
    ("eval-passkey-trials-0", _with(PASSKEY, "--trials", "0"), ["--trials must be >= 1"]),
    ("eval-passkey-depth-big", _with(PASSKEY, "--depth", "1.5"), ["--depth must be in [0, 1], got 1.5"]),
    ("eval-passkey-depth-negative", _with(PASSKEY, "--depth", "-0.1"), ["--depth must be in [0, 1]"]),
    ("eval-passkey-depth-nan", _with(PASSKEY, "--depth", "nan"), ["--depth must be in [0, 1]"]),
    ("eval-passkey-adapter-missing", _with(PASSKEY, "--adapter", "{missing}"), ["--adapter", "no such directory"]),
    # eval-kv
    ("eval-kv-text-binary", _with(EVAL_KV, "--text", "{binary}"), ["--text", "binary file"]),
    ("eval-kv-text-directory", _with(EVAL_KV, "--text", "{directory}"), ["--text", "is a directory"]),
    ("eval-kv-context-1", _with(EVAL_KV, "--context", "1"), ["--context must be >= 2"]),
    ("eval-kv-budget-0", _with(EVAL_KV, "--kv-budget", "0"), ["--kv-budget must be >= 1, got 0"]),
    ("eval-kv-budget-negative", _with(EVAL_KV, "--kv-budget", "-16"), ["--kv-budget must be >= 1"]),
    ("eval-kv-budget-huge", _with(EVAL_KV, "--kv-budget", HUGE), ["--kv-budget must be <= "]),
    ("eval-kv-budget-missing", ["eval-kv", "--text", "{text}", "--context", "64", "--policy", "streaming"],
     ["--kv-budget is required with --policy streaming"]),
    ("eval-kv-sinks-negative", _with(EVAL_KV, "--sinks", "-1"), ["--sinks must be >= 0"]),
    ("eval-kv-recent-negative", _with(EVAL_KV, "--recent", "-1"), ["--recent must be >= 0"]),
    ("eval-kv-budget-under-sinks-recent", _with(EVAL_KV, "--kv-budget", "8", "--sinks", "4", "--recent", "8"),
     ["--kv-budget (8) must be >= --sinks (4) + --recent (8)"]),
    ("eval-kv-streaming-under-sinks", _with(EVAL_KV, "--policy", "streaming", "--kv-budget", "2"),
     ["--kv-budget (2) must be >= --sinks (4)"]),
    ("eval-kv-prefill-0", _with(EVAL_KV, "--prefill", "0"), ["--prefill must be >= 1"]),
    ("eval-kv-block-size-0", _with(EVAL_KV, "--block-size", "0"), ["--block-size must be in [1, 1024], got 0"]),
    ("eval-kv-block-size-huge", _with(EVAL_KV, "--block-size", HUGE), ["--block-size must be in [1, 1024]"]),
    ("eval-kv-budget-with-full", _with(EVAL_KV, "--policy", "full"),
     ["--kv-budget applies to the evicting policies"]),
    ("eval-kv-recent-with-streaming", _with(EVAL_KV, "--policy", "streaming", "--recent", "4"),
     ["--recent applies to the scored policies"]),
    ("eval-kv-policy-unknown", _with(EVAL_KV, "--policy", "lru"), ["--policy", "invalid choice: 'lru'"]),
    # generate
    ("generate-max-new-0", _with(GENERATE, "--max-new-tokens", "0"), ["--max-new-tokens must be >= 1, got 0"]),
    ("generate-max-new-negative", _with(GENERATE, "--max-new-tokens", "-5"), ["--max-new-tokens must be >= 1"]),
    ("generate-max-new-huge", _with(GENERATE, "--max-new-tokens", HUGE), ["--max-new-tokens must be <= "]),
    ("generate-prompt-empty", _with(GENERATE, "--prompt", ""), ["--prompt must not be empty"]),
    ("generate-temperature-negative", _with(GENERATE, "--temperature", "-1"), ["--temperature must be >= 0"]),
    ("generate-top-p-0", _with(GENERATE, "--top-p", "0"), ["--top-p must be in (0, 1], got 0.0"]),
    ("generate-top-p-big", _with(GENERATE, "--top-p", "1.5"), ["--top-p must be in (0, 1]"]),
    ("generate-budget-missing", _with(GENERATE, "--policy", "h2o"), ["--kv-budget is required with --policy h2o"]),
    ("generate-budget-with-full", _with(GENERATE, "--policy", "full", "--kv-budget", "64"),
     ["--kv-budget applies to the evicting policies; --policy full keeps every token"]),
    ("generate-budget-0", _with(GENERATE, "--policy", "h2o", "--kv-budget", "0"), ["--kv-budget must be >= 1"]),
    ("generate-policy-unknown", _with(GENERATE, "--policy", "fifo"), ["--policy", "invalid choice"]),
    ("generate-block-size-0", _with(GENERATE, "--block-size", "0"), ["--block-size must be in [1, 1024]"]),
    ("generate-adapter-empty-dir", _with(GENERATE, "--adapter", "{directory}"), ["--adapter", "adapter_config"]),
    # demo
    ("demo-context-0", ["demo", "--context", "0"], ["--context must be >= 2"]),
    ("demo-steps-0", ["demo", "--steps", "0"], ["--steps must be >= 1"]),
    ("demo-lr-negative", ["demo", "--lr", "-0.5"], ["--lr must be a finite number > 0"]),
    ("demo-budget-small", ["demo", "--kv-budget", "4"], ["--kv-budget must be in [8, --context 512]", "got 4"]),
    ("demo-budget-over-context", ["demo", "--kv-budget", "1024"], ["--kv-budget must be in [8, --context 512]"]),
    ("demo-context-small", ["demo", "--context", "16"], ["--kv-budget", "got 4"]),
    ("demo-output-file", ["demo", "--output", "{a-file}"], ["--output", "exists and is not a directory"]),
    # bench
    ("bench-attention-seqlen-0", ["bench", "attention", "--seqlen", "0"], ["--seqlen must be >= 1, got 0"]),
    ("bench-attention-batch-0", ["bench", "attention", "--batch", "0"], ["--batch must be >= 1"]),
    ("bench-attention-heads", ["bench", "attention", "--heads-q", "3", "--heads-kv", "2"],
     ["--heads-q (3) must be a multiple of --heads-kv (2)"]),
    ("bench-attention-head-dim", ["bench", "attention", "--head-dim", "300"], ["--head-dim must be <= 256"]),
    ("bench-attention-group-ratio", ["bench", "attention", "--group-ratio", "0"], ["--group-ratio"]),
    ("bench-attention-sinks", ["bench", "attention", "--sinks", "-1"], ["--sinks must be >= 0"]),
    ("bench-attention-repeats-0", ["bench", "attention", "--repeats", "0"], ["--repeats must be >= 1"]),
    ("bench-attention-memory", ["bench", "attention", "--seqlen", str(2**30), "--batch", "64"],
     ["needs at least", "GiB", "available"]),
    ("bench-attention-device", ["bench", "attention", "--device", "npu"], ["--device must be cpu, cuda"]),
    ("bench-decode-batch-0", ["bench", "decode", "--batch", "0"], ["--batch must be >= 1, got 0"]),
    ("bench-decode-context-0", ["bench", "decode", "--context", "0"], ["--context must be >= 1, got 0"]),
    ("bench-decode-block-size-0", ["bench", "decode", "--block-size", "0"], ["--block-size must be in [1, 1024]"]),
    ("bench-decode-prefill-negative", ["bench", "decode", "--prefill", "-1"], ["--prefill must be >= 1"]),
    ("bench-decode-heads", ["bench", "decode", "--heads-q", "32", "--heads-kv", "5"], ["multiple of --heads-kv"]),
    ("bench-decode-memory", ["bench", "decode", "--context", str(2**30), "--batch", "64"], ["needs at least"]),
    ("bench-generate-policies", ["bench", "generate", "--policies", "full,lfu"], ["--policies: each must be one of"]),
    ("bench-generate-batch-0", ["bench", "generate", "--batch", "0"], ["--batch must be >= 1, got 0"]),
    ("bench-generate-context-0", ["bench", "generate", "--context", "0"], ["--context must be >= 1, got 0"]),
    ("bench-generate-budget-frac", ["bench", "generate", "--budget-frac", "0"], ["--budget-frac must be in (0, 1]"]),
    ("bench-generate-budget-small", ["bench", "generate", "--context", "16", "--sinks", "8"],
     ["kv budget of 10, less than --sinks (8)"]),
    ("bench-generate-block-size", ["bench", "generate", "--block-size", "0"], ["--block-size must be in [1, 1024]"]),
    ("bench-generate-shape", ["bench", "generate", "--shape", "gpt-4"], ["--shape", "invalid choice"]),
    ("bench-generate-memory", ["bench", "generate", "--shape", "llama3-8b", "--context", "1000000", "--batch", "64"],
     ["--shape llama3-8b", "needs at least"]),
    ("bench-generate-model-missing", ["bench", "generate", "--model", "{missing}"], ["--model", "not a local"]),
    ("bench-extension-no-full", ["bench", "extension", "--patterns", "sf,s2"], ["--patterns must include 'full'"]),
    ("bench-extension-unknown", ["bench", "extension", "--patterns", "full,swa"], ["--patterns: each must be one of"]),
    ("bench-extension-steps-0", ["bench", "extension", "--steps", "0"], ["--steps must be >= 1, got 0"]),
    ("bench-extension-context-1", ["bench", "extension", "--context", "1"], ["--context must be >= 2"]),
    ("bench-extension-eval-windows", ["bench", "extension", "--eval-windows", "0"], ["--eval-windows must be >= 1"]),
    ("bench-extension-train-text", ["bench", "extension", "--train-text", "{missing}"],
     ["--train-text", "no such file"]),
    ("bench-extension-eval-text", ["bench", "extension", "--eval-text", "{binary}"], ["--eval-text", "binary file"]),
    ("bench-extension-output", ["bench", "extension", "--output", "{a-file}"], ["--output", "not a directory"]),
    # the command line itself
    ("no-command", [], ["the following arguments are required: command"]),
    ("unknown-command", ["finetune"], ["invalid choice: 'finetune'"]),
    ("bench-no-target", ["bench"], ["the following arguments are required: bench_target"]),
    ("train-no-data", ["train", "--context", "64"], ["the following arguments are required: --data"]),
]


def _expand(argv: list[str], paths: dict) -> list[str]:
    return [a.format(**paths) for a in argv]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in EARLY_CASES], ids=[c[0] for c in EARLY_CASES])
def test_refused_before_any_model_loads(argv, fragments, files, text_file, capsys, monkeypatch):
    import transformers

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
    code, err = sinklora(_expand(argv, dict(files, text=text_file)), capsys)
    assert_usage_error(code, err, *fragments)


# Cases that need the model (its tokenizer, its context, its weights): the tiny LLaMA (context 128).
# {name} is a path of the `files` or `models` fixture.
MODEL_CASES = [
    ("train-text-shorter-than-window", ["train", "--data", "{short}", "--context", "64", "--model", "{tiny}",
                                        "--output", "{directory}/never"], ["--data: no training window"]),
    ("train-json-empty-list", ["train", "--data", "{empty-list}", "--context", "64", "--model", "{tiny}",
                               "--output", "{directory}/never"], ["--data: no training window"]),
    ("train-model-gpt2", ["train", "--data", "{text}", "--context", "64", "--model", "{gpt2}"],
     ["--model", "holds a 'gpt2' model", "LLaMA-architecture"]),
    ("train-model-garbage-config", ["train", "--data", "{text}", "--context", "64", "--model", "{garbage-config}"],
     ["--model", "not valid JSON"]),
    ("train-model-is-adapter", ["train", "--data", "{text}", "--context", "64", "--model", "{adapter}"],
     ["--model", "pass it as --adapter"]),
    ("eval-ppl-model-garbage-weights", ["eval-ppl", "--text", "{text}", "--context", "64", "--model",
                                        "{garbage-weights}"], ["--model: cannot load"]),
    ("eval-ppl-model-config-of-narrower-model", ["eval-ppl", "--text", "{text}", "--context", "64", "--model",
                                                 "{narrower-config}"], ["--model", "do not have the shapes"]),
    ("generate-model-config-of-deeper-model", ["generate", "--prompt", "Debian", "--model", "{deeper-config}"],
     ["--model", "lacks", "model.layers.2", "another model's config"]),
    ("eval-ppl-text-shorter-than-window", ["eval-ppl", "--text", "{short}", "--context", "64", "--model", "{tiny}"],
     ["--text", "fewer than one window of --context 64"]),
    ("eval-ppl-context-past-text", ["eval-ppl", "--text", "{text}", "--context", str(2**31 - 1), "--model", "{tiny}"],
     ["fewer than one window of --context 2147483647"]),
    ("eval-ppl-adapter-wider-model", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                      "--adapter", "{adapter-wider}"], ["--adapter", "does not fit", "size mismatch"]),
    ("eval-ppl-adapter-deeper-model", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                       "--adapter", "{adapter-deeper}"],
     ["--adapter", "does not fit", "not in the model", "layers.2"]),
    ("eval-ppl-adapter-other-rank", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                     "--adapter", "{adapter-rank4}"], ["--adapter", "does not fit", "size mismatch"]),
    ("eval-ppl-adapter-garbage-weights", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                          "--adapter", "{adapter-garbage-weights}"],
     ["--adapter", "not a readable safetensors file"]),
    ("eval-ppl-adapter-garbage-config", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                         "--adapter", "{adapter-garbage-config}"], ["--adapter", "not valid JSON"]),
    ("eval-ppl-adapter-no-peft-type", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                       "--adapter", "{adapter-no-peft-type}"], ["--adapter", "no peft_type"]),
    ("eval-ppl-adapter-no-weights", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                     "--adapter", "{adapter-no-weights}"], ["--adapter", "no adapter_model"]),
    ("eval-ppl-adapter-no-config", ["eval-ppl", "--text", "{text}", "--context", "64", "--model", "{tiny}",
                                    "--adapter", "{adapter-no-config}"], ["--adapter", "no adapter_config.json"]),
    ("eval-kv-adapter-garbage-meta", ["eval-kv", "--text", "{text}", "--context", "64", "--policy", "full",
                                      "--adapter", "{adapter-garbage-meta}"], ["--adapter", "sinklora.json"]),
    ("eval-ppl-adapter-bad-context", ["eval-ppl", "--text", "{text}", "--context", "64", "--adapter",
                                      "{adapter-bad-context}"], ["--adapter", "'context' must be an integer >= 1"]),
    ("generate-adapter-base-gone", ["generate", "--prompt", "Debian is", "--adapter", "{adapter-missing-base}"],
     ["its base model (sinklora.json)", "not a local directory"]),
    ("eval-kv-text-shorter-than-context", ["eval-kv", "--text", "{short}", "--context", "64", "--policy", "full",
                                           "--model", "{tiny}"], ["--text", "fewer than --context 64"]),
    ("eval-passkey-length-short", ["eval-passkey", "--length", "5", "--model", "{tiny}"],
     ["length 5 is shorter than the passkey prompt"]),
    ("eval-passkey-length-past-context", ["eval-passkey", "--length", "100000", "--model", "{tiny}"],
     ["--length must be <= 4 x the model's context (128 tokens)"]),
    ("generate-max-new-past-context", ["generate", "--prompt", "Debian is", "--max-new-tokens", "1000000",
                                       "--model", "{tiny}"],
     ["--max-new-tokens", "more than the model's context (128)"]),
    ("generate-budget-past-context", ["generate", "--prompt", "Debian is", "--max-new-tokens", "1000", "--policy",
                                      "h2o", "--kv-budget", "500", "--model", "{tiny}"],
     ["--kv-budget 500", "more than the model's context (128)"]),
    ("generate-prompt-past-context", ["generate", "--prompt", "Debian " * 200, "--policy", "streaming",
                                      "--kv-budget", "16", "--model", "{tiny}"],
     ["--prompt: a prompt has", "more than the model's context (128)"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_refused_once_the_model_is_known(argv, fragments, files, models, text_file, tmp_path, capsys):
    (tmp_path / "empty-list.json").write_text("[]")
    paths = dict(files, **models, text=text_file, **{"empty-list": str(tmp_path / "empty-list.json")})
    code, err = sinklora(_expand(argv, paths), capsys)
    assert_usage_error(code, err, *fragments)
    assert not (Path(files["directory"]) / "never").exists()


def test_missing_corpus_and_unreadable_gguf(files, tmp_path, capsys, monkeypatch):
    """A Debian corpus whose package is not installed, and a .gguf file transformers cannot read."""
    from sinklora_ext import data

    corpus = data.CORPORA["gnu-standards"]
    monkeypatch.setitem(data.CORPORA, "gnu-standards",
                        data.Corpus(corpus.name, "gnu-standards-missing", str(tmp_path / "gone"), corpus.files,
                                    corpus.title))
    code, err = sinklora(["eval-ppl", "--text", "gnu-standards", "--context", "64"], capsys)
    assert_usage_error(code, err, "needs the Debian package 'gnu-standards-missing'", "apt-get install")
    monkeypatch.setenv("SINKLORA_CACHE", str(tmp_path / "cache"))
    code, err = sinklora(["eval-ppl", "--text", files["short"], "--context", "64", "--model", files["gguf"]], capsys)
    assert_usage_error(code, err, "--model", "is not a GGUF file transformers can read")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_matching_adapter_loads(models):
    """The adapter checks refuse foreign adapters, not the right one: the tiny model's own adapter
    loads, and merged into the model it changes nothing (LoRA B starts at zero)."""
    from sinklora_ext.evaluate import load_for_eval
    from sinklora_ext.hf.models import load_model

    merged, _ = load_for_eval(models["tiny"], models["adapter"], device="cpu")
    base, _ = load_model(models["tiny"], device="cpu")
    ids = torch.randint(0, 1000, (1, 32))
    torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=0, atol=0)


def test_library_callers_get_plain_exception_types(files):
    """UsageError is a ValueError (a missing input also a FileNotFoundError): Python callers catch
    what they always caught."""
    from sinklora_ext.data import resolve_text_path
    from sinklora_ext.usage import MissingInput, UsageError

    with pytest.raises(FileNotFoundError, match="--text: no such file"):
        resolve_text_path(files["missing"])
    with pytest.raises(ValueError, match="binary file"):
        resolve_text_path(files["binary"])
    assert issubclass(MissingInput, UsageError) and issubclass(UsageError, ValueError)
    assert str(UsageError("two\nlines")) == "two lines"


def test_real_bugs_keep_their_traceback(monkeypatch, text_file):
    """Only UsageError becomes exit code 2: any other exception propagates."""
    from sinklora_ext import data

    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(data, "resolve_text_path", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["eval-ppl", "--text", text_file, "--context", "64"])


# One real process per subcommand family: exit code 2, one error line and nothing else, no traceback.
SUBPROCESS_CASES = {
    "train": ["train", "--data", "{binary}", "--context", "64"],
    "eval-ppl": ["eval-ppl", "--text", "{latin1}", "--context", "64"],
    "eval-kv": ["eval-kv", "--text", "{directory}", "--context", "64", "--kv-budget", "0"],
    "generate": ["generate", "--prompt", "Debian", "--top-p", "0"],
    "demo": ["demo", "--kv-budget", "-1"],
    "bench": ["bench", "decode", "--batch", "-2"],
}


def test_real_processes_exit_2_without_a_traceback(files, text_file):
    names = list(SUBPROCESS_CASES)
    for batch in (names[:3], names[3:]):  # three processes at a time
        procs = {name: subprocess.Popen([sys.executable, "-m", "sinklora_ext.cli",
                                         *_expand(SUBPROCESS_CASES[name], dict(files, text=text_file))],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=SUBPROCESS_ENV, cwd=REPO)
                 for name in batch}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert_usage_error(proc.returncode, err, "error:")
            assert len(err.strip().splitlines()) == 1 and out == "", (name, out, err)


# ----------------------------------------------------------------------------------------------
# train killed with SIGKILL, then --resume
# ----------------------------------------------------------------------------------------------


def _train_cmd(model: str, text: str, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sinklora_ext.cli", "train", "--data", text, "--context", "128", "--max-windows",
            "4", "--model", model, "--output", str(output), "--no-gradient-checkpointing", "--no-shuffle",
            "--warmup-steps", "0", "--lr", "1e-2", "--json", *extra]


def _run_until(cmd: list[str], env: dict, log: Path, stderr_line: str | None = None, until=None,
               timeout: float = 300) -> None:
    """Start ``cmd`` (stderr to ``log``); SIGKILL it once its stderr shows ``stderr_line`` or
    ``until()`` holds. Fails if it ends by itself first."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (stderr_line is not None and stderr_line in log.read_text()) or (until is not None and until()):
                break
            time.sleep(0.01)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _run(cmd: list[str]) -> tuple[dict, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _marked(work_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in work_dir.glob("checkpoint-*/sinklora_checkpoint.json"))


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_train_killed_while_saving_and_mid_step_resumes_from_complete_checkpoints(tmp_path, models, text_file,
                                                                                   capsys):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    work = tmp_path / "run.checkpoints"
    log = tmp_path / "stderr.log"

    # 1. killed while writing checkpoint-2: checkpoint-1 is complete, checkpoint-2 is not
    _run_until(_train_cmd(models["tiny"], text_file, out, "--steps", "200", "--save-steps", "1"),
               dict(SUBPROCESS_ENV, SINKLORA_TEST_SAVE_PAUSE="1"), log,
               stderr_line=f"{work / 'checkpoint-2'} is complete")
    assert _marked(work) == [1] and (work / "checkpoint-2").is_dir() and not out.exists()
    code, err = sinklora(["eval-ppl", "--text", text_file, "--context", "64", "--adapter", str(work / "checkpoint-2")],
                         capsys)
    assert_usage_error(code, err, "--adapter", "is an incomplete `sinklora train` checkpoint")
    # make the unmarked checkpoint truly half-written: reading it would fail
    (work / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (work / "checkpoint-2" / "trainer_state.json").unlink()

    # 2. resumed from checkpoint-1 (checkpoint-2 removed), then killed mid-step once checkpoint-3 is marked
    _run_until(_train_cmd(models["tiny"], text_file, out, "--steps", "200", "--save-steps", "1", "--resume"),
               SUBPROCESS_ENV, log, until=lambda: 3 in _marked(work))
    err = log.read_text()
    assert f"resuming from {work / 'checkpoint-1'}" in err and f"removing the incomplete checkpoint {work}" in err
    newest = _marked(work)[-1]
    assert newest >= 3 and not out.exists()

    # 3. resumed again and killed while writing its output over an earlier adapter: that one stays whole
    previous = _digest(Path(models["adapter"]))
    out.mkdir()
    for f in Path(models["adapter"]).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    _run_until(_train_cmd(models["tiny"], text_file, out, "--steps", str(newest + 1), "--resume"),
               dict(SUBPROCESS_ENV, SINKLORA_TEST_SAVE_PAUSE="60"), log, stderr_line=f"before {out} is complete")
    assert _digest(out) == previous
    assert list(tmp_path.glob("run.tmp-*")), "the killed save left its temporary directory"

    # 4. resumed to the end: one step after the newest complete checkpoint, a whole new output, no debris
    summary, err = _run(_train_cmd(models["tiny"], text_file, out, "--steps", str(newest + 1), "--resume"))
    assert f"resuming from {work / f'checkpoint-{newest}'}" in err
    assert [step for step, _ in summary["losses"]] == [newest + 1] and summary["steps"] == newest + 1
    assert _digest(out) != previous and json.loads((out / "sinklora.json").read_text())["context"] == 128
    assert not list(tmp_path.glob("run.tmp-*")) and not (tmp_path / "run.old").exists()

    # 5. three kills later, the adapter is bit for bit the one of a run never killed (a process
    # launched the same way: the test's own process may use other threads and kernels)
    reference = tmp_path / "reference"
    _run(_train_cmd(models["tiny"], text_file, reference, "--steps", str(newest + 1)))
    expected, adapter = load_file(reference / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for name in expected:
        assert torch.equal(adapter[name], expected[name]), name


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, files, text_file, capsys):
    """A complete checkpoint written with another rank (or model, context, pattern) is refused before
    any model loads; a run without complete checkpoints starts from the beginning."""
    checkpoint = tmp_path / "run.checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    run = {"model": None, "context": 64, "original_context": None, "attn": "sf", "group_ratio": 0.25, "sinks": None,
           "lora_r": 16, "lora_alpha": 16}
    (checkpoint / "sinklora_checkpoint.json").write_text(json.dumps({"step": 3, "run": run}))
    argv = ["train", "--data", text_file, "--context", "64", "--steps", "5", "--output", str(tmp_path / "run"),
            "--resume"]
    code, err = sinklora(argv, capsys)
    assert_usage_error(code, err, "--resume:", "another run", "--lora-r 16 there, 8 here")
    code, err = sinklora(_with(argv, "--lora-r", "16", "--steps", "2"), capsys)
    assert_usage_error(code, err, "--steps (2) must be >= the step of the checkpoint resumed (3")
    (checkpoint / "sinklora_checkpoint.json").write_text("{")
    code, err = sinklora(_with(argv, "--lora-r", "16"), capsys)
    assert_usage_error(code, err, "--resume", "not valid JSON")

    from sinklora_ext import train

    (checkpoint / "sinklora_checkpoint.json").unlink()
    assert train._resume_point(cli.parse(argv), checkpoint.parent) is None
    assert not checkpoint.exists() and "no complete checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# msa_conv2d (docs/msa_conv.md#errors): a ValueError naming the argument and the rule


def _msa_call(shape=(1, 6, 7, 2, 8), kernel_size=3, dilation=1, padding="zero", kv_shift=None, **tensors):
    from sinklora_ext import msa_conv2d

    qkv = {name: torch.randn(shape) for name in "qkv"}
    qkv.update(tensors)
    return lambda: msa_conv2d(qkv["q"], qkv["k"], qkv["v"], kernel_size, dilation, padding, kv_shift)


MSA_CASES = [
    ("even_kernel", dict(kernel_size=4), "kernel_size must be odd and >= 1"),
    ("even_kernel_pair", dict(kernel_size=(3, 2)), "kernel_size must be odd and >= 1"),
    ("zero_kernel", dict(kernel_size=0), "kernel_size must be odd and >= 1"),
    ("negative_kernel", dict(kernel_size=(-3, 3)), "kernel_size must be odd and >= 1"),
    ("kernel_triple", dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair of ints"),
    ("kernel_float", dict(kernel_size=3.0), "kernel_size must be an int or a pair of ints"),
    ("zero_dilation", dict(dilation=0), "dilation must be >= 1"),
    ("negative_dilation", dict(dilation=(1, -2)), "dilation must be >= 1"),
    ("bool_dilation", dict(dilation=True), "dilation must be an int or a pair of ints"),
    ("k_shape", dict(k=torch.randn(1, 6, 8, 2, 8)), "k must have q's shape"),
    ("v_head_dim", dict(v=torch.randn(1, 6, 7, 2, 4)), "v must have q's shape"),
    ("k_dtype", dict(k=torch.randn(1, 6, 7, 2, 8, dtype=torch.float16)), "k has dtype Half but q has dtype Float"),
    ("float64", dict(q=torch.randn(1, 6, 7, 2, 8, dtype=torch.float64)), "q must be float32, float16 or bfloat16"),
    ("q_rank", dict(q=torch.randn(6, 7, 2, 8)), "q must be [B, H, W, heads, D]"),
    ("head_dim_too_big", dict(shape=(1, 3, 3, 1, 257)), "head_dim must be in [1, 256]"),
    ("bad_padding", dict(padding="reflect"), "padding must be one of 'zero', 'mask', 'clamp'"),
    ("padding_not_a_string", dict(padding=0), "padding must be one of"),
    ("clamp_window_larger_than_map", dict(padding="clamp", kernel_size=7), "padding='clamp' requires kernel_size"),
    ("clamp_dilated_window_larger", dict(padding="clamp", kernel_size=3, dilation=(1, 3)),
     "padding='clamp' requires kernel_size * dilation <= the map"),
    ("shift_rows", dict(kv_shift=[[0, 0]]), "kv_shift must be [heads, 2] integers with heads = 2"),
    ("shift_columns", dict(kv_shift=[[0, 0, 0], [1, 1, 1]]), "kv_shift must be [heads, 2] integers"),
    ("shift_flat", dict(kv_shift=[0, 0, 1, 1]), "kv_shift must be [heads, 2] integers"),
    ("shift_float", dict(kv_shift=[[0.5, 0], [1, 1]]), "kv_shift must be [heads, 2] integers"),
    ("shift_bool", dict(kv_shift=[[True, False], [1, 1]]), "kv_shift must be [heads, 2] integers"),
    ("shift_float_tensor", dict(kv_shift=torch.zeros(2, 2)), "kv_shift must be [heads, 2] integers, got dtype"),
    ("shift_bool_tensor", dict(kv_shift=torch.zeros(2, 2, dtype=torch.bool)), "got dtype torch.bool"),
    ("shift_tensor_shape", dict(kv_shift=torch.zeros(2, 3, dtype=torch.long)), "got shape (2, 3)"),
]


@pytest.mark.parametrize("over, fragment", [c[1:] for c in MSA_CASES], ids=[c[0] for c in MSA_CASES])
def test_msa_conv2d_refuses(over, fragment):
    with pytest.raises(ValueError, match="msa_conv2d: ") as raised:
        _msa_call(**over)()
    assert fragment in str(raised.value), str(raised.value)
    assert "\n" not in str(raised.value).strip()


def test_msa_conv2d_op_refuses_directly():
    """The ops check on their own (a caller that skips the wrapper), and the backward checks lse."""
    q = torch.randn(1, 5, 5, 2, 8)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        torch.ops.sinklora_ext.msa_conv2d_fwd(q, q, q, [2, 3], [1, 1], "zero", None, 1.0)
    with pytest.raises(ValueError, match="kv_shift must be \\[heads, 2\\] integers"):
        torch.ops.sinklora_ext.msa_conv2d_fwd(q, q, q, [3, 3], [1, 1], "zero", [1, 2, 3], 1.0)
    out, lse = torch.ops.sinklora_ext.msa_conv2d_fwd(q, q, q, [3, 3], [1, 1], "zero", None, 1.0)
    with pytest.raises(ValueError, match="msa_conv2d_bwd: lse must be contiguous float32"):
        torch.ops.sinklora_ext.msa_conv2d_bwd(out, q, q, q, out, lse[:, :4], [3, 3], [1, 1], "zero", None, 1.0)
    with pytest.raises(ValueError, match="dout must have q's shape"):
        torch.ops.sinklora_ext.msa_conv2d_bwd(out[:, :4], q, q, q, out, lse, [3, 3], [1, 1], "zero", None, 1.0)
