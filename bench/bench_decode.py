"""Paged decode with fused H2O scores vs SDPA, FlashInfer. Same as `sinklora bench decode`."""

import argparse

from sinklora_ext import bench_decode

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench_decode.__doc__)
    bench_decode.add_arguments(parser)
    bench_decode.main(parser.parse_args())
