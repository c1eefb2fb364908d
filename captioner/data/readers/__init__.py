"""One reader per dataset format (COCO, Karpathy splits, Flickr8k/30k, CSV/JSONL pairs); each
returns ImageCaptions and checks its files up front (checks). captioner.data.datasets is the
entry point: load_dataset picks the reader a DataConfig names.

Adding a format: a module here with a `load_*` function, and its paths in
captioner.data.datasets.DATASET_PATHS and load_dataset.
"""
