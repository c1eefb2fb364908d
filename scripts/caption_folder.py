"""Caption every image in folders/files/globs: the same as `captioner caption`; see --help.

python scripts/caption_folder.py photos/ -o captions.jsonl
python scripts/caption_folder.py 'shots/**/*.jpg' extra.png -o captions.csv --n-best 3
"""

from captioner.cli.main import alias

main = alias("caption")

if __name__ == "__main__":
    main()
