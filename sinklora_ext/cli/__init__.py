"""The `sinklora` command line (docs/cli.md): one subcommand per library function.

Each command is a typed configuration (a :class:`~sinklora_ext.cli.options.Config` dataclass whose
fields are its flags) and the library function that takes it and returns a dict. The rules every
command shares are written here once: ``--json`` prints the returned dict as one JSON object on the
last stdout line (after the command's human summary); under a distributed launcher only rank 0
prints; bad input (a :class:`~sinklora_ext.usage.UsageError`) ends as argparse ends, one
``sinklora: error: ...`` line on stderr and exit code 2 (docs/errors.md).

Layout: ``cli/options.py`` (the config <-> argparse mechanism and the shared option groups),
``cli/__main__.py`` (``python -m sinklora_ext.cli``). The commands' configs live beside their
functions: ``train.TrainConfig``, ``evaluate.EvalPplConfig`` / ``EvalKVConfig`` / ``PasskeyConfig``,
``generate.GenerateConfig``, ``demo.DemoConfig``, ``tic.train.TicTrainConfig`` / ``TicEvalConfig``,
``bench.<target>.<Target>BenchConfig``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from ..usage import UsageError

__all__ = ["Command", "main", "build_parser", "parse", "commands", "benchmarks"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its config class, the function that runs a config and returns a dict, and the
    human summary of that dict (None: the function printed its own)."""

    name: str
    help: str
    config: type
    run: Callable[..., dict]
    summary: Callable[[dict], str] | None = None
    streams: bool = False  # run(config, stream=True) writes its output as it comes (without --json)


def commands() -> tuple[Command, ...]:
    # imported here: the modules import cli.options, which imports this package first
    from .. import demo, evaluate, generate, train
    from ..tic import train as tic

    return (
        Command("train", "LoRA+ context-extension fine-tuning with an attention preset", train.TrainConfig,
                train.train, train.summary),
        Command("eval-ppl", "perplexity over consecutive windows of a text file", evaluate.EvalPplConfig,
                evaluate.run_eval_ppl, evaluate.ppl_summary),
        Command("eval-passkey", "passkey retrieval accuracy (LongLoRA's test)", evaluate.PasskeyConfig,
                evaluate.run_eval_passkey, evaluate.passkey_summary),
        Command("eval-kv", "perplexity of teacher-forced decoding through the paged H2O cache", evaluate.EvalKVConfig,
                evaluate.run_eval_kv, evaluate.kv_summary),
        Command("generate", "generate text through the paged cache (full / h2o / streaming)",
                generate.GenerateConfig, generate.generate, streams=True),
        Command("demo", "LoRA+ fine-tune with SF-Attn, then decode with full / H2O / streaming caches",
                demo.DemoConfig, demo.demo),
        Command("tic-train", "train a TiC (MSA-Conv) image classifier on Fashion-MNIST or an image folder",
                tic.TicTrainConfig, tic.train, tic.train_summary),
        Command("tic-eval", "test accuracy of a tic-train checkpoint at several resolutions", tic.TicEvalConfig,
                tic.evaluate, tic.eval_summary),
    )


def benchmarks() -> tuple[Command, ...]:
    from ..bench import attention, decode, extension, generate, kv_quality, msa_conv, tic, vllm

    return (
        Command("attention", "SF-Attn vs SDPA, FlexAttention, LongLoRA", attention.AttentionBenchConfig,
                attention.run, attention.format_table),
        Command("decode", "paged H2O decode vs SDPA, FlashInfer", decode.DecodeBenchConfig, decode.run,
                decode.format_table),
        Command("generate", "model decode latency: paged full / h2o / streaming vs transformers generate",
                generate.GenerateBenchConfig, generate.run, generate.format_table),
        Command("kv-quality", "eviction policies vs the full cache: perplexity and passkey at budgets of the context",
                kv_quality.KvQualityBenchConfig, kv_quality.run, kv_quality.format_table),
        Command("extension", "SinkLoRA's experiment: recovery ratio of each preset after LoRA+ context extension",
                extension.ExtensionBenchConfig, extension.run, extension.format_table),
        Command("msa-conv", "MSA-Conv vs the unfold reference, compiled FlexAttention, NATTEN",
                msa_conv.MsaConvBenchConfig, msa_conv.run, msa_conv.format_table),
        Command("tic", "TiC's experiment: Fashion-MNIST accuracy of tic-micro, its ablations, a CNN and a ViT, at "
                "several resolutions", tic.TicBenchConfig, tic.run, tic.format_table),
        Command("vllm", "vLLM's own CPU backend vs the SINKLORA backend (h2o, streaming) in the same KV memory",
                vllm.VllmBenchConfig, vllm.run, vllm.format_table),
    )


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def _add_command(sub, command: Command) -> None:
    parser = sub.add_parser(command.name, help=command.help)
    command.config.add_cli_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.set_defaults(func=functools.partial(run_command, command), command_spec=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinklora", description="SinkLoRA: SF-Attn kernels, LoRA+ and H2O decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands():
        _add_command(sub, command)
    bench = sub.add_parser("bench", help="benchmarks against the peers (results in bench/)")
    targets = bench.add_subparsers(dest="bench_target", required=True)
    for command in benchmarks():
        _add_command(targets, command)
    return parser


def parse(argv: list[str]):
    """The config of a command line (``["train", "--data", ...]``), checked."""
    args = build_parser().parse_args(argv)
    return args.command_spec.config.from_cli_args(args)


def run_command(command: Command, args: argparse.Namespace) -> dict:
    """Build the config from parsed arguments, run it, print the summary (and with ``--json`` the
    result as the last stdout line); returns the result."""
    config = command.config.from_cli_args(args)
    result = command.run(config, stream=not args.json) if command.streams else command.run(config)
    if is_main_process():
        line = command.summary(result) if command.summary is not None else None
        if line:
            print(line, flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        print(f"sinklora: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
