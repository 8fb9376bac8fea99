"""The `sinklora` command line (SPEC §4). Every subcommand prints progress for long work and, with
`--json`, one JSON object as its last stdout line. Bad input (a :class:`~sinklora_ext.usage.UsageError`)
ends as argparse ends: one ``sinklora: error: ...`` line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from .. import demo, evaluate, generate, train
from ..bench import attention as bench_attention, decode as bench_decode, extension as bench_extension
from ..bench import generate as bench_generate
from ..usage import UsageError

# (name, help, add the arguments, run)
COMMANDS = (
    ("train", "LoRA+ context-extension fine-tuning with an attention pattern", train.add_arguments, train.main),
    ("eval-ppl", "perplexity over consecutive windows of a text file", evaluate.add_eval_ppl_arguments,
     evaluate.run_eval_ppl),
    ("eval-passkey", "passkey retrieval accuracy (LongLoRA's test)", evaluate.add_eval_passkey_arguments,
     evaluate.run_eval_passkey),
    ("eval-kv", "perplexity of teacher-forced decoding through the paged H2O cache", evaluate.add_eval_kv_arguments,
     evaluate.run_eval_kv),
    ("generate", "generate text through the paged cache (full / h2o / streaming)", generate.add_arguments, generate.run),
    ("demo", "LoRA+ fine-tune with SF-Attn, then decode with full / H2O / streaming caches", demo.add_arguments,
     demo.main),
)
BENCHMARKS = (
    ("attention", "SF-Attn vs SDPA, FlexAttention, LongLoRA", bench_attention.add_arguments, bench_attention.main),
    ("decode", "paged H2O decode vs SDPA, FlashInfer", bench_decode.add_arguments, bench_decode.main),
    ("generate", "model decode latency: paged full / h2o / streaming vs transformers generate",
     bench_generate.add_arguments, bench_generate.main),
    ("extension", "SinkLoRA's experiment: recovery ratio of each pattern after LoRA+ context extension",
     bench_extension.add_arguments, bench_extension.main),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinklora", description="SinkLoRA: SF-Attn kernels, LoRA+ and H2O decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        add_arguments(command := sub.add_parser(name, help=help_text))
        command.set_defaults(func=run)
    bench = sub.add_parser("bench", help="benchmarks against the peers (see bench/)")
    targets = bench.add_subparsers(dest="bench_target", required=True)
    for name, help_text, add_arguments, run in BENCHMARKS:
        add_arguments(target := targets.add_parser(name, help=help_text))
        target.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        print(f"sinklora: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
