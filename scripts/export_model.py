"""Copy a trained model folder (e.g. runs/x/best) to a release folder, optionally as fp16.

  python scripts/export_model.py runs/f8k/best weights --dtype float16
  python scripts/export_model.py runs/f8k weights --last-step     # the run's last weights, not best/
  python scripts/export_model.py runs/a/best runs/b/best weights  # an ensemble of both decoders

The weights are stored in fp16 to halve the file; they are loaded back as fp32.
"""

import argparse

import torch

from captioner.checkpoint import load_ensemble, load_model, save_model
from captioner.run_state import last_step_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", metavar="source",
                        help="a model folder written by training (model.safetensors + config.json); "
                             "several: one model whose decoders vote (same encoder and vocabulary)")
    parser.add_argument("target", help="the folder to write, e.g. weights")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    parser.add_argument("--last-step", action="store_true",
                        help="source is a run folder: export its last saved step's raw weights")
    args = parser.parse_args()
    if args.last_step and len(args.sources) > 1:
        parser.error("--last-step exports one run")
    if args.last_step:
        model, vocab, train_config = last_step_model(args.sources[0])
        metadata = {"weights": "last step, raw (not averaged)", "train_config": train_config}
    elif len(args.sources) > 1:
        model, vocab, metadata = load_ensemble(args.sources)
    else:
        model, vocab, config = load_model(args.sources[0])
        metadata = config["metadata"]
    dtype = getattr(torch, args.dtype)
    path = save_model(args.target, model, vocab, metadata=metadata, dtype=dtype)
    print(f"wrote {path} ({args.dtype})")


if __name__ == "__main__":
    main()
