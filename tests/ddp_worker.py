"""Run under `accelerate launch` by test_training.py: trains, then records what each rank saw and holds."""

import json
import logging
import sys
from pathlib import Path

from safetensors.torch import save_file

from hf_ddpm.trainer import Trainer
from hf_ddpm.training_args import parse_training_args

logging.basicConfig(level=logging.INFO)
trainer = Trainer(parse_training_args(sys.argv[1:]))
seen: list[list[int]] | list[list[str]] = []  # rows of the cache, or names of streamed images, per micro-step
if trainer.stream is None:
    indices = trainer.order.indices
    trainer.order.indices = lambda *a: seen.append(indices(*a)) or seen[-1]
else:
    batch = trainer.stream.batch

    def recorded(*args, **kwargs):
        images = batch(*args, **kwargs)
        seen.append(trainer.stream.names())
        return images

    trainer.stream.batch = recorded
trainer.train()
rank, out = trainer.accelerator.process_index, Path(trainer.args.output_dir)
save_file({k: v.contiguous() for k, v in trainer.unet.state_dict().items()}, out / f"rank{rank}.safetensors")
(out / f"rows{rank}.json").write_text(json.dumps(seen))
