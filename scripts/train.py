"""Train a captioner. Every TrainConfig field is a flag; see --help.

  python scripts/train.py --data.kind flickr --data.root ../shared/data/flickr8k --output_dir runs/f8k
  torchrun --nproc_per_node 4 scripts/train.py ...          # several GPUs (or CPU processes)
  python scripts/train.py --config runs/f8k/train_config.json --resume true   # continue a run
"""

import argparse
import json
import os

from captioner.configs import add_config_arguments, config_from_args, load_config_file
from captioner.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a saved train_config.json to start from")
    add_config_arguments(parser, TrainConfig)
    args = parser.parse_args()
    cfg = config_from_args(TrainConfig, args, load_config_file(args.config))
    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, from rank 0
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
