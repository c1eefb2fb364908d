"""Copy a trained model folder to a release folder: the same as `captioner export`; see --help.

python scripts/export_model.py runs/f8k/best weights --dtype float16
python scripts/export_model.py runs/f8k weights --last-step     # the run's last weights, not best/
python scripts/export_model.py runs/a/best runs/b/best weights  # an ensemble of both decoders
"""

from captioner.cli.main import alias

main = alias("export")

if __name__ == "__main__":
    main()
