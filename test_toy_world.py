"""Tests of the toy world (toy/world.py): the grammar and the held-out split, vocabulary and bad-input errors, and the
oracle against every degradation: a clean render beats the same render degraded, the term responsible for that
degradation is the one that drops, and a stronger degradation hurts more.

    python -m pytest -q test_toy_world.py          # a few seconds

Prompts and renders are drawn fresh each run; the seed is printed with a failing test (rerun with TOY_SEED=...).
Speed is not tested here: bench/bench_oracle.py measures it.
"""
import hashlib
import os
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from toy import world

NUM_IMAGES = 200  # per degradation test
# The term each degradation must lower (more than one: each of them must drop).
RESPONSIBLE = {"blur": ("sharpness",), "noise": ("background",), "smear": ("sharpness",),
               "recolour": ("purity", "presence"), "move": ("placement",), "drop": ("presence",)}


@pytest.fixture
def seed():
    value = int(os.environ.get("TOY_SEED", random.randrange(2 ** 31)))
    print(f"TOY_SEED={value}")
    return value


def random_scenes(seed, n=NUM_IMAGES):
    """n random prompts (all three kinds of prompt in every batch) and a clean render of each."""
    rng = np.random.default_rng(seed)
    prompts = world.all_prompts()
    single, placed, pairs = prompts[:18], prompts[18:90], prompts[90:]
    chosen = [pool[rng.integers(len(pool))] for pool in (single, placed, pairs) for _ in range(n // 3)]
    chosen += [prompts[rng.integers(len(prompts))] for _ in range(n - len(chosen))]
    return chosen, [world.render(p, rng) for p in chosen], rng


# ----------------------------------------------------------------------------------------------------------------
# Grammar and split

def test_grammar():
    prompts = world.all_prompts()
    objects = len(world.COLOURS) * len(world.SHAPES)
    assert len(prompts) == len(set(prompts)) == objects * (1 + len(world.POSITIONS)) + objects * (
        objects - len(world.SHAPES)) * len(world.RELATIONS)
    assert prompts == world.all_prompts()  # a fixed order
    kinds = {"single": 0, "position": 0, "relation": 0}
    for p in prompts:
        spec = world.parse_prompt(p)
        kinds["relation" if spec["relation"] else "position" if spec["position"] else "single"] += 1
        assert all(c in world.COLOURS and s in world.SHAPES for c, s in spec["objects"])
        assert p.startswith("an orange" if spec["objects"][0][0] == "orange" else "a ")
    assert kinds == {"single": objects, "position": objects * len(world.POSITIONS),
                     "relation": len(prompts) - objects * (1 + len(world.POSITIONS))}
    assert world.parse_prompt("a red circle left of a blue square") == dict(
        objects=[("red", "circle"), ("blue", "square")], position=None, relation="left of")
    assert world.parse_prompt("  An Orange triangle  AT THE top ") == dict(
        objects=[("orange", "triangle")], position="top", relation=None)
    assert world.parse_prompt("a green square") == dict(objects=[("green", "square")], position=None, relation=None)


def test_split_is_fixed_disjoint_and_about_a_fifth():
    train, held_out = world.split_prompts()
    assert (train, held_out) == world.split_prompts()
    assert not set(train) & set(held_out) and sorted(train + held_out) == sorted(world.all_prompts())
    assert 0.15 <= len(held_out) / len(world.all_prompts()) <= 0.25
    # The rule, recomputed here: a scene is held out when the SHA-256 of its canonical form (the relation turned to
    # "left of" / "below") is 0 mod 5. A change of it would silently move prompts between train and test.
    rng = np.random.default_rng()
    for _ in range(40):
        (c1, c2), (s1, s2) = rng.choice(list(world.COLOURS), 2, replace=False), rng.choice(list(world.SHAPES), 2)
        relation = str(rng.choice(world.RELATIONS))
        first, second = (str(c1), str(s1)), (str(c2), str(s2))
        article = lambda colour: "an" if colour[0] in "aeiou" else "a"  # noqa: E731
        prompt = f"{article(first[0])} {first[0]} {first[1]} {relation} {article(second[0])} {second[0]} {second[1]}"
        objects, canonical = (first, second), relation
        if relation in ("right of", "above"):
            objects, canonical = (second, first), {"right of": "left of", "above": "below"}[relation]
        digest = hashlib.sha256(repr((objects, None, canonical)).encode()).hexdigest()
        assert world.is_held_out(prompt) == (int(digest, 16) % 5 == 0), prompt
    assert all(world.is_held_out(p) for p in held_out) and not any(world.is_held_out(p) for p in train)
    # Both wordings of a scene are on the same side; case and spacing do not matter.
    assert world.is_held_out("a red circle below a blue square") == world.is_held_out(
        "a blue square above a red circle")
    assert world.is_held_out("a red circle left of a blue square") == world.is_held_out(
        "a blue square right of a red circle")
    assert world.is_held_out(" A red  circle ") == world.is_held_out("a red circle")
    # The held-out set covers every colour, shape and kind of prompt (a compositional test, not a new vocabulary).
    words = " ".join(held_out)
    assert all(w in words for w in [*world.COLOURS, *world.SHAPES, *world.POSITIONS, *world.RELATIONS])


@pytest.mark.parametrize("prompt,what", [
    ("a pink circle", "pink"), ("a red hexagon", "hexagon"), ("a red circle left of a teal square", "teal"),
    ("a red circle near a blue square", "grammar"), ("a red circle in the middle", "grammar"),
    ("a red circle left of a red square", "differ"), ("", "grammar")])
def test_vocabulary_errors(prompt, what):
    for call in (world.parse_prompt, world.is_held_out, lambda p: world.render(p, np.random.default_rng(0)),
                 lambda p: world.score(np.full((1, 64, 64, 3), 240, np.uint8), [p])):
        with pytest.raises(world.VocabularyError) as error:
            call(prompt)
        message = str(error.value)
        assert what in message and all(w in message for w in [*world.COLOURS, *world.SHAPES, *world.RELATIONS])
    assert issubclass(world.VocabularyError, ValueError)


# ----------------------------------------------------------------------------------------------------------------
# Bad images

def test_bad_images_are_refused():
    rng = np.random.default_rng(0)
    img = world.render("a red circle", rng)
    good = np.asarray(img)[None]  # (1, 64, 64, 3) uint8
    cases = [([img.resize((32, 32))], "64x64"), (np.zeros((1, 128, 128, 3), np.uint8), "64x64"),
             (np.zeros((1, 3, 64, 64), np.uint8), "channels last"), (good[0], "batch"), (img, "list"),
             (good / 255.0, "[0, 1]"), (good - 128.0, "[0, 255]"), (np.full(good.shape, np.nan), "[0, 255]"),
             (np.zeros((1, 64, 64), np.uint8), "64x64"), (np.zeros((1, 64, 64, 4), np.uint8), "64x64"),
             ([good[0], np.zeros((32, 32, 3))], "shapes")]
    for images, words in cases:
        with pytest.raises(ValueError) as error:
            world.score(images, ["a red circle"])
        assert words in str(error.value), (words, str(error.value))
    with pytest.raises(ValueError, match="64x64"):
        world.as_array([img.resize((65, 64))])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        world.score([img, img], ["a red circle"])
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        world.score_terms([img], ["a red circle", "a red circle"])
    with pytest.raises(ValueError, match="list of strings"):
        world.score([img], "a red circle")
    with pytest.raises(ValueError, match="strength"):
        world.degrade(img, "blur", rng, 1.5)
    with pytest.raises(ValueError, match="unknown degradation"):
        world.degrade(img, "jpeg", rng)


def test_inputs_of_every_accepted_kind_score_the_same(seed):
    prompts, images, _ = random_scenes(seed, 12)
    as_uint8 = np.stack([np.asarray(im) for im in images])
    expected = world.score(images, prompts)
    for same in (as_uint8, as_uint8.astype(np.float32), list(as_uint8), [im.convert("RGBA") for im in images],
                 tuple(images)):
        np.testing.assert_array_equal(world.score(same, prompts), expected)
    np.testing.assert_array_equal(world.as_array(images), as_uint8.astype(np.float32))
    assert world.score([], []).shape == (0,)
    assert world.score_terms(np.zeros((0, 64, 64, 3)), [])["placement"].shape == (0,)


# ----------------------------------------------------------------------------------------------------------------
# The oracle on clean and degraded renders

def test_clean_renders_score_high(seed):
    prompts, images, _ = random_scenes(seed, 300)
    terms = world.score_terms(images, prompts)
    scores = world.score(images, prompts)
    assert scores.mean() >= 0.85 and scores.min() >= 0.6, (scores.mean(), scores.min(), prompts[scores.argmin()])
    assert set(terms) == {"presence", "shape", "purity", "placement", "fidelity", "sharpness", "background",
                          "quality"}
    for name, values in terms.items():
        assert values.shape == (300,) and np.all((values >= 0) & (values <= 1)), name
    np.testing.assert_allclose(scores, np.sqrt(terms["fidelity"] * terms["quality"]))
    np.testing.assert_allclose(terms["fidelity"], terms["presence"] * terms["shape"] * terms["purity"]
                               * terms["placement"])


@pytest.mark.parametrize("kind", world.DEGRADATIONS)
def test_clean_beats_degraded_and_the_responsible_term_drops(kind, seed):
    prompts, images, rng = random_scenes(seed)
    degraded = [world.degrade(im, kind, rng, 1.0, prompt=p) for im, p in zip(images, prompts)]
    clean, worse = world.score(images, prompts), world.score(degraded, prompts)
    assert (worse < clean).mean() >= 0.95, (kind, (worse < clean).mean())
    assert worse.mean() < clean.mean() - 0.2, (kind, clean.mean(), worse.mean())
    clean_terms, worse_terms = world.score_terms(images, prompts), world.score_terms(degraded, prompts)
    for name in RESPONSIBLE[kind]:
        dropped = worse_terms[name] < clean_terms[name] - 0.05
        assert dropped.mean() >= 0.95, (kind, name, dropped.mean(), [p for p, d in zip(prompts, dropped) if not d][:5])


@pytest.mark.parametrize("kind", world.DEGRADATIONS)
def test_stronger_degradation_hurts_more(kind, seed):
    """The same degradation (same random draws: which object, which side, ...) at a higher strength lowers the mean
    score. Fresh draws per strength made drop's 0.25 and 0.5 a coin toss in ~3% of seeds (paired: 0 of 60, the mean
    gap >= 0.028)."""
    prompts, images, rng = random_scenes(seed, 120)
    means = [world.score(images, prompts).mean()]
    for strength in (0.1, 0.25, 0.5, 1.0):
        draws = np.random.default_rng(seed + 1)
        degraded = [world.degrade(im, kind, draws, strength, prompt=p) for im, p in zip(images, prompts)]
        means.append(world.score(degraded, prompts).mean())
    assert all(a > b for a, b in zip(means, means[1:])), (kind, np.round(means, 3))
    same = world.degrade(images[0], kind, rng, 0.0, prompt=prompts[0])
    assert np.array_equal(np.asarray(same), np.asarray(images[0]))  # strength 0 changes nothing


def test_degradations_do_what_they_say(seed):
    rng = np.random.default_rng(seed)
    names = list(world.COLOURS)
    colour, other = rng.choice(names, 2, replace=False)
    shape = world.SHAPES[rng.integers(3)]
    single = f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"
    img = world.render(single, rng)
    share = lambda im, name: world.score_terms([im], [f"a {name} circle"])["purity"][0]  # noqa: E731  of all ink
    # drop: a single object is gone, positionally (no prompt) or with it.
    for gone in (world.degrade(img, "drop", rng, 1.0), world.degrade(img, "drop", rng, 1.0, prompt=single)):
        assert np.abs(np.asarray(gone, np.float32) - world.BACKGROUND).max() <= 1
    # recolour: the object is now wholly another named colour.
    recoloured = world.degrade(img, "recolour", rng, 1.0, prompt=single)
    assert share(img, colour) > 0.99 and share(recoloured, colour) < 0.01
    assert sum(share(recoloured, c) > 0.99 for c in names if c != colour) == 1
    # recolour of a pair: the new colour is neither of the prompt's.
    pair = f"a {colour} square above a {other} circle".replace("a orange", "an orange")
    both = world.render(pair, rng)
    recoloured = world.degrade(both, "recolour", rng, 1.0, prompt=pair)
    new = [c for c in names if share(recoloured, c) > 0.2]
    assert len(new) == 2 and len(set(new) - {colour, other}) == 1
    # move: a side prompt ends on the opposite side, a pair swaps, an unpositioned object leaves the centre.
    for prompt, wrong in [(f"{single} on the left", "right"), (f"{single} at the top", "bottom")]:
        moved = world.degrade(world.render(prompt, rng), "move", rng, 1.0, prompt=prompt)
        flipped = prompt.replace("left", "right") if wrong == "right" else prompt.replace("top", "bottom")
        assert world.score_terms([moved], [flipped])["placement"][0] > 0.85
    swapped = world.degrade(both, "move", rng, 1.0, prompt=pair)
    assert world.score_terms([swapped], [pair.replace("above", "below")])["placement"][0] > 0.85
    moved = world.degrade(img, "move", rng, 1.0, prompt=single)
    assert world.score_terms([moved], [single])["placement"][0] < 0.3


def _blob(kind, colour, rng):
    """A single object of about a clean render's size at a random place near the centre, drawn at 4x and box-filtered
    like `world.render`, as one of: a clean disc / square / triangle, an oval, a rectangle, a disc with a notch cut
    out, a square with pinched (concave) sides."""
    scale, size = 4, world.SIZE
    big = Image.new("RGB", (size * scale,) * 2, tuple(int(v) for v in world.BACKGROUND))
    draw = ImageDraw.Draw(big)
    r = world.RADIUS[1] * size * scale * rng.uniform(0.9, 1.1)
    x, y = (0.5 + rng.uniform(-0.05, 0.05, 2)) * size * scale
    ink, bg = world.COLOURS[colour], tuple(int(v) for v in world.BACKGROUND)
    stretch = rng.uniform(1.3, 1.5)
    if kind in ("circle", "notched"):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
        if kind == "notched":  # a wedge of 60-90 degrees cut out, pointing a random way
            start = rng.uniform(0, 360)
            draw.pieslice((x - r, y - r, x + r, y + r), start, start + rng.uniform(60, 90), fill=bg)
    elif kind == "oval":
        draw.ellipse((x - r * stretch, y - r / stretch, x + r * stretch, y + r / stretch), fill=ink)
    elif kind in ("square", "rectangle", "pinched"):
        h = 0.9 * r
        if kind == "rectangle":
            draw.rectangle((x - h * stretch, y - h / stretch, x + h * stretch, y + h / stretch), fill=ink)
        else:
            draw.rectangle((x - h, y - h, x + h, y + h), fill=ink)
        if kind == "pinched":  # each side pushed in by a quarter of the half size at its middle
            for dx, dy in ((0, -1), (0, 1), (-1, 0), (1, 0)):
                mx, my, e = x + dx * h, y + dy * h, 0.5 * h
                draw.ellipse((mx - e, my - e, mx + e, my + e), fill=bg)
    else:  # triangle
        draw.polygon([(x, y - 4 * r / 3), (x - r, y + 2 * r / 3), (x + r, y + 2 * r / 3)], fill=ink)
    return big.resize((size, size), Image.BOX)


def test_shape_term_agrees_with_the_eye(seed):
    """A clean shape gets full marks under its own name and none under the others'; an oval is no circle, a
    rectangle no square, and a notched disc or a square with pinched sides is a worse circle / square than a clean
    one (the shape term and the score both lower), while presence, purity and sharpness stay put."""
    rng = np.random.default_rng(seed)
    colours = [list(world.COLOURS)[i] for i in rng.integers(len(world.COLOURS), size=24)]
    name = lambda colour, shape: f"{'an' if colour == 'orange' else 'a'} {colour} {shape}"  # noqa: E731
    terms = lambda kind, shape: world.score_terms([_blob(kind, c, rng) for c in colours],  # noqa: E731
                                                  [name(c, shape) for c in colours])
    for drawn in world.SHAPES:
        assert np.all(terms(drawn, drawn)["shape"] > 0.9), drawn
        for named in set(world.SHAPES) - {drawn}:
            assert np.all(terms(drawn, named)["shape"] == 0), (drawn, named)
    for bad, shape in (("oval", "circle"), ("rectangle", "square"), ("notched", "circle"), ("pinched", "square")):
        clean, worse = terms(shape, shape), terms(bad, shape)
        assert np.all(worse["shape"] < clean["shape"] - 0.3), (bad, worse["shape"])
        assert np.all(worse["purity"] > 0.99) and np.all(worse["sharpness"] > 0.9), bad


def test_one_object_missing_of_two_is_no_scene(seed):
    """Presence is a product over the objects: erase either object of a two-object render and the score is 0; erase
    half of one and presence is that object's alone: 0.5 / PRESENCE_SHARE ~ 0.59 (the mean over the two would be ~0.8)."""
    prompts, images, rng = random_scenes(seed, 90)
    prompts, images = prompts[60:], images[60:]  # the two-object third
    for erased in (0, 1):
        gone = []
        for prompt, image in zip(prompts, images):
            colour = world.parse_prompt(prompt)["objects"][erased][0]
            a = np.asarray(image, np.float32)
            nearest, ink, _ = world._decompose(a)
            k = list(world.COLOURS).index(colour)
            gone.append(world._to_image(a - (ink * (nearest == k))[..., None] * world._INK_DIRECTION[k]))
        assert np.all(world.score(gone, prompts) == 0), erased
    half = world.score_terms([world.degrade(im, "drop", rng, 0.5, prompt=p) for im, p in zip(images, prompts)],
                             prompts)["presence"]
    assert np.all((half > 0.45) & (half < 0.72)), np.round(half, 2)


def test_extra_object_or_blank_image_scores_low(seed):
    prompts, images, rng = random_scenes(seed, 30)
    blank = Image.new("RGB", (64, 64), tuple(int(v) for v in world.BACKGROUND))
    assert np.all(world.score([blank] * 30, prompts) == 0)
    noise = rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
    assert world.score(noise, prompts).max() < 0.3
    # A clean render of a different scene: something about it is wrong.
    others = [world.all_prompts()[(world.all_prompts().index(p) + 7) % len(world.all_prompts())] for p in prompts]
    assert np.all(world.score(images, others) < world.score(images, prompts))


def test_determinism(seed):
    prompts, images, _ = random_scenes(seed, 40)
    again_prompts, again, _ = random_scenes(seed, 40)
    assert prompts == again_prompts and all(a.tobytes() == b.tobytes() for a, b in zip(images, again))
    for kind in world.DEGRADATIONS:
        one = [world.degrade(im, kind, np.random.default_rng(seed), 0.7, prompt=p) for im, p in zip(images, prompts)]
        two = [world.degrade(im, kind, np.random.default_rng(seed), 0.7, prompt=p) for im, p in zip(images, prompts)]
        assert all(a.tobytes() == b.tobytes() for a, b in zip(one, two)), kind
    scores = world.score(images, prompts)
    np.testing.assert_array_equal(scores, world.score(images, prompts))
    # An image's score does not depend on the rest of its batch.
    in_parts = np.concatenate([world.score(images[i:i + 7], prompts[i:i + 7]) for i in range(0, 40, 7)])
    np.testing.assert_allclose(in_parts, scores, rtol=0, atol=1e-6)


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "assets", "pipeline")


def test_shipped_pipeline_loads_in_diffusers_and_generates(seed):
    """The committed toy pipeline is a plain diffusers folder with SD3.5's features, and it follows held-out
    prompts: the named colours are there (presence, purity) far more than those of other prompts."""
    import torch
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(ASSETS, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.transformer.config
    assert config.qk_norm == "rms_norm" and len(config.dual_attention_layers) > 0
    assert pipe.vae.config.latent_channels == 16
    import model
    assert model.default_sequence_length(pipe) == 16  # the T5 length it was trained with, recorded in the folder
    held_out = world.split_prompts()[1]
    prompts = [held_out[i] for i in np.random.default_rng(seed).integers(len(held_out), size=16)]
    images = pipe(prompt=prompts, num_inference_steps=10, guidance_scale=4.5, height=64, width=64,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="np").images
    assert images.shape == (16, 64, 64, 3)
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    assert pixels.std() > 20  # not a blank or constant image
    own = world.score_terms(pixels, prompts)
    others = world.score_terms(pixels, [held_out[(held_out.index(p) + 7) % len(held_out)] for p in prompts])
    assert own["presence"].mean() > others["presence"].mean() + 0.2, (own["presence"], others["presence"])
    assert own["purity"].mean() > others["purity"].mean() + 0.2, (own["purity"], others["purity"])


@pytest.mark.parametrize("guidance", [1.0, 4.5])  # the build's base samples, and CFG samples it was not trained on
def test_shipped_drm_ranks_held_out_pairs_like_the_oracle(guidance):
    """The committed DRM over the committed pipeline, on a fixed set of held-out pairs: samples of 24 held-out
    prompts (6 seeds each, 20 steps), every pair of samples of a prompt whose oracle scores differ by >= 0.15 (the
    confidence the DRM was trained at); the DRM's clean scores order >= 85% of them as the oracle does."""
    import itertools
    import torch
    import model
    pipe = model.load_pipeline(ASSETS)
    pipe.set_progress_bar_config(disable=True)
    drm, _ = model.load_drm(os.path.join(os.path.dirname(ASSETS), "drm.safetensors"), pipe.transformer)
    held_out = world.split_prompts()[1]
    prompts = [p for p in held_out[::len(held_out) // 24][:24] for _ in range(6)]
    images = pipe(prompt=prompts, num_inference_steps=20, guidance_scale=guidance, height=64, width=64,
                  max_sequence_length=16, generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                  output_type="pt").images * 2 - 1  # (N, 3, 64, 64) in [-1, 1]
    oracle = world.score(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), prompts)
    embeds, pooled = model.encode_prompts(pipe, prompts, 16)
    with torch.no_grad():
        scores = model.score_images(drm, pipe.vae, images, embeds, pooled).numpy()
    pairs = [(a, b) for start in range(0, len(prompts), 6) for a, b in itertools.combinations(range(start, start + 6), 2)
             if abs(oracle[a] - oracle[b]) >= 0.15]
    right = [(scores[a] - scores[b]) * (oracle[a] - oracle[b]) > 0 for a, b in pairs]
    assert len(pairs) >= 60, len(pairs)
    assert np.mean(right) >= 0.85, (np.mean(right), len(pairs))


def test_frozen_t5_tells_each_colour_word_where_its_object_goes(seed, monkeypatch):
    """The build's random T5 (new_t5) carries each colour word's role in a two-object prompt, linearly: what the
    generator needs to put the objects in the named order. Without the scaled position biases it does not. One
    init's probe varies (0.76-1.0 scaled, 0.32-0.73 unscaled, 60 seeds), so each side is the mean over 3 inits
    (over 20 such triples: scaled >= 0.88, ahead of unscaled by >= 0.35)."""
    import torch
    from tiny_pipeline import tiny_tokenizers
    from toy import build
    _, tokenizer = tiny_tokenizers(sorted({w for p in world.all_prompts() for w in p.split()}))

    def mean_probe():
        accuracies = []
        for s in range(seed, seed + 3):
            torch.manual_seed(s)
            accuracies.append(build.role_probe_accuracy(build.new_t5(len(tokenizer)), tokenizer,
                                                        *world.split_prompts()))  # fit on train, read held-out
        return float(np.mean(accuracies))

    shipped = mean_probe()
    monkeypatch.setattr(build, "T5_BIAS_SCALE", 1.0)
    unscaled = mean_probe()
    assert shipped >= 0.8 and shipped > unscaled + 0.2, (shipped, unscaled)


def test_t5_candidates_keep_the_best_probe_and_leave_the_rest_of_the_pipeline_alone(seed):
    """--t5-candidates N keeps the T5 whose role probe (on train prompts only) reads best, and every other weight of
    the new pipeline is the one-candidate build's: an A/B of the T5 alone."""
    import torch
    from toy import build
    one, none = build.new_pipeline(seed, layers=2, heads=2)
    three, report = build.new_pipeline(seed, layers=2, heads=2, t5_candidates=3)
    assert none is None and len(report["probes"]) == 3 and 0 <= report["chosen"] < 3
    assert report["probes"][report["chosen"]] == max(report["probes"]) and len(set(report["probes"])) > 1
    train = world.split_prompts()[0]
    kept = build.role_probe_accuracy(three.text_encoder_3, three.tokenizer_3, train[::2], train[1::2])
    assert kept == pytest.approx(max(report["probes"]), abs=1e-4)
    first = build.role_probe_accuracy(one.text_encoder_3, one.tokenizer_3, train[::2], train[1::2])
    assert first == pytest.approx(report["probes"][0], abs=1e-4)  # candidate 0 is the one-candidate T5
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(one, name).state_dict(), getattr(three, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    t5_same = all(torch.equal(v, three.text_encoder_3.state_dict()[k])
                  for k, v in one.text_encoder_3.state_dict().items())
    assert t5_same == (report["chosen"] == 0)


@pytest.mark.parametrize("flags, message", [
    (["--t5-candidates", "0"], "--t5-candidates must be >= 1, got 0"),
    (["--degradations", "blur,fog"], "--degradations: unknown fog; known: "),
    (["--new-text-encoder"], "--new-text-encoder needs --new-transformer"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--transformer-batch-size", "0"], "--transformer-batch-size must be >= 1, got 0")])
def test_build_refuses_bad_flags_in_one_line(flags, message, capsys, tmp_path):
    from toy import build
    with pytest.raises(SystemExit) as exit_info:
        build.parse_args(["--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("stages, missing", [("pairs", "pipeline/model_index.json (the transformer/vae stage"),
                                              ("drm,assets", "prefs/train.json (the pairs stage"),
                                              ("assets", "drm_lora_train_cross/drm.safetensors (the drm stage")])
def test_build_of_later_stages_names_the_missing_input_in_one_line(stages, missing, tmp_path):
    """A run of later stages only (after a stop) over a folder that lacks an earlier stage's output."""
    from toy import build
    with pytest.raises(SystemExit) as exit_info:
        build.main(build.parse_args(["--out", str(tmp_path), "--stages", stages]))
    message = str(exit_info.value.code)
    assert message.startswith(f"--stages {stages.split(',')[0]}: no {tmp_path}") and missing in message, message
    assert "\n" not in message


def test_time_budget_refits_as_the_speed_drifts_and_never_passes_the_planned_count(seed, monkeypatch):
    """toy.build.TimeBudget on a fake clock: steps fast at first, then slower (an H200 run fitted once from its early
    steps overran its budget by ~45%): the loop still ends within one re-fit interval of the budget, and not early.
    With time to spare, or no budget (minutes 0), it runs exactly the planned steps."""
    from toy import build
    clock = [0.0]
    monkeypatch.setattr(build.time, "time", lambda: clock[0])

    def loop(planned, minutes, seconds_per_step):
        budget, total, step = build.TimeBudget(planned, minutes), planned, 0
        while step < total:
            clock[0] += seconds_per_step(step)
            step += 1
            total = budget.fit(step, total)
        return step, budget.seconds()

    rng = np.random.default_rng(seed)
    fast, slow, switch = rng.uniform(0.1, 0.4), rng.uniform(0.8, 2.0), int(rng.integers(80, 400))
    steps, spent = loop(10 ** 6, 10, lambda s: fast if s < switch else slow)
    every = build.TimeBudget(1, 1).every  # steps between re-fits
    assert 600 - 2 * slow <= spent <= 600 + every * slow, (steps, spent)
    planned = int(rng.integers(90, 400))
    assert loop(planned, 10, lambda s: 0.01)[0] == planned
    assert loop(planned, 0, lambda s: 1.0)[0] == planned  # minutes 0: no budget


def test_build_transformer_stage_stopped_by_sigterm_resumes_to_the_same_weights(tmp_path):
    """A transformer stage stopped by SIGTERM saves OUT/transformer_checkpoint.pt and exits non-zero, naming
    --resume; the same command with --resume restores the VAE (not retrained), the transformer, optimizer and batch
    generator, and ends with the weights of an uninterrupted run, bit for bit on the CPU; the checkpoint is removed
    then. A --resume with a changed schedule flag, or with no checkpoint, is refused in one line."""
    import json
    import signal
    import subprocess
    import sys
    import time
    import torch
    from safetensors.torch import load_file
    from toy import build
    flags = ["--num-images", "64", "--vae-steps", "2", "--batch-size", "4", "--steps", "300",
             "--transformer-batch-size", "4", "--layers", "2", "--heads", "2", "--max-prompts", "8",
             "--checkpoint-every", "20", "--stages", "data,vae,transformer",
             "--vae-minutes", "0", "--transformer-minutes", "0"]  # no time caps: a busy machine keeps the steps
    root = os.path.dirname(os.path.abspath(__file__))

    def command(out, *extra):
        return [sys.executable, "-m", "toy.build", "--out", str(out), *flags, *extra]

    whole = subprocess.run(command(tmp_path / "whole"), cwd=root, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out, log = tmp_path / "stopped", tmp_path / "log.txt"
    checkpoint = out / build.CHECKPOINT
    with open(log, "w") as f:
        process = subprocess.Popen(command(out), cwd=root, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    text = log.read_text()
    assert process.returncode != 0 and "the same command with --resume goes on" in text, text[-3000:]
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 20 <= step < 300

    with pytest.raises(SystemExit, match="the checkpoint has --transformer-lr 0.0004, this run has 0.001"):
        build.load_checkpoint(build.parse_args(["--out", str(out), *flags, "--resume", "--transformer-lr", "1e-3"]))
    with pytest.raises(SystemExit, match="--resume: no .*transformer_checkpoint.pt"):
        build.load_checkpoint(build.parse_args(["--out", str(tmp_path / "none"), *flags, "--resume"]))

    resumed = subprocess.run(command(out, "--resume"), cwd=root, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "vae: restored" in resumed.stdout and f"resumed at step {step}/300" in resumed.stdout
    assert not checkpoint.exists()
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder_3/model.safetensors"):
        a, b = load_file(tmp_path / "whole" / "pipeline" / part), load_file(out / "pipeline" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    reports = [json.load(open(folder / "build.json")) for folder in (tmp_path / "whole", out)]
    assert reports[0]["transformer"]["steps"] == reports[1]["transformer"]["steps"] == 300
    assert reports[0]["transformer"]["loss"] == reports[1]["transformer"]["loss"]
    assert reports[0]["vae"]["l1"] == reports[1]["vae"]["l1"]  # the stopped run's report, not a new VAE's


# ----------------------------------------------------------------------------------------------------------------
# The build's cross-prompt pairs

def test_neighbours_differ_in_exactly_one_word(seed):
    from toy.build import neighbours
    rng = np.random.default_rng(seed)
    prompts = [world.all_prompts()[i] for i in rng.choice(len(world.all_prompts()), 300, replace=False)]
    near = neighbours(prompts)
    for i in rng.choice(len(prompts), 40, replace=False):
        a = prompts[i].split()
        expected = [j for j, q in enumerate(prompts) if len(q.split()) == len(a)
                    and sum(x != y for x, y in zip(a, q.split())) == 1]
        assert near[i] == expected and i not in near[i]


def test_cross_pairs_rank_by_the_oracle_under_the_pairs_prompt(seed):
    from toy.build import cross_pairs
    rng = np.random.default_rng(seed)
    unique = world.split_prompts()[0][:60]
    per_prompt = 2
    prompts = [p for p in unique for _ in range(per_prompt)]
    images = np.stack([world.render(p, rng) for p in prompts])
    scores = world.score(images, prompts)
    paths = [f"images/train/{i:06d}.png" for i in range(len(prompts))]
    records = cross_pairs(prompts, paths, images, scores, per_prompt, 3, rng)
    assert records and all(r["kind"] == "cross" for r in records)
    index = {p: i for i, p in enumerate(paths)}
    for r in records:
        win, lose = index[r["path1"]], index[r["path2"]]
        own = [i for i in (win, lose) if prompts[i] == r["prompt"]]
        assert len(own) == 1  # one own sample, one borrowed from another prompt
        borrowed = lose if own[0] == win else win
        assert len(prompts[borrowed].split()) == len(r["prompt"].split())
        under = world.score(images[[win, lose]], [r["prompt"]] * 2)  # both re-scored under the pair's prompt
        assert under[0] > under[1] and abs(r["oracle1"] - under[0]) < 1e-3 and abs(r["oracle2"] - under[1]) < 1e-3
    # Clean renders of a neighbour prompt lose under this prompt: the pairs teach whether an image fits its prompt.
    assert np.mean([prompts[index[r["path1"]]] == r["prompt"] for r in records]) > 0.9


def test_oracle_terms_over_a_pool_are_the_oracles_terms(seed):
    """The pairs stage scores in chunks over worker processes: the same terms, and the same cross pairs, as one
    call in this process."""
    import signal
    from toy.build import cross_pairs, oracle_terms, worker_pool
    rng = np.random.default_rng(seed)
    start = int(rng.integers(900))
    unique = world.split_prompts()[0][start:start + 20]  # neighbouring prompts: cross pairs between them
    prompts = [p for p in unique for _ in range(3)]
    images = np.stack([np.asarray(world.degrade(world.render(p, rng), "blur", rng, float(rng.uniform(0, 1)),
                                                prompt=p).convert("RGB")) for p in prompts])
    expected = world.score_terms(images, prompts)
    paths = [f"images/train/{i:06d}.png" for i in range(len(prompts))]
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a caller that handles SIGTERM
    try:
        with worker_pool(2) as pool:  # its exit terminates the workers: they must not inherit the handler
            terms = oracle_terms(images, prompts, pool, chunk=7)  # uneven chunks
            scores = world.combine(terms)
            pooled = cross_pairs(prompts, paths, images, scores, 3, 4, np.random.default_rng(seed), pool)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert set(terms) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(terms[k], expected[k])
    np.testing.assert_array_equal(scores, world.score(images, prompts))
    assert pooled and pooled == cross_pairs(prompts, paths, images, scores, 3, 4, np.random.default_rng(seed))


def test_deciding_term_is_the_factor_that_differs(seed):
    from toy.evaluate import TERMS, deciding_terms
    rng = np.random.default_rng(seed)
    n = 50
    terms = {k: rng.uniform(0.8, 1.0, 2 * n) for k in TERMS}
    truth = rng.choice(TERMS, n)
    for i, term in enumerate(truth):  # the loser (n + i) is much worse in exactly one factor
        terms[term][n + i] = rng.uniform(0.0, 0.3)
    assert list(deciding_terms(terms, np.arange(n), np.arange(n, 2 * n))) == list(truth)


def test_deciding_shares_name_the_degradation_that_split_each_prompts_samples(seed):
    from toy.build import deciding_shares
    rng = np.random.default_rng(seed)
    per_prompt, kinds = 2, {"blur": "sharpness", "noise": "background"}
    unique = [world.all_prompts()[i] for i in rng.choice(18, 12, replace=False)]  # single objects, unpositioned
    prompts, images, expected = [], [], []
    for i, p in enumerate(unique):  # per prompt: a clean render and the same render degraded at full strength
        kind = list(kinds)[i % 2]
        clean = world.render(p, rng)
        prompts += [p] * per_prompt
        images += [np.asarray(clean), np.asarray(world.degrade(clean, kind, rng, 1.0, prompt=p).convert("RGB"))]
        expected.append(kinds[kind])
    images = np.stack([np.asarray(Image.fromarray(im).convert("RGB")) for im in images])
    scores = world.score(images, prompts)
    out = deciding_shares(world.score_terms(images, prompts), scores, per_prompt)
    from toy.evaluate import TERMS, deciding_terms
    pairs = [(2 * i, 2 * i + 1) for i in range(len(unique)) if abs(scores[2 * i] - scores[2 * i + 1]) >= 0.15]
    assert pairs  # full-strength blur and noise cost far more than 0.15
    win = np.array([a if scores[a] > scores[b] else b for a, b in pairs])
    lose = np.array([b if scores[a] > scores[b] else a for a, b in pairs])
    decided = deciding_terms(world.score_terms(images, prompts), win, lose)
    for term in TERMS:  # the shares are those of the confident clean-vs-degraded pairs, counted here by hand
        assert abs(out["decided_by"][term] - np.mean(decided == term)) < 1e-3
    # and the degradations' own terms decide most of them (a blur also softens the shape's fill now and then)
    assert np.mean([d == expected[a // 2] for d, (a, _) in zip(decided, pairs)]) >= 0.75
    terms = world.score_terms(images, prompts)
    assert all(abs(out["term_means"][t] - terms[t].mean()) < 1e-3 for t in out["term_means"])


# ----------------------------------------------------------------------------------------------------------------
# The build's defaults and the evaluation script

def test_a_continued_generator_starts_a_new_report(tmp_path):
    """--stages transformer over a saved pipeline: build.json records the transformer it continued, and drops the
    earlier samples and DRMs (they describe the old generator)."""
    import json
    import shutil
    from toy import build
    shutil.copytree(ASSETS, tmp_path / "pipeline")
    old = {"transformer": {"steps": int(np.random.default_rng().integers(1, 10_000))}, "samples_test": {"n": 3},
           "drm_lora_train_cross": {"step": 2}}
    (tmp_path / "build.json").write_text(json.dumps(old))
    args = build.parse_args(["--out", str(tmp_path), "--stages", "transformer", "--quick"])
    build.main(args)
    report = json.load(open(tmp_path / "build.json"))
    assert report["continued_from"] == old["transformer"] and report["transformer"]["steps"] == args.steps
    assert "samples_test" not in report and "drm_lora_train_cross" not in report


def test_build_defaults_are_the_shipped_recipe_and_reward_train_accepts_them(tmp_path):
    """`python -m toy.build` with no flags runs the recipe toy/assets/build.json records for the shipped assets:
    every flag of the run that built them (its `args`), and the DRM flags it hands to reward_train.py (parsed by
    reward_train's own parser)."""
    import json
    import reward_train
    from toy import build
    shipped = json.load(open(os.path.join(os.path.dirname(ASSETS), "build.json")))
    assert shipped["recipe"] == ["python -m toy.build --out OUT"]
    args = build.parse_args(["--out", str(tmp_path)])
    expected = {name: value for name, value in shipped["args"].items() if name not in ("out", "resume")}
    assert len(expected) >= 30 and expected["stages"] == "data,vae,transformer,pairs,drm,assets"
    assert {name: getattr(args, name) for name in expected} == expected
    drm = reward_train.parse_args(build.drm_flags(args, args.drm_modes.split(",")[0], args.drm_lr.split(",")[0]))
    recipe = shipped["drm"]
    assert (drm.backbone, drm.lr, drm.batch_size, drm.max_minutes) == (recipe["mode"], recipe["lr"],
                                                                       recipe["batch_size"], recipe["minutes"])
    assert (drm.skip_last_blocks, drm.lora_rank, drm.lora_alpha) == (recipe["skip_last_blocks"],
                                                                     recipe["lora_rank"], recipe["lora_alpha"])
    assert drm.train_data == [os.path.join(str(tmp_path), "prefs", "train_cross.json")]
    assert drm.model == os.path.join(str(tmp_path), "pipeline") and drm.resolution == 64
    assert args.patch_size is None and build.transformer_config(1)["patch_size"] == shipped["transformer"][
        "patch_size"]  # a new pipeline gets patch 1, the shipped one's


def test_evaluate_scores_every_pair_as_the_drm_does(seed, tmp_path):
    """toy.evaluate on a small held-out set (renders of held-out prompts, some degraded, written as the build
    writes pairs): its clean accuracy is what the DRM's own clean scores give pair by pair, every pair is counted
    at every sigma, and the contact sheet is written."""
    import json
    import torch
    import model
    from toy import build, evaluate
    rng = np.random.default_rng(seed)
    held_out = world.split_prompts()[1]
    prompts, images = [], []
    for prompt in [held_out[i] for i in rng.choice(len(held_out), 4, replace=False)]:
        for kind, strength in (("none", 0), ("blur", 0.6), ("noise", 1.0)):
            img = world.render(prompt, rng)
            if kind != "none":
                img = world.degrade(img, kind, rng, strength, prompt=prompt)
            prompts.append(prompt)
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    images = np.stack(images)
    oracle = world.score(images, prompts)
    records, _ = build.write_pairs(str(tmp_path), "test", prompts, images, oracle, 3)
    results = evaluate.main(["--pairs", str(tmp_path / "test.json"), "--out", str(tmp_path / "eval"),
                             "--sheet-prompts", "2"])
    for sigma in evaluate.SIGMAS:
        row = results[f"sigma={sigma:g}"]
        assert row["n"] == len(records) and row["ci95"][0] <= row["acc"] <= row["ci95"][1]
    pipe = model.load_pipeline(ASSETS)
    drm, _ = model.load_drm(os.path.join(os.path.dirname(ASSETS), "drm.safetensors"), pipe.transformer)
    drm.float()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    embeds, pooled = model.encode_prompts(pipe, prompts, build.MAX_SEQUENCE_LENGTH)
    with torch.no_grad():
        scores = model.score_images(drm, pipe.vae, pixels, embeds, pooled).numpy()
    index = {f"images/test/{i:06d}.png": i for i in range(len(images))}
    right = [scores[index[r["path1"]]] > scores[index[r["path2"]]] for r in records]
    assert results["sigma=0"]["acc"] == round(float(np.mean(right)), 4)
    assert results["spearman"]["n"] == len(images)
    assert Image.open(tmp_path / "eval" / "contact_sheet.png").size[0] > 0
    assert json.load(open(tmp_path / "eval" / "results.json"))["pairs"] == len(records)


def test_build_makes_pairs_trains_the_drm_and_writes_the_assets(tmp_path):
    """The build's last stages over a copy of the shipped pipeline at smoke budgets (8 train and 8 held-out
    prompts): HPDv3 pair files (own-prompt pairs and, for the train prompts, cross pairs; winner = higher oracle),
    a LoRA DRM trained by reward_train.py's main in the build's process, and OUT/assets: the pipeline and the DRM
    in fp16, which loads over it. Run as two commands (pairs, then drm and assets): build.json keeps the first one's
    report. A flag reward_train refuses stops the build in one line naming the DRM."""
    import json
    import shutil
    import torch
    from safetensors import safe_open
    import model
    from toy import build
    shutil.copytree(ASSETS, tmp_path / "pipeline")
    flags = ["--out", str(tmp_path), "--max-prompts", "8", "--samples-per-prompt", "4", "--sample-steps", "6",
             "--cross-pairs", "3", "--drm-steps", "2", "--drm-minutes", "0", "--drm-batch-size", "4"]
    build.main(build.parse_args([*flags, "--stages", "pairs"]))  # in two commands, as after a stop:
    build.main(build.parse_args([*flags, "--stages", "drm,assets"]))  # the report keeps the first one's stages
    prefs = tmp_path / "prefs"
    records = {name: json.load(open(prefs / f"{name}.json")) for name in ("train", "test", "train_cross")}
    for name, rows in records.items():
        assert rows, name
        for r in rows:
            assert r["oracle1"] > r["oracle2"] and 0 <= r["confidence"] <= 1
            assert os.path.isfile(prefs / r["path1"]) and os.path.isfile(prefs / r["path2"])
    cross = [r for r in records["train_cross"] if r.get("kind") == "cross"]
    assert cross and records["train_cross"][:len(records["train"])] == records["train"]
    assert {r["prompt"] for r in records["test"]} <= set(world.split_prompts()[1][:8])
    report = json.load(open(tmp_path / "build.json"))
    assert report["drm_lora_train_cross"]["step"] == 2 and report["samples_test"]["n"] == 8 * 4
    with safe_open(str(tmp_path / "assets" / "drm.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    pipe = model.load_pipeline(str(tmp_path / "assets" / "pipeline"))
    drm, _ = model.load_drm(str(tmp_path / "assets" / "drm.safetensors"), pipe.transformer)
    embeds, pooled = model.encode_prompts(pipe, ["a red circle"], build.MAX_SEQUENCE_LENGTH)
    with torch.no_grad():
        score = drm.float()(torch.randn(1, 16, 16, 16), torch.tensor([500.0]), embeds, pooled)
    assert torch.isfinite(score).all()
    with pytest.raises(SystemExit, match="drm_lora_train_cross: reward_train.py: --lora-rank must be >= 1, got 0"):
        build.main(build.parse_args([*flags, "--stages", "drm", "--drm-args", "--lora-rank 0"]))
