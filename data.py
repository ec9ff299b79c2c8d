"""Preference pairs (HPDv3 JSON / JSONL) and prompt sets, with one clear error for every bad input.

Pair records: {"prompt", "path1" (always the preferred image), "path2", optional "confidence"}; image paths are
relative to the file's image folder. Prompt sets: .txt (one prompt a line) or .jsonl with a "prompt" field.
"""
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


class UserError(Exception):
    """A bad input the user can fix; scripts print it as one line and exit."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    winner: str  # path of the preferred image
    loser: str
    confidence: float | None = None


def parse_data_spec(spec):
    """'pairs.json' or 'pairs.json:IMAGE_DIR' -> (file, image folder); the folder defaults to the file's own."""
    path, _, image_dir = spec.partition(":")
    return path, image_dir or os.path.dirname(os.path.abspath(path))


def read_records(path):
    """A list of dicts from a JSON list or a JSONL file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def read_pairs(path, image_dir, min_confidence=0.95, skip_bad=False):
    """Preference pairs of one file. Returns (pairs, number skipped). Records under the confidence threshold are
    dropped (not counted as bad); records without a confidence are kept. A bad record is an error naming the
    file, record index and field, or, with skip_bad, is skipped and counted; never replaced by another record."""
    pairs, skipped = [], 0
    for index, record in enumerate(read_records(path)):
        try:
            if not isinstance(record, dict):
                raise UserError(f"{path}: record {index} is not an object")
            for field in ("prompt", "path1", "path2"):
                if not isinstance(record.get(field), str) or not record[field]:
                    raise UserError(f"{path}: record {index} lacks a non-empty string field '{field}'")
            confidence = record.get("confidence")
            if confidence is not None and not isinstance(confidence, (int, float)):
                raise UserError(f"{path}: record {index} field 'confidence' is not a number")
            if confidence is not None and confidence < min_confidence:
                continue
            images = [os.path.join(image_dir, record[f]) for f in ("path1", "path2")]
            for field, image in zip(("path1", "path2"), images):
                if not os.path.isfile(image):
                    raise UserError(f"{path}: record {index} field '{field}': image {image} does not exist")
                if skip_bad:  # a header read finds unreadable files now, so none is met mid-training
                    load_image(image, None)
            pairs.append(Pair(record["prompt"], images[0], images[1], confidence))
        except UserError:
            if not skip_bad:
                raise
            skipped += 1
    return pairs, skipped


def load_image(path, size):
    """An RGB image resized to size x size (square, bicubic) as a (3, size, size) tensor in [-1, 1].
    size None only checks that the file opens as an image."""
    try:
        with Image.open(path) as img:
            if size is None:
                img.verify()
                return None
            img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    except (OSError, SyntaxError) as e:
        raise UserError(f"{path}: unreadable image ({e})") from None
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1


class PreferencePairs(torch.utils.data.Dataset):
    def __init__(self, pairs, resolution):
        self.pairs, self.resolution = pairs, resolution

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        return dict(prompt=pair.prompt, winner=load_image(pair.winner, self.resolution),
                    loser=load_image(pair.loser, self.resolution))


def load_preference_data(specs, resolution, min_confidence=0.95, skip_bad=False):
    """PreferencePairs over several 'file[:image_dir]' specs, and how many bad records were skipped."""
    pairs, skipped = [], 0
    for spec in specs:
        path, image_dir = parse_data_spec(spec)
        file_pairs, file_skipped = read_pairs(path, image_dir, min_confidence, skip_bad)
        pairs += file_pairs
        skipped += file_skipped
    if not pairs:
        raise UserError(f"{', '.join(specs)}: no preference pairs left (confidence >= {min_confidence})")
    return PreferencePairs(pairs, resolution), skipped


def read_prompts(path):
    """Prompts from a .txt file (one a line, blank lines ignored) or a .jsonl file with a "prompt" field."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such prompt file")
    if path.endswith(".jsonl"):
        prompts = []
        for index, record in enumerate(read_records(path)):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f"{path}: line {index + 1} lacks a string field 'prompt'")
            prompts.append(record["prompt"])
    else:
        with open(path) as f:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"{path}: the prompt file holds no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# A small generated preference set: the embedded default for the demo and the tests

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour, shape, size, rng):
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.3)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def degrade(img, rng):
    """A worse image: blurred, noised, or the object recoloured."""
    kind = rng.choice(("blur", "noise", "recolour"))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=img.width / 16))
    if kind == "noise":
        noise = np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 60, (img.height, img.width, 3))
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    pixels = np.asarray(img).copy()
    pixels[(pixels != 245).any(-1)] = (120, 120, 120)
    return Image.fromarray(pixels)


def make_demo_pairs(out_dir, num_pairs, size=64, seed=0, name="pairs.json"):
    """Write num_pairs (clean render, degraded render) pairs for prompts like "a red circle" in HPDv3 layout."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(num_pairs):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        clean = draw_shape(colour, shape, size, rng)
        winner, loser = f"images/{name[:-5]}_{i:05d}_a.png", f"images/{name[:-5]}_{i:05d}_b.png"
        clean.save(os.path.join(out_dir, winner))
        degrade(clean, rng).save(os.path.join(out_dir, loser))
        records.append(dict(prompt=f"a {colour} {shape}", path1=winner, path2=loser, confidence=1.0))
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(records, f, indent=0)
    return os.path.join(out_dir, name)
