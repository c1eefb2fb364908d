"""Copy a trained model folder (e.g. runs/x/best) to a release folder, optionally as fp16.

  python scripts/export_model.py runs/f8k/best weights --dtype float16

The weights are stored in fp16 to halve the file; they are loaded back as fp32.
"""

import argparse

import torch

from captioner.checkpoint import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a model folder written by training (model.safetensors + config.json)")
    parser.add_argument("target", help="the folder to write, e.g. weights")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    args = parser.parse_args()
    model, vocab, config = load_model(args.source)
    dtype = getattr(torch, args.dtype)
    path = save_model(args.target, model, vocab, metadata=config["metadata"], dtype=dtype)
    print(f"wrote {path} ({args.dtype})")


if __name__ == "__main__":
    main()
