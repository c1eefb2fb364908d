"""Inference speed on this machine: the same as `captioner benchmark` (captioner/benchmark.py); see --help.

python scripts/benchmark.py --model weights   # the shipped model: the honest numbers
python scripts/benchmark.py                        # default ModelConfig, random decoder
python scripts/benchmark.py --model weights --dev-cider 100   # what each encoder option costs in CIDEr
"""

from captioner.cli.main import alias

main = alias("benchmark")

if __name__ == "__main__":
    main()
