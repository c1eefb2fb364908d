"""Caption every image in folders/files/globs into a resumable JSONL or CSV file.

    python scripts/caption_folder.py photos/ -o captions.jsonl
    python scripts/caption_folder.py 'shots/**/*.jpg' extra.png -o captions.csv --n-best 3

Same as the `captioner-caption` command; see `--help`.
"""

from captioner.cli import caption_folder_main

if __name__ == "__main__":
    raise SystemExit(caption_folder_main())
