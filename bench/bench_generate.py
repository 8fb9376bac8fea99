"""Model decode latency: paged full / h2o / streaming vs transformers generate. Same as
`sinklora bench generate`."""

import argparse

from sinklora_ext import bench_generate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench_generate.__doc__)
    bench_generate.add_arguments(parser)
    bench_generate.main(parser.parse_args())
