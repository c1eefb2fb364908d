"""Teach a model's language side words and sentence shapes from captions without photos (issue
#37 (e), captioner.training.language); every LanguageConfig field is a flag, see --help.

  python scripts/train_language.py --init-from runs/extended \\
      --text-captions ../shared/data/coco-text/captions_val2017_text.json \\
      --data.kind flickr --data.root ../shared/data/flickr8k --output-dir runs/language
  python scripts/train_language.py --config runs/language/language_config.json --resume
  python scripts/train_language.py --export-last-step runs/language   # model/ of a stopped run
"""

import argparse

from captioner.cli.flags import add_config_arguments, config_from_args, load_config_file
from captioner.training.language import LanguageConfig, export_last_step, train_language


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a saved language_config.json to start from (flags override it)")
    parser.add_argument(
        "--export-last-step", metavar="RUN", help="only save RUN/model from the run's last saved state"
    )
    add_config_arguments(parser, LanguageConfig)
    args = parser.parse_args()
    if args.export_last_step:
        print(export_last_step(args.export_last_step))
        return
    cfg = config_from_args(LanguageConfig, args, base=load_config_file(args.config))
    try:
        cfg.check()
    except ValueError as err:
        parser.error(str(err))
    train_language(cfg)


if __name__ == "__main__":
    main()
