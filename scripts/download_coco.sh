#!/usr/bin/env bash
# Download MS-COCO 2014 (images + caption annotations) and Karpathy's splits into a folder.
#
#   scripts/download_coco.sh /data/coco    # ~20 GB download; ~40 GB free needed while unpacking
#
# Downloads resume if interrupted (re-run the same command). Zips are deleted after unpacking.
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: $0 TARGET_DIR" >&2
  exit 2
fi
target=$1
mkdir -p "$target"
cd "$target"
target=$(pwd)

fetch() {  # fetch URL: download to the current folder, resuming a partial file
  local url=$1 file=${1##*/}
  echo "==> $url"
  if command -v curl >/dev/null 2>&1; then
    curl -fL --retry 5 -C - -o "$file" "$url"
  elif command -v wget >/dev/null 2>&1; then
    wget -c -O "$file" "$url"
  else
    echo "error: need curl or wget" >&2
    exit 1
  fi
}

unpack() {  # unpack URL: download and unzip URL once (a .done file marks a finished unzip)
  local zip=${1##*/}
  [[ -e ".$zip.done" ]] && return 0
  fetch "$1"
  unzip -qo "$zip"
  rm -f "$zip"
  touch ".$zip.done"
}

unpack http://images.cocodataset.org/annotations/annotations_trainval2014.zip
unpack http://images.cocodataset.org/zips/val2014.zip
unpack http://images.cocodataset.org/zips/train2014.zip
# Karpathy's splits (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json). Optional:
# if this host is down, the same zip is mirrored on Kaggle ("karpathy-splits").
if [[ ! -e dataset_coco.json ]]; then
  if fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip; then
    unzip -qo caption_datasets.zip
    rm -f caption_datasets.zip
  else
    echo "warning: could not download Karpathy's splits; the official train/val split works" >&2
  fi
fi

cat <<EOF

Done. Layout of $target:
  annotations/captions_train2014.json   414,113 captions of 82,783 images
  annotations/captions_val2014.json     202,654 captions of 40,504 images
  train2014/COCO_train2014_000000000009.jpg ...
  val2014/COCO_val2014_000000000042.jpg ...
  dataset_coco.json                     Karpathy splits: 113,287 train / 5,000 val / 5,000 test

Load it with captioner.data:
  load_dataset("karpathy", split_json="$target/dataset_coco.json", image_root="$target")
  load_dataset("coco", train="$target/annotations/captions_train2014.json",
               train_images="$target/train2014",
               val="$target/annotations/captions_val2014.json", val_images="$target/val2014")
EOF
