"""`sinklora tic-train` / `tic-eval` on real Fashion-MNIST subsets: learning, checkpoints (atomic,
resumable), evaluation at several resolutions, image folders, DDP under torchrun, bad flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinklora_ext import cli
from sinklora_ext.tic import train as tic_train

from test_tic import write_png_folder

REPO = Path(__file__).resolve().parents[1]
MULTI_PROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
SMALL = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--no-progress", "--device", "cpu"]


def run_train(argv):
    return tic_train.train(cli.parse(["tic-train", *argv]))


def weights(output) -> dict:
    return torch.load(Path(output) / "model.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("tic") / "micro"
    result = run_train(["--limit-train", "512", "--limit-test", "256", "--batch-size", "64", "--epochs", "2",
                        "--no-progress", "--device", "cpu", "--output", str(output)])
    return result, output


def test_training_on_real_images_lowers_the_loss_and_beats_chance(trained):
    result, output = trained
    assert result["losses"][1] < result["losses"][0] < 2.4
    assert result["accuracy"] > 0.35  # chance: 0.1
    assert result["params"] == 121_962 and result["epochs"] == 2 and result["train_images"] == 512
    meta = json.loads((output / "tic.json").read_text())
    assert meta["epoch"] == 2 and meta["model"]["name"] == "tic-micro" and meta["accuracy"] == result["accuracy"]
    assert not list(output.parent.glob("micro.tmp-*")) and not (output.parent / "micro.old").exists()


def test_tic_eval_json_at_several_resolutions(trained, capsys):
    result, output = trained
    assert cli.main(["tic-eval", "--checkpoint", str(output), "--resolution", "28,42,56", "--limit-test", "256",
                     "--no-progress", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    evaluated = json.loads(lines[-1])
    assert set(evaluated) == {"accuracy", "params", "model", "trained_resolution", "windows", "test_images",
                              "checkpoint"}
    assert list(evaluated["accuracy"]) == ["28", "42", "56"] and evaluated["windows"] == "scaled"
    assert evaluated["accuracy"]["28"] == result["accuracy"]  # the same weights on the same test images
    assert all(0.1 < a <= 1.0 for a in evaluated["accuracy"].values())
    assert evaluated["params"] == result["params"] and "28px" in lines[-2]
    assert json.loads((output / "tic.json").read_text())["model"]["tic"]["native_resolution"] == 28
    # fixed windows: the same at the training resolution, another model at 56 (dilations 1, not 2)
    assert cli.main(["tic-eval", "--checkpoint", str(output), "--resolution", "28,56", "--limit-test", "256",
                     "--windows", "fixed", "--no-progress", "--json"]) == 0
    fixed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fixed["windows"] == "fixed" and fixed["accuracy"]["28"] == result["accuracy"]
    assert fixed["accuracy"]["56"] != evaluated["accuracy"]["56"]


def test_tic_train_cli_prints_json_last(tmp_path, capsys):
    output = tmp_path / "cli"
    assert cli.main(["tic-train", *SMALL, "--epochs", "1", "--output", str(output), "--shift", "cross", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == {"accuracy", "params", "epochs", "seconds", "seconds_per_epoch", "losses", "first_loss",
                           "last_loss", "model", "resolution", "train_images", "test_images", "processes", "output"}
    assert result["epochs"] == 1
    assert lines[-2].startswith("trained tic-micro")
    written = json.loads((output / "tic.json").read_text())["model"]
    assert written["overrides"] == {"shift": "cross", "native_resolution": 28} and written["tic"]["shift"] == "cross"
    model, _ = tic_train.load_checkpoint(output)
    assert model.config == written["tic"] and all(block.conv.shift == "cross" for block in model.blocks)


def test_a_run_killed_while_saving_keeps_the_previous_checkpoint_and_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    run_train([*SMALL, "--epochs", "2", "--output", str(straight)])
    output = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sinklora_ext.cli", "tic-train", *SMALL, "--epochs", "2", "--output", str(output)]
    env = dict(MULTI_PROCESS_ENV, SINKLORA_TEST_SAVE_PAUSE="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        pauses = 0
        for line in proc.stderr:
            pauses += "pausing" in line
            if pauses == 2:  # epoch 2's files are written, not yet in place
                proc.kill()
                break
    finally:
        proc.kill()
        proc.wait()
    assert pauses == 2
    model, meta = tic_train.load_checkpoint(output)
    assert meta["epoch"] == 1 and sum(p.numel() for p in model.parameters()) == 121_962
    assert list(tmp_path.glob("killed.tmp-*"))  # the killed save's temporary directory

    result = run_train([*SMALL, "--epochs", "2", "--output", str(output), "--resume"])
    assert result["epochs"] == 2 and len(result["losses"]) == 2
    assert json.loads((output / "tic.json").read_text())["epoch"] == 2
    assert not list(tmp_path.glob("killed.tmp-*"))
    assert_same_weights(weights(straight), weights(output), atol=1e-5)  # OMP_NUM_THREADS=1 there: another sum order
    with pytest.raises(ValueError, match=r"--resume: .* was written by another run \(--lr 0.002 there, 0.01 here\)"):
        run_train([*SMALL, "--epochs", "3", "--lr", "0.01", "--output", str(output), "--resume"])
    with pytest.raises(ValueError, match=r"--epochs \(1\) must be >= the epoch of the checkpoint resumed \(2"):
        run_train([*SMALL, "--epochs", "1", "--output", str(output), "--resume"])


def test_image_folder_source_trains_and_evaluates(tmp_path, capsys):
    folder = write_png_folder(tmp_path / "pngs", per_class=30, classes=(1, 5, 8))
    output = tmp_path / "folder"
    result = run_train(["--dataset", str(folder), "--resolution", "20", "--epochs", "2", "--batch-size", "25",
                        "--no-progress", "--output", str(output)])
    assert result["train_images"] == 75 and result["test_images"] == 15 and result["resolution"] == 20
    assert cli.main(["tic-eval", "--checkpoint", str(output), "--resolution", "20,32", "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"]["20"] == result["accuracy"] and set(evaluated["accuracy"]) == {"20", "32"}
    with pytest.raises(ValueError, match="--dataset: fashion-mnist has 10 classes"):
        tic_train.evaluate(cli.parse(["tic-eval", "--checkpoint", str(output), "--dataset", "fashion-mnist"]))


def test_two_gloo_processes_train_the_weights_of_one(tmp_path):
    """torchrun, 2 processes x 16 images per step == 1 process x 32: DistributedSampler shares of one
    permutation, gradients averaged by DDP."""
    argv = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "32", "--epochs", "1", "--no-progress",
            "--device", "cpu"]
    runs = {"one": run_train([*argv, "--output", str(tmp_path / "one")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561", "-m",
           "sinklora_ext.cli", "tic-train", *argv, "--json", "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=MULTI_PROCESS_ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs["two"] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["two"]["processes"] == 2 and runs["one"]["processes"] == 1
    assert runs["two"]["accuracy"] == pytest.approx(runs["one"]["accuracy"], abs=1 / 64)
    assert runs["two"]["losses"][0] == pytest.approx(runs["one"]["losses"][0], rel=1e-4)
    # one process here (2 threads), two under torchrun (1 thread each): the same sums in another order
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["tic-train", "--model", "tic-huge"], "--model: unknown model 'tic-huge'"),
    (["tic-train", "--epochs", "0"], "--epochs must be"),
    (["tic-train", "--resolution", "0"], "--resolution must be"),
    (["tic-train", "--lr", "-1"], "--lr must be"),
    (["tic-train", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["tic-train", "--device", "tpu"], "--device"),
    (["tic-train", "--dataset", "/nonexistent/images", "--output", "/tmp/sinklora-tic-never"],
     "--dataset: no such directory"),
    (["tic-eval", "--checkpoint", "/nonexistent/ckpt"], "--checkpoint: no such directory"),
    (["tic-eval", "--checkpoint", ".", "--resolution", "28,x"], "--resolution must be comma-separated integers"),
    (["tic-eval", "--checkpoint", ".", "--resolution", "28,0"], "--resolution must be comma-separated integers"),
    (["tic-eval", "--checkpoint", "."], "is not a `sinklora tic-train` output"),
])
def test_bad_flags_exit_2_with_the_rule(argv, message, capsys):
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinklora: error: ") and message in err


def test_argparse_rejects_an_unknown_shift_scheme(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tic-train", "--shift", "spiral"])
    assert exit_info.value.code == 2 and "--shift: invalid choice: 'spiral'" in capsys.readouterr().err
