"""The `sinklora` command line (SPEC §4)."""

from __future__ import annotations

import argparse
import sys


def _bench(args) -> None:
    if args.bench_target == "attention":
        from . import bench_attention

        bench_attention.main(args)


def _train(args) -> None:
    from . import train

    train.main(args)


def _eval_ppl(args) -> None:
    from . import evaluate

    evaluate.run_eval_ppl(args)


def _eval_passkey(args) -> None:
    from . import evaluate

    evaluate.run_eval_passkey(args)


def _demo(args) -> None:
    from . import demo

    demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinklora", description="SinkLoRA: SF-Attn kernels, LoRA+ and H2O decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import evaluate, train

    train_parser = sub.add_parser("train", help="LoRA+ context-extension fine-tuning with an attention pattern")
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=_train)

    ppl = sub.add_parser("eval-ppl", help="perplexity over consecutive windows of a text file")
    evaluate.add_eval_ppl_arguments(ppl)
    ppl.set_defaults(func=_eval_ppl)

    passkey = sub.add_parser("eval-passkey", help="passkey retrieval accuracy (LongLoRA's test)")
    evaluate.add_eval_passkey_arguments(passkey)
    passkey.set_defaults(func=_eval_passkey)

    bench = sub.add_parser("bench", help="benchmarks against the peers (see bench/)")
    bench_sub = bench.add_subparsers(dest="bench_target", required=True)
    from . import bench_attention

    bench_attention.add_arguments(bench_sub.add_parser("attention", help="SF-Attn vs SDPA, FlexAttention, LongLoRA"))
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="show the attention patterns, check the op and time it")
    demo.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
