"""Score a model on a dataset split: the same as `captioner evaluate`; see --help.

  python scripts/evaluate.py --model weights --data.kind flickr \\
      --data.root ../shared/data/flickr8k --split val --beam-size 3 --output-dir eval/f8k-val
"""

from captioner.cli.main import alias

main = alias("evaluate")

if __name__ == "__main__":
    main()
