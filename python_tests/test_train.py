"""`sinklora train`: real LoRA+ steps on the default model and real text, multi-process runs, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinklora_ext import cli
from sinklora_ext.data import debian_text_file, longalpaca_sample_path

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv):
    """`sinklora train ...` in this process: the config of the flags, run; returns the run summary."""
    from sinklora_ext import train

    return train.train(cli.parse(argv))


@pytest.fixture(scope="module")
def text_file():
    return str(debian_text_file())


def test_real_steps_on_default_model_lower_the_loss(tmp_path, text_file):
    out = tmp_path / "adapter"
    summary = run_cli(["train", "--data", text_file, "--context", "256", "--attn", "sf", "--steps", "6",
                       "--max-windows", "2", "--lr", "2e-3", "--no-shuffle", "--output", str(out)])
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    # the same two windows cycle: compare the first visit of each with the last
    assert (losses[-2] + losses[-1]) < (losses[0] + losses[1])
    assert (out / "adapter_model.safetensors").is_file() and (out / "sinklora.json").is_file()
    meta = json.loads((out / "sinklora.json").read_text())
    assert meta["attn"] == "sf" and meta["context"] == 256
    assert not list(tmp_path.glob("adapter.tmp-*")), "temporary output left behind"


def test_trained_adapter_reloads_with_plain_peft(tmp_path, tiny_model_dir, text_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sinklora_ext.hf.lora import peft_quiet
    from sinklora_ext.train import load_trained

    out = tmp_path / "out"
    run_cli(["train", "--data", text_file, "--context", "256", "--attn", "s2_nowrap", "--steps", "2",
             "--max-windows", "2", "--lr", "1e-2", "--model", tiny_model_dir, "--output", str(out), "--merge"])
    model, tokenizer = load_trained(out, device="cpu")
    model.eval()
    ids = torch.randint(0, 1000, (1, 200))
    expected = model(ids).logits
    assert model.get_base_model().config.rope_parameters["factor"] == 2.0
    # plain transformers + plain peft: extended base config comes from the merged checkpoint's config
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.config.rope_parameters["rope_type"] == "linear"
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, rope_parameters=merged.config.rope_parameters,
                                                max_position_embeddings=256)
    with peft_quiet():
        plain = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_longalpaca_json_trains(tmp_path, tiny_model_dir):
    """The first logged loss is the untrained model's loss on the first two items (LoRA B starts at
    zero), recomputed here: context extension, SF-Attn in training mode, loss on the outputs only."""
    from sinklora_ext.data import LongAlpacaDataset, collate_batch
    from sinklora_ext.hf.attention import set_attention
    from sinklora_ext.hf.lora import extend_context
    from sinklora_ext.hf.models import load_model

    summary = run_cli(["train", "--data", str(longalpaca_sample_path()), "--context", "256", "--steps", "2",
                       "--model", tiny_model_dir, "--output", str(tmp_path / "sft"), "--batch-size", "2",
                       "--no-shuffle"])
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    assert extend_context(model, 256) == 2.0
    set_attention(model, "sf", group_size=64)
    dataset = LongAlpacaDataset(tokenizer, longalpaca_sample_path(), 256)
    batch = collate_batch(tokenizer)([dataset[0], dataset[1]])
    assert (batch["labels"][:, 0] == -100).all() and (batch["labels"] != -100).any()
    with torch.no_grad():
        expected = model.train()(**batch).loss.item()
    assert summary["steps"] == 2 and summary["windows"] == len(dataset)
    assert summary["first_loss"] == pytest.approx(expected, rel=2e-6)  # full attention: 8e-5 off


def test_failed_run_leaves_no_output(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="--data"):
        run_cli(["train", "--data", str(tmp_path / "missing.txt"), "--context", "64", "--steps", "1",
                 "--model", tiny_model_dir, "--output", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_sharding_flags_fail_early_with_the_rule(tmp_path, tiny_model_dir, text_file):
    base = ["train", "--data", text_file, "--context", "64", "--steps", "1", "--model", tiny_model_dir,
            "--output", str(tmp_path / "never"), "--device", "cpu"]
    with pytest.raises(ValueError, match="--fsdp needs CUDA"):
        run_cli(base + ["--fsdp", "full_shard auto_wrap"])
    with pytest.raises(ValueError, match="exclude each other"):
        run_cli(base + ["--fsdp", "full_shard", "--deepspeed", "ds.json"])
    with pytest.raises(FileNotFoundError, match="--deepspeed: no such config file"):
        run_cli(base + ["--deepspeed", str(tmp_path / "missing.json")])
    (tmp_path / "broken.json").write_text("{stage: 2")
    with pytest.raises(ValueError, match="--deepspeed: .* is not valid JSON"):
        run_cli(base + ["--deepspeed", str(tmp_path / "broken.json")])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        run_cli(base + ["--deepspeed", str(tmp_path / "list.json")])
    assert not (tmp_path / "never").exists()


MULTI_PROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _one_step(tiny_model_dir, text_file, output, launcher=(), extra=()):
    """One LoRA+ step on two windows: ``launcher`` empty runs one process with both windows, else
    torchrun with two processes of one window each. Returns (first-step loss, saved adapter)."""
    from safetensors.torch import load_file

    batch = "1" if launcher else "2"
    cmd = [sys.executable, *launcher, "-m", "sinklora_ext.cli", "train", "--data", text_file, "--context", "128",
           "--attn", "sf", "--steps", "1", "--no-shuffle", "--max-windows", "2", "--model", tiny_model_dir,
           "--json", "--no-gradient-checkpointing", "--lr", "1e-2", "--warmup-steps", "0", "--batch-size", batch,
           "--output", str(output), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=MULTI_PROCESS_ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary["first_loss"], load_file(output / "adapter_model.safetensors")


def _torchrun(port):
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


def _accelerate(port, *options):
    return ["-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(port), *options]


@pytest.fixture(scope="module")
def one_process_step(tmp_path_factory, tiny_model_dir, text_file):
    return _one_step(tiny_model_dir, text_file, tmp_path_factory.mktemp("one") / "out")


# (launcher, sinklora train options); two processes of one window each
LAUNCHES = {
    "torchrun-ddp": (_torchrun(29533), []),
    "torchrun-zero2": (_torchrun(29534), ["--deepspeed", str(REPO / "configs" / "deepspeed_zero2.json")]),
    "torchrun-zero3": (_torchrun(29535), ["--deepspeed", str(REPO / "configs" / "deepspeed_zero3.json"), "--merge"]),
    "accelerate-ddp": (_accelerate(29536, "--multi_gpu"), []),  # falls back to gloo on the CPU
    "accelerate-zero3": (_accelerate(29537, "--use_deepspeed", "--zero_stage", "3"), ["--merge"]),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_two_processes_train_the_same_adapter_as_one(tmp_path, tiny_model_dir, text_file, one_process_step, launch):
    """Two gloo processes with one window each, under torchrun or accelerate launch, data-parallel or
    DeepSpeed ZeRO-2 (optimizer state and gradients sharded) or ZeRO-3 (parameters too): the same
    first-step loss and the same trained adapter as one process with both windows. Under ZeRO-3 the
    adapter is gathered from the shards to be saved, and --merge rebuilds the merged model from it."""
    launcher, options = LAUNCHES[launch]
    if "zero" in launch:
        pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    run = _one_step(tiny_model_dir, text_file, out, launcher=launcher, extra=options)
    (loss, adapter), (expected_loss, expected) = run, one_process_step
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert adapter.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(adapter[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)
    if "--merge" in options:
        from transformers import AutoModelForCausalLM

        from sinklora_ext.train import load_trained

        model, _ = load_trained(out, device="cpu")
        ids = torch.randint(0, 1000, (1, 100))
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp2_sharded_step_trains_the_same_adapter_as_one_process(tmp_path, tiny_model_dir, text_file,
                                                                   one_process_step):
    """The LoRA+ model sharded with FSDP2 as accelerate shards it on GPUs (every decoder layer, then
    the root; here two CPU processes over gloo): SF-Attn forward/backward on gathered parameters, the
    trainable embedding copy tied to lm_head, and `train.save` of the state dict gathered from the
    shards give the adapter of one unsharded process."""
    from safetensors.torch import load_file

    out = tmp_path / "fsdp2"
    cmd = [sys.executable, *_torchrun(29538), str(REPO / "python_tests" / "fsdp2_one_step.py"), str(out), "train",
           "--data", text_file, "--context", "128", "--attn", "sf", "--steps", "1", "--max-windows", "2",
           "--model", tiny_model_dir, "--no-gradient-checkpointing", "--lr", "1e-2"]
    # a script's directory comes first on sys.path, not the working directory: import this checkout
    env = dict(MULTI_PROCESS_ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    loss = json.loads(proc.stdout.strip().splitlines()[-1])["first_loss"]
    expected_loss, expected = one_process_step
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(adapter[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)


def test_checkpoints_resume(tmp_path, tiny_model_dir, text_file):
    common = ["train", "--data", text_file, "--context", "128", "--max-windows", "4", "--model", tiny_model_dir,
              "--output", str(tmp_path / "run"), "--save-steps", "2", "--no-gradient-checkpointing"]
    first = run_cli([*common, "--steps", "2"])
    assert first["steps"] == 2
    assert (tmp_path / "run.checkpoints" / "checkpoint-2").is_dir()
    resumed = run_cli([*common, "--steps", "3", "--resume"])
    assert resumed["steps"] == 3
    assert [step for step, _ in resumed["losses"]] == [3]  # only the step after the checkpoint ran

