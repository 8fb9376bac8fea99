"""One LoRA+ step of `sinklora train`'s model under FSDP2 sharding, as accelerate applies it on GPUs
(``fully_shard`` on every decoder layer, then on the root), here on CPU processes over gloo.

The Trainer shards with FSDP only across accelerators, so this script drives the optimizer step
itself, the way the Trainer configures it (AdamW, betas 0.9/0.95, no weight decay, gradients
clipped to norm 1, constant learning rate), then gathers the full state dict from the shards and
saves it with ``train.save``. Run: ``torchrun --nproc_per_node 2 fsdp2_one_step.py OUTPUT train ...``
(the ``sinklora train`` options); rank r trains on window r. Prints the first-step loss as JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from sinklora_ext import cli, train
from sinklora_ext.data import collate_batch


def main(output: str, argv: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = cli.parse(argv)  # a train.TrainConfig
    torch.manual_seed(config.seed)
    model, tokenizer, factor = train.prepare_model(config)
    dataset = train.build_dataset(tokenizer, config.data, config.context, config.max_windows)
    batch = collate_batch(tokenizer)([dataset[rank]])

    model.train()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)

    loss = model(**batch).loss
    loss.backward()  # FSDP2 averages the gradients over the ranks
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        train.save(model, tokenizer, Path(output), config, factor, state_dict=state_dict)
        print(json.dumps({"first_loss": mean_loss.item() / dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
