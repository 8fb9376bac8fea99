"""The command line is generated from the typed configs (sinklora_ext.cli.options): every config
field is a flag of its name and every flag a field; a command line round-trips through its config;
the rules on values hold for library callers too; one device / dtype default everywhere; a library
call with a config gives what the command gives; the checkpoint metadata reader."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinklora_ext import cli
from sinklora_ext.cli.options import field_default, to_argv
from sinklora_ext.usage import UsageError, flag

REPO = Path(__file__).resolve().parents[1]
ALL = [(c.name, c) for c in cli.commands()] + [(f"bench {c.name}", c) for c in cli.benchmarks()]


def _subparser(path: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in path.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path, command", ALL, ids=[name for name, _ in ALL])
def test_every_field_is_a_flag_of_its_name_and_back(path, command):
    parser = _subparser(path)
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "json")}
    names = [f.name for f in dataclasses.fields(command.config)]
    assert sorted(options) == sorted(names)
    for name in names:
        assert options[name].option_strings == [flag(name)]
    assert "--json" in parser._option_string_actions  # the one --json rule, on every command


# (command line, fields left at their default: can't be set together with the rest)
EVERY_FLAG = {
    "train": (["--data", "a.txt", "b.json", "--context", "128", "--attn", "s2", "--group-ratio", "0.5", "--sinks", "2",
               "--steps", "7", "--output", "out", "--model", "m", "--original-context", "64", "--lr", "0.001",
               "--warmup-steps", "2", "--batch-size", "2", "--grad-accum", "3", "--lora-r", "4", "--lora-alpha", "8",
               "--max-windows", "5", "--dtype", "bfloat16", "--device", "cpu", "--no-gradient-checkpointing",
               "--save-steps", "2", "--resume", "--deepspeed", "ds.json", "--no-shuffle", "--seed", "1", "--merge",
               "--log-steps", "2"], {"fsdp"}),  # --fsdp excludes --deepspeed and needs a GPU
    "eval-ppl": (["--text", "t.txt", "--context", "64", "--attn", "sf", "--group-ratio", "0.5", "--sinks", "2",
                  "--max-windows", "3", "--batch-size", "2", "--model", "m", "--adapter", "a", "--dtype", "float16",
                  "--device", "cpu", "--no-progress"], set()),
    "eval-passkey": (["--length", "300", "--depth", "0.25", "--trials", "3", "--seed", "2", "--attn", "sf_nowrap",
                      "--group-ratio", "0.5", "--sinks", "1", "--model", "m", "--adapter", "a", "--dtype", "float16",
                      "--device", "cpu", "--no-progress"], set()),
    "eval-kv": (["--text", "t.txt", "--context", "64", "--prefill", "16", "--policy", "streaming", "--kv-budget", "32",
                 "--sinks", "2", "--block-size", "8", "--model", "m", "--adapter", "a", "--dtype", "float16",
                 "--device", "cpu", "--no-progress"], {"recent", "score_decay"}),  # neither applies to streaming
    "generate": (["--prompt", "a", "--prompt", "b", "--max-new-tokens", "5", "--temperature", "0.5", "--top-p", "0.9",
                  "--seed", "3", "--chat", "--static", "--policy", "ema", "--kv-budget", "32", "--sinks", "2",
                  "--recent", "8", "--score-decay", "0.9", "--block-size", "8", "--model", "m", "--adapter", "a", "--dtype", "float16",
                  "--device", "cpu", "--no-progress"], set()),
    "demo": (["--context", "256", "--steps", "3", "--lr", "0.001", "--kv-budget", "64", "--output", "o"], set()),
    "tic-train": (["--dataset", "images", "--model", "tic-tiny", "--epochs", "2", "--resolution", "32", "--output", "o",
                   "--batch-size", "64", "--lr", "0.001", "--weight-decay", "0.1", "--shift", "cross", "--inter-pool",
                   "--limit-train", "10", "--limit-test", "5", "--seed", "1", "--resume", "--dtype", "bfloat16",
                   "--device", "cpu", "--no-progress"], set()),
    "tic-eval": (["--checkpoint", "c", "--resolution", "28,42", "--windows", "fixed", "--dataset", "images", "--batch-size", "8",
                  "--limit-test", "5", "--dtype", "float16", "--device", "cpu", "--no-progress"], set()),
    "bench attention": (["--batch", "2", "--seqlen", "64", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "32",
                         "--group-ratio", "0.5", "--sinks", "2", "--repeats", "2", "--flex", "--quick",
                         "--dtype", "float16", "--device", "cpu"], set()),
    "bench decode": (["--batch", "2", "--context", "64", "--heads-q", "4", "--heads-kv", "2", "--head-dim", "32",
                      "--block-size", "8", "--prefill", "16", "--repeats", "2", "--dtype", "float16",
                      "--device", "cpu"], set()),
    "bench generate": (["--shape", "llama3-8b", "--model", "m", "--batch", "2", "--context", "64", "--budget-frac",
                        "0.5", "--sinks", "2", "--policies", "full,h2o", "--steps", "2", "--warmup", "1",
                        "--block-size", "8", "--eager", "--no-hf", "--dtype", "float16", "--device", "cpu"], set()),
    "bench extension": (["--model", "m", "--context", "128", "--original-context", "64", "--patterns", "full,sf",
                         "--steps", "2", "--lr", "0.001", "--batch-size", "2", "--grad-accum", "2", "--group-ratio",
                         "0.5", "--seed", "1", "--train-text", "a.txt", "b.txt", "--eval-text", "c.txt",
                         "--eval-windows", "2", "--max-windows", "3", "--output", "o", "--no-progress",
                         "--dtype", "float16", "--device", "cpu"], set()),
    "bench msa-conv": (["--sizes", "9", "12", "--batches", "2", "--dilations", "3", "--heads", "2", "--head-dim", "8",
                        "--kernel-size", "5", "--repeats", "2", "--no-flex", "--no-natten", "--dtype", "float16",
                        "--device", "cpu"], set()),
    "bench tic": (["--variants", "tic,cnn-micro", "--seeds", "3,4", "--epochs", "2", "--resolution", "20",
                   "--test-resolutions", "20,30", "--batch-size", "16", "--lr", "0.001", "--limit-train", "10",
                   "--limit-test", "5", "--output", "o", "--dtype", "bfloat16", "--device", "cpu",
                   "--no-progress"], set()),
    "bench vllm": (["--model", "m", "--text", "t.txt", "--requests", "3", "--prompt-tokens", "64", "--new-tokens", "8",
                    "--backends", "vllm,full", "--budget-frac", "0.5", "--kv-budget", "32", "--sinks", "2", "--recent",
                    "8", "--block-size", "64", "--fit-requests", "2", "--kv-blocks", "5", "--dtype", "bfloat16",
                    "--threads", "2", "--no-score", "--engine-timeout", "60", "--output", "o.json"], set()),
    "bench kv-quality": (["--model", "m", "--text", "t.txt", "--prompt-tokens", "64", "--new-tokens", "8", "--windows",
                          "2", "--first-window", "1", "--budgets", "0.5", "--policies", "tova,ema", "--sinks", "2",
                          "--recent-frac", "0.25", "--passkey-trials", "1", "--block-size", "8", "--threads", "1",
                          "--output", "o.json"], set()),
}


def _defaults(config_class) -> dict:
    return {f.name: field_default(f) for f in dataclasses.fields(config_class)}


@pytest.mark.parametrize("path, command", ALL, ids=[name for name, _ in ALL])
def test_every_field_reachable_and_the_command_line_round_trips(path, command):
    argv, unset = EVERY_FLAG[path]
    config = cli.parse([*path.split(), *argv])
    assert type(config) is command.config
    defaults = _defaults(command.config)
    changed = {name for name, default in defaults.items() if getattr(config, name) != default}
    assert changed == set(defaults) - unset
    assert cli.parse([*path.split(), *to_argv(config)]) == config
    assert config.to_argv() == to_argv(config)
    # and the config built by a library caller from the same values
    assert command.config(**dataclasses.asdict(config)) == config


def test_one_device_and_dtype_rule_in_every_command():
    """--device and --dtype default to None (the GPU when there is one; float32 on the CPU, bfloat16
    on a GPU) wherever they are, and resolve through hf.models."""
    from sinklora_ext.hf.models import resolve_device, resolve_dtype

    for path, command in ALL:
        defaults = _defaults(command.config)
        if "device" in defaults:
            assert defaults["device"] is None and defaults["dtype"] is None, path
    config = cli.parse(["bench", "decode", "--batch", "1", "--context", "16"])
    assert config.resolved_device() == resolve_device(None)
    assert config.resolved_dtype() == resolve_dtype(None, None)
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert config.resolved_dtype() == expected


def test_library_callers_get_the_command_line_errors():
    from sinklora_ext.evaluate import EvalKVConfig, PasskeyConfig
    from sinklora_ext.generate import GenerateConfig
    from sinklora_ext.train import TrainConfig

    with pytest.raises(UsageError, match="--context must be >= 2, got 1"):
        TrainConfig(data=["a.txt"], context=1)
    with pytest.raises(UsageError, match="--attn: invalid choice: 'sliding'"):
        TrainConfig(data=["a.txt"], context=64, attn="sliding")
    with pytest.raises(UsageError, match=r"--steps x --grad-accum x --batch-size must be <= 2147483647"):
        TrainConfig(data=["a.txt"], context=64, steps=2**20, grad_accum=2**12)
    with pytest.raises(UsageError, match="--kv-budget is required with --policy h2o"):
        EvalKVConfig(text="t.txt", context=64)
    with pytest.raises(UsageError, match=r"--depth must be in \[0, 1\]"):
        PasskeyConfig(length=100, depth=2.0)
    with pytest.raises(UsageError, match="--prompt must not be empty"):
        GenerateConfig(prompt=[""])
    with pytest.raises(UsageError, match="--dtype: invalid choice"):
        GenerateConfig(prompt=["x"], dtype="float8")
    assert TrainConfig(data="a.txt", context=64).data == ["a.txt"]  # one file as a plain string
    assert TrainConfig(data=["a.txt"], context=100, group_ratio=0.25).group_size == 25  # patterns.group_size_for


def test_library_call_equals_the_command(tiny_model_dir, capsys):
    """run_eval_kv(EvalKVConfig(...)) returns what `sinklora eval-kv ... --json` prints last."""
    from sinklora_ext.evaluate import EvalKVConfig, run_eval_kv

    argv = ["eval-kv", "--text", "debian-reference", "--context", "64", "--policy", "h2o", "--kv-budget", "24",
            "--model", tiny_model_dir, "--device", "cpu", "--no-progress"]
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    printed = json.loads(out[-1])
    assert out[-2].startswith("ppl ") and "(budget 24)" in out[-2]  # the human summary, then the JSON
    result = run_eval_kv(EvalKVConfig(text="debian-reference", context=64, policy="h2o", kv_budget=24,
                                      model=tiny_model_dir, device="cpu", no_progress=True))
    assert capsys.readouterr().out == ""  # the library prints no result
    assert math.isfinite(result["ppl"])
    for timing in ("seconds", "tokens_per_s"):
        printed.pop(timing), result.pop(timing)
    assert printed == json.loads(json.dumps(result))


def test_checkpoint_metadata_one_reader(tmp_path):
    from sinklora_ext.train import CheckpointMeta, read_checkpoint_meta

    assert read_checkpoint_meta(tmp_path) is None
    meta = CheckpointMeta(base_model="m", context=256, rope_factor=2.0, original_context=128, attn="sf",
                          group_ratio=0.25, sinks=None, steps=3, lr=1e-4)
    meta.write(tmp_path)
    assert read_checkpoint_meta(tmp_path) == meta
    (tmp_path / "sinklora.json").write_text(json.dumps({"base_model": 3}))
    with pytest.raises(UsageError, match="'base_model' must be a path or null"):
        read_checkpoint_meta(tmp_path)


def test_python_m_entry_points():
    for module in ("sinklora_ext.cli", "sinklora_ext.bench.decode"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert proc.returncode == 0 and "usage: sinklora" in proc.stdout, proc.stderr[-2000:]
