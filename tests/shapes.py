"""A tiny synthetic captioning world: coloured shapes on the left or right of a grey canvas.

Captions are exact ("a red circle on the left"), so a model can learn them perfectly, and the
shape's position is known, so we can check where the attention goes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square")
SIDES = ("left", "right")


def shape_image(colour: str, shape: str, side: str, size: int = 224) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    r = size // 6
    cx = size // 4 if side == "left" else 3 * size // 4
    cy = size // 2
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def all_examples() -> list[tuple[Image.Image, str, str]]:
    """(image, caption, side) for every colour x shape x side."""
    return [
        (shape_image(c, s, side), f"a {c} {s} on the {side}", side)
        for c, s, side in itertools.product(COLOURS, SHAPES, SIDES)
    ]


def write_coco_dataset(root: Path, examples=None) -> tuple[Path, Path]:
    """Write the images and a COCO-format captions JSON; returns (json path, image folder)."""
    import json

    examples = examples or all_examples()
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (image, caption, _) in enumerate(examples, start=1):
        name = f"{i:06d}.jpg"
        image.save(image_dir / name, quality=95)
        images.append({"id": i, "file_name": name, "width": image.width, "height": image.height})
        annotations.append({"id": i, "image_id": i, "caption": caption})
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "info": {}, "licenses": []}))
    return path, image_dir


def train_decoder(model, vocab, examples, steps: int = 300, lr: float = 3e-3, seed: int = 0):
    """Overfit the decoder on frozen features of `examples` (the real loss, the real model)."""
    from captioner.training.losses import caption_loss

    torch.manual_seed(seed)
    transform = model.encoder.transform
    pixels = torch.stack([transform(img) for img, _, _ in examples])
    model.eval()
    with torch.no_grad():
        features = model.encoder(pixels)
    encoded = [vocab.encode(caption) for _, caption, _ in examples]
    lengths = torch.tensor([len(e) for e in encoded])
    captions = torch.zeros(len(encoded), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(encoded):
        captions[i, : len(e)] = torch.tensor(e)
    decoder = model.decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits, alphas = decoder(features, captions, lengths)
        loss, _ = caption_loss(logits, captions, alphas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
