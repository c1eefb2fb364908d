"""Which COCO object categories a caption names: the synonym table (caption words and phrases
per category) and the caption -> object mapping the grounding and focus evaluations share.

A category counts once per caption, at its first mention; plurals are read as their singular,
and two-word names ("hot dog", "teddy bear") win over their last word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# COCO category -> the caption words and phrases that name it (singular; plurals are found by
# `singular`). Left out on purpose: a single "orange" (in Flickr8k-style captions it is nearly
# always a colour), sport names that usually mean the game ("football", "baseball", "basketball"),
# and words that name several categories ("bag", "board", "glass").
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": [
        "person",
        "people",
        "man",
        "woman",
        "boy",
        "girl",
        "child",
        "kid",
        "baby",
        "toddler",
        "guy",
        "lady",
        "gentleman",
        "adult",
        "teenager",
        "teen",
        "player",
        "skier",
        "surfer",
        "snowboarder",
        "skateboarder",
        "biker",
        "cyclist",
        "bicyclist",
        "rider",
        "climber",
        "swimmer",
        "runner",
        "hiker",
        "dancer",
        "performer",
        "athlete",
        "worker",
        "officer",
        "policeman",
        "soldier",
        "spectator",
        "tourist",
        "pedestrian",
        "mother",
        "father",
        "son",
        "daughter",
        "bride",
        "groom",
        "cowboy",
        "skater",
        "wakeboarder",
        "windsurfer",
        "batter",
        "pitcher",
        "catcher",
        "goalie",
        "fireman",
        "firefighter",
        "chef",
        "student",
    ],
    "bicycle": ["bicycle", "bike", "tricycle"],
    "car": ["car", "suv", "taxi", "jeep", "van", "sedan"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "dirt bike", "scooter", "moped"],
    "airplane": ["airplane", "plane", "jet", "aeroplane", "aircraft", "airliner"],
    "bus": ["bus"],
    "train": ["train", "locomotive"],
    "truck": ["truck", "firetruck", "fire truck", "pickup truck"],
    "boat": ["boat", "ship", "canoe", "kayak", "sailboat", "yacht", "raft", "ferry"],
    "traffic light": ["traffic light", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench"],
    "bird": [
        "bird",
        "seagull",
        "gull",
        "duck",
        "pigeon",
        "pelican",
        "swan",
        "goose",
        "parrot",
        "chicken",
        "owl",
        "eagle",
    ],
    "cat": ["cat", "kitten", "kitty"],
    "dog": [
        "dog",
        "puppy",
        "pup",
        "husky",
        "labrador",
        "dalmatian",
        "terrier",
        "poodle",
        "dachshund",
        "collie",
        "retriever",
        "hound",
        "greyhound",
        "beagle",
        "bulldog",
        "shepherd dog",
        "sheepdog",
    ],
    "horse": ["horse", "pony", "foal"],
    "sheep": ["sheep", "lamb"],
    "cow": ["cow", "cattle", "bull", "calf", "ox"],
    "elephant": ["elephant"],
    "bear": ["bear"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack", "rucksack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse"],
    "tie": ["tie", "necktie"],
    "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["ski", "skis"],
    "snowboard": ["snowboard"],
    "sports ball": ["ball", "soccer ball", "tennis ball", "beach ball", "volleyball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "mitt"],
    "skateboard": ["skateboard"],
    "surfboard": ["surfboard"],
    "tennis racket": ["tennis racket", "racket", "racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "wineglass"],
    "cup": ["cup", "mug"],
    "fork": ["fork"],
    "knife": ["knife"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "orange": ["oranges", "tangerine"],  # not "orange": in captions it is mostly a colour
    "sandwich": ["sandwich", "burger", "hamburger"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog", "corndog"],
    "pizza": ["pizza"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"],
    "couch": ["couch", "sofa"],
    "potted plant": ["potted plant", "houseplant"],
    "bed": ["bed"],
    "dining table": ["table", "dining table"],
    "toilet": ["toilet"],
    "tv": ["tv", "television"],
    "laptop": ["laptop", "computer"],
    "mouse": ["mouse"],
    "remote": ["remote", "remote control"],
    "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "cellphone", "phone", "smartphone"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer"],
    "toothbrush": ["toothbrush"],
}

# Phrases that contain a name above but name something else ("bus stop" is not a bus): they
# are read as one unit and count as no object.
NOT_OBJECTS = [
    "bus stop",
    "train station",
    "train track",
    "jet ski",
    "ski lift",
    "ski slope",
    "ski resort",
    "bike path",
    "bike trail",
    "bike lane",
    "dog park",
    "dog show",
    "car park",
    "phone booth",
    "table cloth",
]

IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "people",
    "mice": "mouse",
    "knives": "knife",
    "geese": "goose",
    "oxen": "ox",
    "gentlemen": "gentleman",
    "firemen": "fireman",
    "policemen": "policeman",
    "sheep": "sheep",
    "fish": "fish",
}


def singular(word: str) -> list[str]:
    """The forms a caption word may be a plural of, most likely first ("puppies" -> puppy)."""
    if word in IRREGULAR_PLURALS:
        return [IRREGULAR_PLURALS[word]]
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        forms.append(word[:-1])
    return forms


@dataclass
class Mention:
    """The first word (or phrase) of a caption that names a category."""

    category: str
    phrase: str  # as written in the caption, e.g. "puppies" or "hot dog"
    index: int  # position in the caption of the phrase's last word (its noun): its attention


class ObjectVocabulary:
    """Maps caption words and phrases to categories, from a {category: [names]} table."""

    def __init__(
        self, synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS, not_objects: Sequence[str] = NOT_OBJECTS
    ):
        self.names: dict[tuple[str, ...], str | None] = {tuple(p.split()): None for p in not_objects}
        for category, names in synonyms.items():
            for name in names:
                key = tuple(name.lower().split())
                if self.names.get(key, category) != category:
                    raise ValueError(
                        f"synonym {name!r} is listed for both {self.names[key]!r} and {category!r}"
                    )
                self.names[key] = category
        self.longest = max((len(key) for key in self.names), default=1)

    def lookup(self, phrase: Sequence[str]) -> tuple[bool, str | None]:
        """(whether the table knows the phrase, allowing a plural last word; its category,
        None for NOT_OBJECTS)."""
        *head, last = [w.lower() for w in phrase]
        for form in singular(last):
            key = (*head, form)
            if key in self.names:
                return True, self.names[key]
        return False, None

    def mentions(self, words: Sequence[str]) -> list[Mention]:
        """Each category's first mention, in caption order; longer phrases win ("hot dog")."""
        found: dict[str, Mention] = {}
        i = 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                known, category = self.lookup(words[i : i + n])
                if known:
                    if category is not None:
                        found.setdefault(category, Mention(category, " ".join(words[i : i + n]), i + n - 1))
                    i += n
                    break
            else:
                i += 1
        return list(found.values())
