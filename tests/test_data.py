import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.data.config import DataConfig
from captioner.data.datasets import (
    CaptionDataset,
    DatasetError,
    load_coco,
    load_dataset,
    load_flickr,
    load_karpathy,
    load_pairs,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4), "red").save(folder / name)


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def coco_json(path: Path, captions: dict[int, list[str]], extra_images: int = 0) -> Path:
    """A COCO-format caption file; image i is named {i:012d}.jpg."""
    ids = [*captions, *range(1000, 1000 + extra_images)]
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 4, "height": 4} for i in ids]
    annotations = [
        {"id": 100 * i + k, "image_id": i, "caption": c}
        for i, caps in captions.items()
        for k, c in enumerate(caps)
    ]
    return write_json(path, {"images": images, "annotations": annotations})


# ----------------------------------------------------------------------------- COCO


def test_load_coco(tmp_path):
    ann = coco_json(tmp_path / "captions.json", {7: ["A cat.", "A cat on a mat. "], 9: ["Dogs"]})
    write_images(tmp_path / "train2014", "000000000007.jpg", "000000000009.jpg")

    items = load_coco(ann, tmp_path / "train2014")

    assert [(i.image_id, i.coco_id, i.captions) for i in items] == [
        ("7", 7, ["A cat.", "A cat on a mat."]),
        ("9", 9, ["Dogs"]),
    ]
    assert items[0].path == (tmp_path / "train2014" / "000000000007.jpg").resolve()
    assert items[0].path.is_absolute()


def test_load_coco_skips_images_without_captions(tmp_path):
    ann = coco_json(tmp_path / "captions.json", {1: ["a"]}, extra_images=1)
    write_images(tmp_path / "images", "000000000001.jpg")  # the uncaptioned one is absent too
    assert [i.image_id for i in load_coco(ann, tmp_path / "images")] == ["1"]


def test_missing_images_are_counted_and_named(tmp_path):
    ann = coco_json(tmp_path / "captions.json", {i: ["a caption"] for i in range(1, 14)})
    write_images(tmp_path / "images", "000000000001.jpg")

    with pytest.raises(DatasetError) as error:
        load_coco(ann, tmp_path / "images")
    message = str(error.value)
    assert "12 of 13 images" in message and str(ann) in message
    assert "000000000002.jpg" in message and "000000000011.jpg" in message
    assert "000000000013.jpg" not in message and "2 more" in message
    assert "skip_missing=True" in message

    with pytest.warns(UserWarning, match="12 of 13 images"):
        items = load_coco(ann, tmp_path / "images", skip_missing=True)
    assert [i.image_id for i in items] == ["1"]


def test_all_images_missing_leaves_an_empty_split(tmp_path):
    ann = coco_json(tmp_path / "captions.json", {1: ["a caption"]})
    (tmp_path / "images").mkdir()
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="split 'val' .* no images"):
        load_coco(ann, tmp_path / "images", "val", skip_missing=True)


def test_missing_image_folder(tmp_path):
    ann = coco_json(tmp_path / "captions.json", {1: ["a"]})
    with pytest.raises(DatasetError, match="image folder .* not found: .*nowhere"):
        load_coco(ann, tmp_path / "nowhere")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", "file is empty"),
        ("{not json", "not valid JSON"),
        ('{"images": [], "annotations": []}', "no images with captions"),
        ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] needs an 'id' and a 'file_name'"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, '
            '"bbox": [0, 0, 1, 1]}]}',
            "instances_",
        ),
    ],
)
def test_bad_coco_files(tmp_path, content, problem):
    ann = tmp_path / "captions.json"
    ann.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=problem) as error:
        load_coco(ann, tmp_path / "images")
    assert str(ann) in str(error.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="captions_val2014.json: file not found"):
        load_coco(tmp_path / "captions_val2014.json", tmp_path)


# ----------------------------------------------------------------------------- Karpathy


def karpathy_entry(filename: str, split: str, *captions: str, **extra) -> dict:
    sentences = [{"raw": c} for c in captions]
    return {"filename": filename, "split": split, "sentences": sentences, **extra}


def test_load_karpathy_coco(tmp_path):
    split_json = write_json(
        tmp_path / "dataset_coco.json",
        {
            "images": [
                karpathy_entry("a.jpg", "train", "one", "two", filepath="train2014", cocoid=1),
                karpathy_entry("b.jpg", "restval", "three", filepath="val2014", cocoid=2),
                karpathy_entry("c.jpg", "val", "four", filepath="val2014", cocoid=3),
                karpathy_entry("d.jpg", "test", "five", filepath="val2014", cocoid=4),
            ]
        },
    )
    write_images(tmp_path / "train2014", "a.jpg")
    write_images(tmp_path / "val2014", "b.jpg", "c.jpg", "d.jpg")

    data = load_karpathy(split_json, tmp_path)

    assert {s: [i.image_id for i in items] for s, items in data.splits.items()} == {
        "train": ["1", "2"],
        "val": ["3"],
        "test": ["4"],
    }
    first = data["train"][0]
    assert (first.coco_id, first.captions) == (1, ["one", "two"])
    assert first.path == (tmp_path / "train2014" / "a.jpg").resolve()


def test_load_karpathy_flickr_uses_file_names_as_ids(tmp_path):
    split_json = write_json(
        tmp_path / "dataset_flickr8k.json",
        {"images": [karpathy_entry("x.jpg", "train", "a dog"), karpathy_entry("y.jpg", "test", "a cat")]},
    )
    write_images(tmp_path / "images", "x.jpg", "y.jpg")
    data = load_karpathy(split_json, tmp_path / "images")
    assert data["train"][0].image_id == "x.jpg" and data["train"][0].coco_id is None
    assert sorted(data.splits) == ["test", "train"]


def test_karpathy_malformed_entry_names_its_index(tmp_path):
    split_json = write_json(
        tmp_path / "dataset_coco.json",
        {"images": [karpathy_entry("a.jpg", "train", "x"), karpathy_entry("b.jpg", "holdout", "y")]},
    )
    with pytest.raises(DatasetError, match=r"dataset_coco.json: images\[1\] is malformed"):
        load_karpathy(split_json, tmp_path)
    write_json(split_json, [1, 2])
    with pytest.raises(DatasetError, match="'images' list"):
        load_karpathy(split_json, tmp_path)


# ----------------------------------------------------------------------------- Flickr


def flickr8k(root: Path, image_dir: str = "images", test: bool = False) -> Path:
    """Six images, two captions each: 3 train, 2 dev, 1 test (list written only if `test`)."""
    names = [f"{i}_abc.jpg" for i in range(6)]
    write_images(root / image_dir, *names)
    (root / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{k}\tcaption {k} of {n} .\n" for n in names for k in range(2))
    )
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:3]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[3:5]) + "\n")
    if test:
        (root / "Flickr_8k.testImages.txt").write_text(names[5] + "\n")
    return root


@pytest.mark.parametrize("image_dir", ["images", "Images", "Flicker8k_Dataset"])
def test_load_flickr8k(tmp_path, image_dir):
    data = load_flickr(flickr8k(tmp_path, image_dir))

    assert sorted(data.splits) == ["train", "val"]  # no test list: no test split
    assert [i.image_id for i in data["train"]] == ["0_abc.jpg", "1_abc.jpg", "2_abc.jpg"]
    assert [i.image_id for i in data["val"]] == ["3_abc.jpg", "4_abc.jpg"]
    first = data["train"][0]
    assert first.captions == ["caption 0 of 0_abc.jpg .", "caption 1 of 0_abc.jpg ."]
    assert first.path == (tmp_path / image_dir / "0_abc.jpg").resolve()


def test_load_flickr8k_with_test_list(tmp_path):
    data = load_flickr(flickr8k(tmp_path, test=True))
    assert [i.image_id for i in data["test"]] == ["5_abc.jpg"]


def test_flickr_malformed_line_names_file_and_line(tmp_path):
    root = flickr8k(tmp_path)
    with (root / "Flickr8k.token.txt").open("a") as f:
        f.write("0_abc.jpg caption without a tab\n")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt:13: malformed line"):
        load_flickr(root)


def test_flickr_empty_caption_file(tmp_path):
    root = flickr8k(tmp_path)
    (root / "Flickr8k.token.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="Flickr8k.token.txt: no captions"):
        load_flickr(root)


def test_flickr_split_without_images(tmp_path):
    root = flickr8k(tmp_path)
    (root / "Flickr_8k.devImages.txt").write_text("\n")
    with pytest.raises(DatasetError, match="split 'val' from .*Flickr_8k.devImages.txt has no"):
        load_flickr(root)


def test_flickr_listed_image_without_captions(tmp_path):
    root = flickr8k(tmp_path)
    with (root / "Flickr_8k.trainImages.txt").open("a") as f:
        f.write("ghost.jpg\n")
    with pytest.raises(DatasetError, match="1 images listed in .*trainImages.txt have no captions"):
        load_flickr(root)
    with pytest.warns(UserWarning, match="without captions"):
        assert len(load_flickr(root, skip_missing=True)["train"]) == 3


def test_flickr_missing_pieces(tmp_path):
    with pytest.raises(DatasetError, match="Flickr dataset folder not found"):
        load_flickr(tmp_path / "flickr8k")
    root = flickr8k(tmp_path / "flickr8k")
    (root / "images" / "1_abc.jpg").unlink()
    missing = r"1 of 5 images listed in .*Flickr_8k\.\*Images\.txt are missing .*: 1_abc.jpg"
    with pytest.raises(DatasetError, match=missing):
        load_flickr(root)
    (root / "Flickr_8k.trainImages.txt").unlink()
    with pytest.raises(DatasetError, match="missing Flickr_8k.trainImages.txt"):
        load_flickr(root)
    for image in (root / "images").iterdir():
        image.unlink()
    (root / "images").rmdir()
    with pytest.raises(DatasetError, match="no image folder"):
        load_flickr(root)


def test_flickr30k_token_file(tmp_path):
    write_images(tmp_path / "flickr30k-images", "1.jpg", "2.jpg")
    (tmp_path / "results_20130124.token").write_text(
        "1.jpg#0\tA man .\n1.jpg#1\tA person .\n2.jpg#0\tA dog .\n"
    )
    assert {s: len(v) for s, v in load_flickr(tmp_path).splits.items()} == {"train": 2}

    write_json(
        tmp_path / "dataset_flickr30k.json",
        {"images": [karpathy_entry("1.jpg", "train", "A man ."), karpathy_entry("2.jpg", "val", "A dog .")]},
    )
    data = load_flickr(tmp_path)
    assert [i.image_id for i in data["val"]] == ["2.jpg"]


# ----------------------------------------------------------------------------- CSV / JSONL


def test_load_pairs_csv_groups_rows_by_image(tmp_path):
    write_images(tmp_path / "pics" / "sub", "a.png", "b.png")
    (tmp_path / "pics" / "captions.csv").write_text(
        'image,caption,source\nsub/a.png,"A red square, small.",x\nsub/b.png,Red.,y\n'
        "sub/a.png,Another one.,z\n"
    )
    items = load_pairs(tmp_path / "pics" / "captions.csv")
    assert [(i.image_id, i.captions) for i in items] == [
        ("sub/a.png", ["A red square, small.", "Another one."]),
        ("sub/b.png", ["Red."]),
    ]
    assert items[0].path == (tmp_path / "pics" / "sub" / "a.png").resolve()


def test_load_pairs_jsonl_with_image_root(tmp_path):
    write_images(tmp_path / "images", "a.png")
    pairs = tmp_path / "meta" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text('{"image": "a.png", "caption": "one"}\n\n{"image": "a.png", "caption": "two"}\n')
    items = load_pairs(pairs, image_root=tmp_path / "images")
    assert [(i.image_id, i.captions) for i in items] == [("a.png", ["one", "two"])]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("p.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "a.png"\n', r"p.jsonl:2: invalid"),
        ("p.jsonl", '{"image": "a.png", "text": "x"}\n', r"p.jsonl:1: expected"),
        ("p.csv", "file,text\na.png,x\n", "header must have 'image' and 'caption'"),
        ("p.csv", "image,caption\n,x\n", r"p.csv:2: missing image path"),
        ("p.csv", "image,caption\na.png,\n", "p.csv: no captions"),
        ("p.txt", "a.png\tx\n", "unsupported pairs format"),
    ],
)
def test_bad_pairs_files(tmp_path, name, content, problem):
    write_images(tmp_path, "a.png")
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=problem):
        load_pairs(tmp_path / name)


# ----------------------------------------------------------------------------- dispatcher


def test_load_dataset_coco_train_and_val(tmp_path):
    train = coco_json(tmp_path / "captions_train.json", {1: ["a"]})
    val = coco_json(tmp_path / "captions_val.json", {2: ["b"]})
    write_images(tmp_path / "train", "000000000001.jpg")
    write_images(tmp_path / "val", "000000000002.jpg")
    data = load_dataset(
        DataConfig(
            "coco",
            train=str(train),
            train_images=str(tmp_path / "train"),
            val=str(val),
            val_images=str(tmp_path / "val"),
        )
    )
    assert isinstance(data, CaptionDataset)
    assert {s: [i.image_id for i in v] for s, v in data.splits.items()} == {"train": ["1"], "val": ["2"]}
    with pytest.raises(DatasetError, match=r"no 'test' split .*\['train', 'val'\]"):
        data["test"]


def test_load_dataset_other_kinds(tmp_path):
    flickr = load_dataset(DataConfig("flickr", root=str(flickr8k(tmp_path / "f"))))
    assert sorted(flickr.splits) == ["train", "val"]
    write_images(tmp_path / "p", "a.png")
    (tmp_path / "p" / "train.csv").write_text("image,caption\na.png,x\n")
    assert len(load_dataset(DataConfig("pairs", train=str(tmp_path / "p" / "train.csv")))["train"]) == 1


def test_load_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'"):
        load_dataset(DataConfig("imagenet", root=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"takes paths .*required: \['train', 'train_images'\]"):
        load_dataset(DataConfig("coco", train=str(tmp_path / "a.json")))
    with pytest.raises(DatasetError, match="got \\['root', 'split_json'\\]"):
        load_dataset(DataConfig("karpathy", split_json=str(tmp_path), root=str(tmp_path)))


# ----------------------------------------------------------------------------- real data


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} not available")
    return path


def test_real_flickr8k():
    data = load_flickr(shared("flickr8k"))
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 6000, "val": 1000}
    items = data["train"] + data["val"]
    assert all(len(i.captions) == 5 for i in items)
    assert len({i.image_id for i in items}) == 7000
    assert items[0].path.is_file()


def test_real_coco_mini():
    root = shared("coco-mini")
    items = load_coco(root / "annotations" / "captions_train2017.json", root / "train2017")
    assert len(items) == 80 and sum(len(i.captions) for i in items) == 400
    assert all(i.coco_id == int(i.image_id) and i.path.is_file() for i in items)
