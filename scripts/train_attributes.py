"""Fine-tune a model's decoder to read the encoder's ImageNet evidence as semantic attributes
(issue #37 2c, captioner.training.attributes); every AttributeConfig field is a flag, see --help.
First cache the photos (scripts/cache_attributes.py), then:

  python scripts/train_attributes.py --init-from weights --train-cache runs/attr-cache/train \\
      --dev-cache runs/attr-cache/dev --flickr ../shared/data/flickr8k --output-dir runs/attributes
  python scripts/train_attributes.py ... --no-semantic-attributes   # the control run
  python scripts/train_attributes.py --config runs/attributes/train_config.json   # resume
"""

import argparse

from captioner.cli.flags import add_config_arguments, config_from_args, load_config_file
from captioner.training.attributes import AttributeConfig, fine_tune_attributes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a saved train_config.json to start from (flags override it)")
    add_config_arguments(parser, AttributeConfig)
    args = parser.parse_args()
    print(fine_tune_attributes(config_from_args(AttributeConfig, args, base=load_config_file(args.config))))


if __name__ == "__main__":
    main()
