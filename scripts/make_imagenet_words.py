"""Generate captioner/model/imagenet_words.json: for each ImageNet-1k class, its label, the COCO
category it is an instance of (or none), the caption words that name it, and whether it implies
that a person is in the photo. Run once by hand (tests do not run it); the JSON ships in the package.

  apt-get install wordnet-base      # WordNet 3.0: /usr/share/wordnet/data.noun, index.noun
  PYTHONPATH=. python scripts/make_imagenet_words.py

ImageNet class ids (timm's imagenet_synsets.txt, in class-index order) are WordNet 3.0 noun
offsets, so data.noun is parsed directly (no nltk: its reader also wants files Debian lacks).
Rule: a class takes the COCO category of its NEAREST anchor in its hypernym closure (instance
hypernyms included), so hot dog (a sandwich in WordNet) stays "hot dog". ImageNet has no person
class: the three person classes (ballplayer, groom, scuba diver) and the clothing, headdress,
footwear and sports-gear classes are marked implies_person, and no class maps to "person".
Caption words: the names of the class and of its hypernyms up to WORD_DEPTH steps that are words
of the shipped vocabulary (abstract ones left out), then its category's synonyms.
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from pathlib import Path

import timm.data

from captioner.evaluation.coco_objects import COCO_SYNONYMS, ObjectVocabulary

ROOT = Path(__file__).resolve().parents[1]
WORDNET = Path("/usr/share/wordnet")
TIMM_INFO = Path(timm.data.__file__).parent / "_info"

# COCO category -> anchor synsets as (lemma, sense number, a word its gloss must contain).
ANCHORS: dict[str, list[tuple[str, int, str]]] = {
    "bicycle": [("bicycle", 1, "wheel"), ("tricycle", 1, "wheel")],
    "car": [("car", 1, "motor"), ("golfcart", 1, "golf")],
    "motorcycle": [("motorcycle", 1, "motor"), ("motor_scooter", 1, "wheel"), ("moped", 1, "motor")],
    "airplane": [("airplane", 1, "aircraft"), ("wing", 2, "airfoil")],
    "bus": [("bus", 1, "vehicle")],
    "train": [
        ("train", 1, "railway"),
        ("locomotive", 1, "rail"),
        ("passenger_car", 1, "railcar"),
        ("freight_car", 1, "railway"),
        ("streetcar", 1, "tracks"),
    ],
    "truck": [("truck", 1, "motor"), ("tractor", 1, "")],
    "boat": [
        ("boat", 1, "vessel"),
        ("ship", 1, "vessel"),
        ("gondola", 4, "boat"),
        ("catamaran", 1, "sailboat"),
        ("trimaran", 1, "hull"),
    ],
    "traffic light": [("traffic_light", 1, "signal")],
    "parking meter": [("parking_meter", 1, "timer")],
    "bench": [("bench", 1, "seat"), ("park_bench", 1, "bench")],
    "bird": [("bird", 1, "feather")],
    "cat": [("domestic_cat", 1, "cat")],
    "dog": [("dog", 1, "canis")],
    "horse": [("horse", 1, "hoofed")],
    "sheep": [("sheep", 1, "ruminant")],
    "cow": [("cattle", 1, "bovine"), ("ox", 1, "cattle")],
    "elephant": [("elephant", 1, "trunk")],
    "bear": [("bear", 1, "mammal")],
    "zebra": [("zebra", 1, "equine")],
    "giraffe": [("giraffe", 1, "neck")],
    "backpack": [("backpack", 1, "bag")],
    "umbrella": [("umbrella", 1, "canopy")],
    "handbag": [("bag", 4, "")],
    "tie": [("necktie", 1, "neck"), ("bow_tie", 1, "tie")],
    "suitcase": [("bag", 6, "")],
    "skis": [("ski", 1, "runner")],
    "sports ball": [("ball", 1, "game")],
    "tennis racket": [("racket", 4, "")],
    "bottle": [("bottle", 1, "vessel"), ("water_jug", 1, "")],
    "wine glass": [("wineglass", 1, "glass"), ("goblet", 1, "glass")],
    "cup": [("cup", 1, "handle"), ("mug", 4, "drinking"), ("cup", 2, "quantity")],
    "knife": [("knife", 2, "blade"), ("cleaver", 1, "knife")],
    "spoon": [("spoon", 1, "")],
    "bowl": [("bowl", 3, "dish"), ("mixing_bowl", 1, "bowl")],
    "banana": [("banana", 2, "fruit")],
    "apple": [("apple", 1, "fruit")],
    "orange": [("orange", 1, "citrus")],
    "sandwich": [("sandwich", 1, "bread")],
    "broccoli": [("broccoli", 2, "")],
    "hot dog": [("hotdog", 2, "bun")],
    "pizza": [("pizza", 1, "dough")],
    "donut": [("doughnut", 2, "")],
    "cake": [("cake", 3, "")],
    "chair": [("chair", 1, "seat")],
    "couch": [("sofa", 1, "seat")],
    "potted plant": [("pot", 4, "plant")],
    "bed": [("bed", 1, "sleep")],
    "dining table": [("dining_table", 1, "")],
    "toilet": [("toilet", 2, "bowl"), ("toilet_seat", 1, "")],
    "tv": [
        ("television_receiver", 1, "electronic"),
        ("monitor", 4, "display"),
        ("screen", 3, "cathode"),
        ("home_theater", 1, ""),
    ],
    "laptop": [("laptop", 1, "computer"), ("notebook", 2, "computer")],
    "mouse": [("mouse", 4, "cursor")],
    "remote": [("remote_control", 1, "")],
    "keyboard": [("computer_keyboard", 1, ""), ("typewriter_keyboard", 1, "")],
    "cell phone": [("cellular_telephone", 1, "")],
    "microwave": [("microwave", 2, "oven")],
    "oven": [("oven", 1, "kitchen"), ("stove", 1, "cooking")],
    "toaster": [("toaster", 2, "")],
    "sink": [("sink", 1, "basin"), ("washbasin", 2, "")],
    "refrigerator": [("refrigerator", 1, "")],
    "book": [("book", 2, ""), ("comic_book", 1, ""), ("book_jacket", 1, "")],
    "clock": [("clock", 1, "time")],
    "vase": [("vase", 1, "")],
    "scissors": [("scissors", 1, "")],
    "teddy bear": [("teddy", 1, "")],
    "hair drier": [("hand_blower", 1, "")],
    "toothbrush": [("toothbrush", 1, "")],
}
# Anchors given by WordNet offset, where the ImageNet class is a sense the lemma table misses
# (ImageNet's 'cup' is a punch, its 'stove' any heater, its 'television' the system; the photos
# are cups, kitchen stoves and TV sets).
OFFSET_ANCHORS: dict[str, str] = {
    "06277280": "tv",
    "03782006": "tv",
    "03180011": "tv",  # television, monitor, desktop computer
    "07930864": "cup",
    "04330267": "oven",
    "04026417": "handbag",
    "02766320": "bed",
}
# Classes that WordNet puts under an anchor but whose photos are not that COCO category.
EXCLUDE = {"03259280": "Dutch oven (a pot)", "04023962": "punching bag"}
# ImageNet has no person class; these imply that a person is (probably) there.
PERSON_ANCHORS = [
    ("person", 1, "human"),
    ("clothing", 1, ""),
    ("headdress", 1, ""),
    ("footwear", 2, ""),
    ("sports_equipment", 1, ""),
    ("mask", 4, "face"),
    ("brassiere", 1, ""),
    ("swimsuit", 1, ""),
]
# Caption words are taken from a class's own names and its hypernyms this many steps up at most
# (then the COCO category's own words); abstract ancestors never name a photo.
WORD_DEPTH = 3
STOP_WORDS = {
    "object",
    "entity",
    "whole",
    "artifact",
    "thing",
    "unit",
    "structure",
    "device",
    "instrumentality",
    "container",
    "equipment",
    "covering",
    "commodity",
    "matter",
    "substance",
    "food",
    "solid",
    "organism",
    "being",
    "animal",
    "vertebrate",
    "mammal",
    "placental",
    "carnivore",
    "implement",
    "system",
    "article",
    "ware",
    "way",
    "area",
    "region",
    "location",
    "geological_formation",
    "formation",
    "shape",
    "form",
    "part",
    "piece",
    "material",
    "stuff",
    "abstraction",
}


def parse_data_noun(path: Path) -> dict[str, dict]:
    """offset -> {lemmas, hypernym offsets (instance hypernyms too), gloss}."""
    synsets = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields_part, _, gloss = line.partition(" | ")
        fields = fields_part.split()
        offset, word_count = fields[0], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].lower().split("(")[0] for i in range(word_count)]
        i = 4 + 2 * word_count
        pointer_count, i = int(fields[i]), i + 1
        hypernyms = []
        for _ in range(pointer_count):
            symbol, target, pos = fields[i], fields[i + 1], fields[i + 2]
            if symbol in ("@", "@i") and pos == "n":
                hypernyms.append(target)
            i += 4
        synsets[offset] = {"lemmas": lemmas, "hypers": hypernyms, "gloss": gloss.strip()}
    return synsets


def parse_index_noun(path: Path) -> dict[str, list[str]]:
    """lemma -> its synset offsets, sense 1 first."""
    index = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        index[fields[0]] = fields[-int(fields[2]) :]
    return index


def resolve(index: dict, synsets: dict, anchors: list[tuple[str, int, str]]) -> dict[str, str]:
    """(lemma, sense, a word its gloss must hold) -> {offset: "lemma.n.NN"}; mismatches are printed."""
    out = {}
    for lemma, sense, must in anchors:
        offsets = index.get(lemma)
        if not offsets or sense > len(offsets):
            print(f"MISSING anchor {lemma}.{sense}")
            continue
        offset = offsets[sense - 1]
        synset = synsets[offset]
        if must and must not in synset["gloss"].lower() and must not in synset["lemmas"]:
            print(f"CHECK anchor {lemma}.{sense}: {synset['lemmas']} {synset['gloss'][:80]!r} lacks {must!r}")
        out[offset] = f"{lemma}.n.{sense:02d}"
    return out


def ancestors_by_depth(synsets: dict, offset: str) -> list[tuple[int, str]]:
    """[(depth, offset)] of a synset and its hypernym closure, nearest first."""
    seen, queue, order = {offset}, deque([(0, offset)]), []
    while queue:
        depth, current = queue.popleft()
        order.append((depth, current))
        for parent in synsets[current]["hypers"]:
            if parent not in seen:
                seen.add(parent)
                queue.append((depth + 1, parent))
    return order


def imagenet_classes() -> list[tuple[str, str]]:
    """[(synset id "n01440764", its label)] in class-index order."""
    synset_ids = (TIMM_INFO / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1) for line in (TIMM_INFO / "imagenet_synset_to_lemma.txt").read_text().splitlines()
    )
    return [(s, lemmas[s].split(",")[0].strip()) for s in synset_ids]


def class_entry(
    chain: list[tuple[int, str]],
    label: str,
    synsets: dict,
    anchor_of: dict[str, str],
    person_anchors: dict[str, str],
    vocab: set[str],
) -> dict:
    """One class's label, COCO category, caption words and implies_person."""
    category = next((anchor_of[o] for _, o in chain if o in anchor_of), None)
    if chain[0][1] in EXCLUDE:
        category = None
    words: list[str] = []
    for depth, offset in chain:
        if depth > WORD_DEPTH:
            break
        words += [
            w for w in synsets[offset]["lemmas"] if w in vocab and w not in STOP_WORDS and w not in words
        ]
    if category:
        words += [
            w for w in COCO_SYNONYMS.get(category, []) if w in vocab and " " not in w and w not in words
        ]
    implies = any(o in person_anchors for _, o in chain)
    return {"label": label, "coco": category, "words": words, "implies_person": implies}


def build(vocabulary: list[str]) -> dict:
    synsets = parse_data_noun(WORDNET / "data.noun")
    index = parse_index_noun(WORDNET / "index.noun")
    anchor_of = {off: cat for cat, anchors in ANCHORS.items() for off in resolve(index, synsets, anchors)}
    anchor_of |= OFFSET_ANCHORS
    person_anchors = resolve(index, synsets, PERSON_ANCHORS)
    vocab = set(vocabulary)
    classes = [
        class_entry(ancestors_by_depth(synsets, wnid[1:]), label, synsets, anchor_of, person_anchors, vocab)
        for wnid, label in imagenet_classes()
    ]
    objects = ObjectVocabulary()
    word_category = {}
    for word in vocabulary:  # single caption words -> category, read as the grounding evaluation reads them
        known, category = objects.lookup([word])
        if known and category:
            word_category[word] = category
    return {
        "source": "WordNet 3.0 (Debian wordnet-base data.noun) hypernyms of timm's ImageNet-1k "
        "synsets; scripts/make_imagenet_words.py",
        "classes": classes,
        "word_category": word_category,
    }


def dump(table: dict) -> str:
    """Compact JSON, one class per line (small, and diffs read well)."""
    rows = ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in table["classes"])
    words = json.dumps(table["word_category"], separators=(",", ":"), sort_keys=True)
    return (
        f'{{"source": {json.dumps(table["source"])},\n "classes": [\n  {rows}\n ],\n'
        f' "word_category": {words}\n}}\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "weights"), help="model folder whose vocabulary to use")
    parser.add_argument("--output", default=str(ROOT / "captioner/model/imagenet_words.json"))
    args = parser.parse_args()
    vocabulary = json.loads((Path(args.model) / "config.json").read_text())["vocabulary"]
    table = build(vocabulary)
    Path(args.output).write_text(dump(table))
    classes = table["classes"]
    print(
        f"classes with a COCO category: {sum(bool(c['coco']) for c in classes)}/1000, "
        f"{len({c['coco'] for c in classes if c['coco']})} categories; implies_person: "
        f"{sum(c['implies_person'] for c in classes)}; "
        f"with caption words: {sum(bool(c['words']) for c in classes)}"
    )
    print("dog breeds -> dog:", sum(c["coco"] == "dog" for c in classes[151:269]), "/ 118")
    print("person classes:", [c["label"] for c in classes if c["coco"] == "person"])


if __name__ == "__main__":
    main()
