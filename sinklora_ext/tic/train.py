"""`sinklora tic-train` and `sinklora tic-eval`: train a TiC (or baseline) image classifier and
measure it at several resolutions (docs/tic.md; flags in docs/cli.md).

``train(TicTrainConfig(...))`` and ``evaluate(TicEvalConfig(...))`` are the library calls. One
process, or data-parallel under ``torchrun`` / ``accelerate launch`` (DDP; gloo on the CPU):
``--batch-size`` is the global batch, split evenly over the processes, each reading its share of
the same seeded permutation (``DistributedSampler``), so N processes train the weights one process
trains. Evaluation counts are all-reduced; only rank 0 writes.

The output directory is the checkpoint: ``model.pt`` (weights), ``tic.json`` (how to rebuild the
model: a TiC's full constructor arguments, a baseline's name; the input normalisation, the epoch
reached) and ``training.pt`` (optimizer, schedule). It
is rewritten after every epoch into a temporary sibling, fsynced and renamed into place, so it is
always a complete epoch (``sinklora_ext.atomic``). ``--resume`` continues from it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..atomic import atomic_directory
from ..cli import is_main_process
from ..cli.options import DeviceOptions, option
from ..usage import INT32_MAX, MissingInput, UsageError, check_output_dir, read_json_file
from .data import FASHION_MNIST, load_dataset
from .layers import SHIFT_SCHEMES
from .model import PRESETS, TiC, build_model, count_parameters, model_names

__all__ = ["TicTrainConfig", "TicEvalConfig", "train", "evaluate", "load_checkpoint", "train_summary",
           "eval_summary", "DEFAULT_EPOCHS", "METADATA", "WINDOWS"]

METADATA = "tic.json"
WEIGHTS = "model.pt"
TRAINING_STATE = "training.pt"
WINDOWS = ("scaled", "fixed")
DEFAULT_EPOCHS = 6  # tic-micro: 91.5% Fashion-MNIST test accuracy, about 100 s an epoch on 2 CPU cores
# what a resumed run must share with the run that wrote the checkpoint
RUN_SETTINGS = ("dataset", "model", "resolution", "batch_size", "lr", "weight_decay", "seed", "limit_train", "shift",
                "inter_pool", "epochs")


def _check_model(name: str, shift, inter_pool) -> None:
    names = model_names()
    if name not in names:
        raise UsageError(f"--model: unknown model {name!r} (choose from {', '.join(names)})")
    if name not in PRESETS and (shift is not None or inter_pool):
        raise UsageError(f"--shift and --inter-pool apply to the TiC presets ({', '.join(sorted(PRESETS))}), "
                         f"not to the baseline {name!r}")


@dataclass(kw_only=True)
class TicTrainConfig(DeviceOptions):
    """Everything `sinklora tic-train` takes; each field is the flag of its name (docs/tic.md)."""

    dataset: str = option(FASHION_MNIST, help="fashion-mnist (Debian's dataset-fashion-mnist) or a folder of "
                                              "class subdirectories of images")
    model: str = option("tic-micro", help="a TiC preset (tic-micro, tic-tiny) or a baseline (sinklora_ext.tic)")
    epochs: int = option(DEFAULT_EPOCHS, minimum=1, help=f"passes over the training images (default {DEFAULT_EPOCHS})")
    resolution: int = option(28, minimum=1, help="train (and test) at RxR: images are resized bilinearly")
    output: str = option("tic-out", help="output directory: the checkpoint, rewritten after every epoch")
    batch_size: int = option(128, minimum=1, help="global batch (split over the processes of a distributed launch)")
    lr: float = option(2e-3, positive=True, help="peak AdamW learning rate (warmup, then cosine to 0)")
    weight_decay: float = option(0.05, help="AdamW weight decay")
    shift: str | None = option(None, choices=sorted(SHIFT_SCHEMES), help="cyclic K/V shift scheme of every "
                                                                           "MSA-Conv (default: none)")
    inter_pool: bool = option(False, help="half of the heads of every MSA-Conv attend over the 2x pooled map")
    limit_train: int | None = option(None, minimum=1, help="train on the first N training images only")
    limit_test: int | None = option(None, minimum=1, help="test on the first N test images only")
    seed: int = option(0, help="weights and data order")
    resume: bool = option(False, help="continue from the checkpoint in --output (none: start over)")
    no_progress: bool = option(False, help="no progress bars")

    def check(self) -> None:
        super().check()
        _check_model(self.model, self.shift, self.inter_pool)
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.epochs * max(1, (self.limit_train or 60000) // self.batch_size) > INT32_MAX:
            raise UsageError(f"--epochs x steps per epoch must be <= {INT32_MAX}")

    def run_settings(self) -> dict:
        return {name: getattr(self, name) for name in RUN_SETTINGS}


def _parse_resolutions(text) -> list[int]:
    values = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        resolutions = [int(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"--resolution must be comma-separated integers >= 1 (e.g. 28,42,56), got {text!r}") from None
    if not resolutions or min(resolutions) < 1 or max(resolutions) > 4096:
        raise UsageError(f"--resolution must be comma-separated integers in [1, 4096] (e.g. 28,42,56), got {text!r}")
    return resolutions


@dataclass(kw_only=True)
class TicEvalConfig(DeviceOptions):
    """Everything `sinklora tic-eval` takes; each field is the flag of its name (docs/tic.md)."""

    checkpoint: str = option(help="a `sinklora tic-train` output directory")
    resolution: str = option("28", help="comma-separated test resolutions, e.g. 28,42,56 (same weights)")
    windows: str = option("scaled", choices=WINDOWS, help="a TiC's windows at other resolutions: scaled (every "
                                                         "dilation times the image's size over the training "
                                                         "resolution, rounded) or fixed in pixels")
    dataset: str | None = option(None, help="default: the dataset the checkpoint was trained on")
    batch_size: int = option(256, minimum=1)
    limit_test: int | None = option(None, minimum=1, help="test on the first N test images only")
    no_progress: bool = option(False, help="no progress bars")

    def check(self) -> None:
        super().check()
        _parse_resolutions(self.resolution)

    @property
    def resolutions(self) -> list[int]:
        return _parse_resolutions(self.resolution)


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------


def _device(config: DeviceOptions) -> torch.device:
    """``--device``; a process of a launch on GPUs without an index takes its LOCAL_RANK's."""
    device = config.resolved_device()
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _autocast(config: DeviceOptions, device: torch.device):
    """``--dtype`` other than float32: the forward runs under autocast (weights stay float32)."""
    dtype = config.resolved_dtype()
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class _Processes:
    """The distributed group of a torchrun / accelerate launch (joined here when the launcher set
    WORLD_SIZE > 1 and nobody joined yet), or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.joined = False
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.joined = True

    def all_sum(self, values: list[float], device) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.joined:
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _save(output: Path, model, meta: dict, training_state: dict) -> None:
    with atomic_directory(output) as tmp:
        torch.save(model.state_dict(), tmp / WEIGHTS)
        torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2))


def _read_meta(directory: Path, argument: str) -> dict:
    path = directory / METADATA
    if not directory.is_dir():
        raise MissingInput(f"{argument}: no such directory: {directory}")
    if not path.is_file() or not (directory / WEIGHTS).is_file():
        raise MissingInput(f"{argument}: {directory} is not a `sinklora tic-train` output (no {METADATA} and "
                           f"{WEIGHTS})")
    meta = read_json_file(path, argument)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "name" not in meta["model"]:
        raise UsageError(f"{argument}: {path} is not a `sinklora tic-train` metadata file")
    return meta


def _build(meta_model: dict):
    """The model ``tic.json`` describes: a TiC from its full constructor arguments (so a checkpoint
    does not depend on the presets staying as they are), a baseline by name."""
    if "tic" in meta_model:
        return TiC(**meta_model["tic"])
    return build_model(meta_model["name"], meta_model["num_classes"], meta_model["in_channels"],
                       **meta_model.get("overrides", {}))


def load_checkpoint(directory, device="cpu", argument: str = "--checkpoint"):
    """A `sinklora tic-train` output: (the model with its weights, in eval mode, and ``tic.json``)."""
    directory = Path(directory).expanduser()
    meta = _read_meta(directory, argument)
    model = _build(meta["model"])
    model.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------


def _normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _progress(iterable, total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


@torch.no_grad()
def _accuracy(model, images, labels, batch_size: int, device, processes: _Processes, progress: bool,
              description: str, autocast) -> float:
    """Test accuracy over all processes: each counts its share (rank::world) and the counts are
    summed."""
    model.eval()
    mine = range(processes.rank, len(images), processes.world)
    correct = 0
    starts = range(0, len(mine), batch_size)
    for start in _progress(starts, len(starts), description, progress):
        index = torch.tensor(mine[start:start + batch_size], dtype=torch.long)
        with autocast():
            logits = model(images[index].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[index]).sum())
    correct, total = processes.all_sum([correct, len(mine)], device)
    return correct / total


def _lr_at(step: int, total: int, peak: float) -> float:
    warmup = min(100, max(1, total // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(config: TicTrainConfig) -> dict:
    """Train as ``config`` says; returns the run's summary (accuracy on the test split, params,
    epochs, seconds, seconds_per_epoch, losses per epoch, output, ...)."""
    output = Path(config.output).expanduser()
    check_output_dir(output)
    device = _device(config)
    processes = _Processes(device)
    try:
        return _train(config, output, device, processes)
    finally:
        processes.close()


def _train(config: TicTrainConfig, output: Path, device, processes: _Processes) -> dict:
    if config.batch_size % processes.world:
        raise UsageError(f"--batch-size ({config.batch_size}) must be a multiple of the number of processes "
                         f"({processes.world})")
    progress = not config.no_progress and is_main_process()
    data = load_dataset(config.dataset)
    train_images, train_labels = data.tensors("train", config.resolution, config.limit_train)
    test_images, test_labels = data.tensors("test", config.resolution, config.limit_test)
    mean = train_images.mean(dim=(0, 2, 3)).tolist()
    std = train_images.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist()
    train_images = _normalise(train_images, mean, std)
    test_images = _normalise(test_images, mean, std)

    overrides = {k: v for k, v in (("shift", config.shift), ("inter_pool", config.inter_pool)) if v}
    if config.model in PRESETS:
        overrides["native_resolution"] = config.resolution
    meta_model = dict(name=config.model, num_classes=len(data.classes), in_channels=data.channels,
                      overrides=overrides)
    torch.manual_seed(config.seed)
    model = _build(meta_model).to(device)
    if isinstance(model, TiC):
        meta_model["tic"] = model.config
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    local_batch = config.batch_size // processes.world
    steps_per_epoch = math.ceil(len(train_images) / processes.world / local_batch)
    total_steps = steps_per_epoch * config.epochs

    start_epoch, losses, seconds = 0, [], 0.0
    if config.resume:
        if (output / METADATA).is_file():
            meta = _read_meta(output, "--resume")
            differ = [f"--{name.replace('_', '-')} {meta['run'].get(name)!r} there, {value!r} here"
                      for name, value in config.run_settings().items()
                      if name != "epochs" and meta["run"].get(name) != value]
            if differ:
                raise UsageError(f"--resume: {output} was written by another run ({'; '.join(differ)})")
            if meta["epoch"] > config.epochs:
                raise UsageError(f"--epochs ({config.epochs}) must be >= the epoch of the checkpoint resumed "
                                 f"({meta['epoch']}, {output})")
            model.load_state_dict(torch.load(output / WEIGHTS, map_location=device, weights_only=True))
            state = torch.load(output / TRAINING_STATE, map_location=device, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, losses, seconds = meta["epoch"], meta["losses"], meta["seconds"]
            if is_main_process():
                print(f"sinklora: resuming {output} after epoch {start_epoch}", file=sys.stderr)
        elif is_main_process():
            print(f"sinklora: --resume: no checkpoint in {output}; training from the start", file=sys.stderr)

    trained = model
    if processes.world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
    sampler = torch.utils.data.DistributedSampler(range(len(train_images)), num_replicas=processes.world,
                                                  rank=processes.rank, shuffle=True, seed=config.seed)
    run = config.run_settings()
    autocast = functools.partial(_autocast, config, device)
    accuracy = None
    for epoch in range(start_epoch, config.epochs):
        began = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        trained.train()
        loss_sum = 0.0
        for step in _progress(range(steps_per_epoch), steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                              progress):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * steps_per_epoch + step, total_steps, config.lr)
            index = order[step * local_batch:(step + 1) * local_batch]
            with autocast():
                logits = trained(train_images[index].to(device))
            loss = F.cross_entropy(logits.float(), train_labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
        loss_sum, = processes.all_sum([loss_sum / steps_per_epoch], device)
        losses.append(loss_sum / processes.world)
        seconds += time.perf_counter() - began
        accuracy = _accuracy(model, test_images, test_labels, 256, device, processes, progress, "test", autocast)
        if is_main_process():
            print(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}, "
                  f"{seconds / (epoch + 1):.1f} s/epoch", file=sys.stderr, flush=True)
            meta = dict(model=meta_model, epoch=epoch + 1, resolution=config.resolution, dataset=config.dataset,
                        classes=list(data.classes), mean=mean, std=std, accuracy=accuracy, params=params,
                        losses=losses, seconds=seconds, run=run)
            _save(output, model, meta, {"optimizer": optimizer.state_dict()})
        processes.barrier()
    if accuracy is None:  # resumed a finished run
        accuracy = _accuracy(model, test_images, test_labels, 256, device, processes, progress, "test", autocast)
    return {"accuracy": accuracy, "params": params, "epochs": config.epochs, "seconds": round(seconds, 3),
            "seconds_per_epoch": round(seconds / config.epochs, 3), "losses": losses,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "model": config.model, "resolution": config.resolution, "train_images": len(train_images),
            "test_images": len(test_images), "processes": processes.world, "output": str(output)}


def evaluate(config: TicEvalConfig) -> dict:
    """Test accuracy of a checkpoint at every resolution of ``config`` (the same weights; the test
    images are resized bilinearly; a TiC's windows scaled with the image or fixed, ``--windows``);
    returns {"accuracy": {"28": ...}, "params", "model", ...}."""
    device = _device(config)
    model, meta = load_checkpoint(config.checkpoint, device)
    if isinstance(model, TiC):
        model.native_resolution = meta["resolution"] if config.windows == "scaled" else None
    processes = _Processes(device)
    try:
        data = load_dataset(config.dataset or meta["dataset"])
        if len(data.classes) != meta["model"]["num_classes"] or data.channels != meta["model"]["in_channels"]:
            raise UsageError(f"--dataset: {config.dataset} has {len(data.classes)} classes of {data.channels}-channel "
                             f"images; the checkpoint was trained on {meta['model']['num_classes']} of "
                             f"{meta['model']['in_channels']}")
        progress = not config.no_progress and is_main_process()
        accuracy = {}
        for resolution in config.resolutions:
            images, labels = data.tensors("test", resolution, config.limit_test)
            accuracy[str(resolution)] = _accuracy(model, _normalise(images, meta["mean"], meta["std"]), labels,
                                                  config.batch_size, device, processes, progress, f"{resolution}px",
                                                  functools.partial(_autocast, config, device))
    finally:
        processes.close()
    return {"accuracy": accuracy, "params": count_parameters(model), "model": meta["model"]["name"],
            "trained_resolution": meta["resolution"], "windows": config.windows if isinstance(model, TiC) else None,
            "test_images": len(labels), "checkpoint": str(config.checkpoint)}


def train_summary(result: dict) -> str:
    return (f"trained {result['model']} ({result['params']:,} parameters) for {result['epochs']} epochs at "
            f"{result['resolution']}px: test accuracy {result['accuracy']:.4f}, {result['seconds_per_epoch']} s/epoch; "
            f"saved to {result['output']}")


def eval_summary(result: dict) -> str:
    scores = ", ".join(f"{r}px {a:.4f}" for r, a in result["accuracy"].items())
    windows = f", {result['windows']} windows" if result.get("windows") else ""
    return f"{result['model']} (trained at {result['trained_resolution']}px{windows}): test accuracy {scores}"
