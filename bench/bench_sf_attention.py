"""SF-Attn vs torch SDPA, FlexAttention and LongLoRA's S²-Attn. Same as `sinklora bench attention`."""

import argparse

from sinklora_ext import bench_attention

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench_attention.__doc__)
    bench_attention.add_arguments(parser)
    bench_attention.main(parser.parse_args())
