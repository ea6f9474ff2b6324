"""The trainer's data: shard streams, tasks, augmentation, and the original random-access path.

Configs name the DataModules here (`class_path: trainer.data.ShardDataModule`); everything else
lives in the module of its job (see docs/data.md):

- batch: the batch format (`Batch`, `IGNORE`, directions) and `DataError`;
- shards: reading chunks out of tar shards; windows: the one covering rule;
- epoch: the elastic train epoch as arithmetic; train_stream, eval_stream: the two streams;
- datamodule: `ShardDataModule` and its loader;
- tasks, augment, draws: what a window becomes, and the seeded draws behind it;
- seed_style: the original trainer's random-access dataset and DataModule;
- hf: a split as a Hugging Face datasets dataset (the hf extra).
"""

from trainer.data.datamodule import ShardDataModule
from trainer.data.seed_style import SeedStereoDataModule

__all__ = ["SeedStereoDataModule", "ShardDataModule"]
