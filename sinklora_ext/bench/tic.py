"""The TiC experiment: Fashion-MNIST test accuracy of ``tic-micro`` with this project's reading of
the paper's two mechanisms (the cyclic K/V shift and inter-pooling), its ablations, and what a user
would pick instead (a plain CNN, a small ViT with learned positional embeddings), each trained the
same way (``sinklora tic-train``: same data, epochs, batch, schedule, seeds), then every model run at
other resolutions without retraining (``sinklora tic-eval``; the ViT interpolates its positional
embeddings). Reported per variant: parameters, mean and spread over the seeds of the accuracy at
each resolution, and the loss of accuracy from the training resolution. A TiC is tested twice
from the same weights: with its windows scaled to the image (``tic-eval --windows scaled``, its
row named after the variant) and fixed in pixels (the row ``<variant> fixed-windows``).
Run: ``sinklora bench tic [--json]`` or ``python -m sinklora_ext.bench.tic``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..cli.options import DeviceOptions, option
from ..usage import UsageError, check_output_dir

# variant -> the tic-train settings that make it
VARIANTS: dict[str, dict] = {
    "tic": dict(model="tic-micro", shift="cross", inter_pool=True),
    "tic-no-shift": dict(model="tic-micro", inter_pool=True),
    "tic-no-pool": dict(model="tic-micro", shift="cross"),
    "tic-plain": dict(model="tic-micro"),
    "cnn-micro": dict(model="cnn-micro"),
    "vit-micro": dict(model="vit-micro"),
}


def _int_list(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise UsageError(f"{flag} must be comma-separated integers >= {minimum}, got {text!r}")
    return values


@dataclass(kw_only=True)
class TicBenchConfig(DeviceOptions):
    """`sinklora bench tic`: every variant trained with every seed, then tested at every resolution."""

    variants: str = option(",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    seeds: str = option("0,1,2", help="comma-separated seeds; each variant is trained once per seed")
    epochs: int | None = option(None, minimum=1, help="epochs per run (default: tic-train's)")
    resolution: int = option(28, minimum=1, help="training resolution")
    test_resolutions: str = option("28,42,56", help="comma-separated test resolutions (same weights)")
    batch_size: int = option(128, minimum=1)
    lr: float = option(2e-3, positive=True)
    limit_train: int | None = option(None, minimum=1, help="train on the first N training images only")
    limit_test: int | None = option(None, minimum=1, help="test on the first N test images only")
    output: str | None = option(None, help="keep every run's checkpoint under DIR/<variant>-seed<S>; a run "
                                           "whose checkpoint is there is resumed (complete: only tested)")
    no_progress: bool = option(False, help="no progress bars")

    def check(self) -> None:
        super().check()
        unknown = [v for v in self.variant_names if v not in VARIANTS]
        if unknown or not self.variant_names:
            raise UsageError(f"--variants: unknown {', '.join(map(repr, unknown)) or 'empty list'} "
                             f"(choose from {', '.join(VARIANTS)})")
        _int_list(self.seeds, "--seeds", 0)
        _int_list(self.test_resolutions, "--test-resolutions", 1)
        if self.output is not None:
            check_output_dir(Path(self.output).expanduser())

    @property
    def variant_names(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _row(name: str, windows: str | None, runs: list[dict], resolutions: list[int], trained_at: int) -> dict:
    accuracy = {str(r): statistics.fmean(run["accuracy"][str(r)] for run in runs) for r in resolutions}
    spread = {str(r): _spread([run["accuracy"][str(r)] for run in runs]) for r in resolutions}
    drop = ({r: accuracy[str(trained_at)] - a for r, a in accuracy.items() if r != str(trained_at)}
            if str(trained_at) in accuracy else {})
    return dict(variant=name if windows in (None, "scaled") else f"{name} {windows}-windows", **VARIANTS[name],
                windows=windows, params=runs[0]["params"], accuracy=accuracy, accuracy_std=spread, drop=drop,
                seconds_per_epoch=statistics.fmean(r["seconds_per_epoch"] for r in runs), runs=runs)


def run(config: TicBenchConfig) -> dict:
    from ..tic.model import PRESETS
    from ..tic.train import DEFAULT_EPOCHS, WINDOWS, TicEvalConfig, TicTrainConfig, evaluate, train

    seeds = _int_list(config.seeds, "--seeds", 0)
    resolutions = _int_list(config.test_resolutions, "--test-resolutions", 1)
    epochs = config.epochs or DEFAULT_EPOCHS
    with tempfile.TemporaryDirectory(prefix="sinklora-bench-tic-") as scratch:
        root = Path(config.output).expanduser() if config.output else Path(scratch)
        rows = []
        for name in config.variant_names:
            runs = {}  # windows -> one dict per seed
            for seed in seeds:
                out = root / f"{name}-seed{seed}"
                began = time.perf_counter()
                trained = train(TicTrainConfig(**VARIANTS[name], epochs=epochs, resolution=config.resolution,
                                               output=str(out), batch_size=config.batch_size, lr=config.lr,
                                               limit_train=config.limit_train, limit_test=config.limit_test,
                                               seed=seed, resume=config.output is not None, device=config.device,
                                               dtype=config.dtype, no_progress=config.no_progress))
                for windows in (WINDOWS if VARIANTS[name]["model"] in PRESETS else (None,)):
                    tested = evaluate(TicEvalConfig(checkpoint=str(out), resolution=",".join(map(str, resolutions)),
                                                    windows=windows or "scaled", limit_test=config.limit_test,
                                                    device=config.device, dtype=config.dtype,
                                                    no_progress=config.no_progress))
                    runs.setdefault(windows, []).append(dict(
                        seed=seed, accuracy=tested["accuracy"], params=trained["params"],
                        seconds_per_epoch=trained["seconds_per_epoch"], last_loss=trained["last_loss"],
                        seconds=round(time.perf_counter() - began, 1)))
                    print(f"bench tic: {name} seed {seed}{f', {windows} windows' if windows else ''}: " + ", ".join(
                        f"{r}px {a:.4f}" for r, a in tested["accuracy"].items()), file=sys.stderr, flush=True)
            for windows, variant_runs in runs.items():
                rows.append(_row(name, windows, variant_runs, resolutions, config.resolution))
    setup = dict(dataset="fashion-mnist", epochs=epochs, resolution=config.resolution, seeds=seeds,
                 test_resolutions=resolutions, batch_size=config.batch_size, lr=config.lr,
                 limit_train=config.limit_train, limit_test=config.limit_test, device=config.device or "auto",
                 dtype=config.dtype or "auto")
    return {"config": setup, "rows": rows}


def format_table(result: dict) -> str:
    c = result["config"]
    resolutions = [str(r) for r in c["test_resolutions"]]
    trained_at = str(c["resolution"])
    head = f"{'variant':<27}{'params':>9}" + "".join(f"{r + 'px':>24}" for r in resolutions) + f"{'s/epoch':>9}"
    lines = [f"Fashion-MNIST, trained at {trained_at}px for {c['epochs']} epochs, seeds {c['seeds']} "
             f"(accuracy mean ± std; in brackets the loss from {trained_at}px)", head]
    for row in result["rows"]:
        cells = []
        for r in resolutions:
            cell = f"{row['accuracy'][r]:.4f}±{row['accuracy_std'][r]:.4f}"
            if r in row["drop"]:
                cell += f" [{-row['drop'][r]:+.3f}]"
            cells.append(f"{cell:>24}")
        lines.append(f"{row['variant']:<27}{row['params']:>9,}" + "".join(cells) + f"{row['seconds_per_epoch']:>9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["bench", "tic", *sys.argv[1:]]))
