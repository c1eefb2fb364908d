"""Train a captioner: the same as `captioner train`; every TrainConfig field is a flag, see --help.

python scripts/train.py --data.kind flickr --data.root ../shared/data/flickr8k --output-dir runs/f8k
torchrun --nproc_per_node 4 scripts/train.py ...          # several GPUs (or CPU processes)
python scripts/train.py --config runs/f8k/train_config.json --resume   # continue a run
"""

from captioner.cli.main import alias

main = alias("train")

if __name__ == "__main__":
    main()
