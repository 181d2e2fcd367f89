"""The synthetic shapes' vocabulary and language: attributes, captions, zero-shot classes and
prompts (`qtx.data.synthetic` renders the images and serves the records)."""
from __future__ import annotations

import re

import numpy as np


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 180, 60),
    "cyan": (30, 210, 225),
    "blue": (40, 80, 235),
    "purple": (150, 55, 205),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
# Diameter of the shape as a fraction of the image side (before a +-8% jitter).
SIZES: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.44}
# Position name -> (row, column) of the cell on the 3x3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
# Location phrases per position; each contains the position's name.
_LOCATIONS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right corner", "at the top right"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "at the center"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right corner", "at the bottom right"),
}
# Caption templates. A part in [brackets] is left out, brackets and all, when the caption does
# not mention the attribute inside it (size and position are optional in training captions).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a[ {size}] {color} {shape}[ {loc}].",
    "a photo of a[ {size}] {color} {shape}[ {loc}].",
    "there is a[ {size}] {color} {shape}[ {loc}].",
    "[{Loc}, ]a[ {size}] {color} {shape}.",
    "an image of a[ {size}] {color} {shape}[ {loc}].",
    "a {color} {shape}[, {size}][, {loc}].",
    "a[ {size}] {shape} colored {color}[, {loc}].",
    "one[ {size}] {color} {shape}[ {loc}] on a plain background.",
    "a simple drawing of a[ {size}] {color} {shape}[ {loc}].",
    "[{size} ]{color} {shape}[, {loc}].",
    "the {shape} is {color}[ and {size}][, {loc}].",
    "a picture showing a[ {size}] {color} {shape}[ {loc}].",
)
# Attributes a caption may leave out, and the probability that a training caption leaves out
# each of them (independently). Real captions vary in how much they say; captions that name
# only colour and shape also teach the text tower the zero-shot prompts' wording
# ("a photo of a red circle."). Eval captions always name all four attributes.
OPTIONAL_ATTRIBUTES = ("size", "position")
TRAIN_OMIT_PROB = 0.5

CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a {}.",
    "an image of a {}.",
    "there is a {}.",
    "a simple drawing of a {}.",
    "a {} on a plain background.",
    "a picture showing a {}.",
]
NUM_CLASSES = len(CLASS_NAMES)
CHANCE_TOP1 = 1.0 / NUM_CLASSES

ATTRIBUTES = ("color", "shape", "size", "position")
_VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
}




def check_attributes(attrs: dict) -> None:
  """Raises ValueError if an attribute is missing or has an unknown value."""
  for name in ATTRIBUTES:
    if name not in attrs:
      raise ValueError(f"attributes {attrs!r} lack {name!r}; need all of {ATTRIBUTES}")
    if attrs[name] not in _VALUES[name]:
      raise ValueError(f"unknown {name} {attrs[name]!r}; choose one of {_VALUES[name]}")


# ---------------------------------------------------------------------------------------------
# Attributes, labels, captions


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
  """Draws colour, shape, size and position uniformly and independently."""
  return {name: _VALUES[name][rng.integers(len(_VALUES[name]))] for name in ATTRIBUTES}


def label_of(attrs: dict) -> int:
  """Zero-shot class index of the attributes: its index in CLASS_NAMES (colour + shape)."""
  return list(COLORS).index(attrs["color"]) * len(SHAPES) + SHAPES.index(attrs["shape"])


def _with_articles(text: str) -> str:
  """'a orange' -> 'an orange' (and at the start of the text)."""
  return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def caption(attrs: dict, rng: np.random.Generator | None = None,
            template: int | None = None, omit: tuple[str, ...] = ()) -> str:
  """One caption naming the colour, shape, size and position of `attrs`.

  The template (and the wording of the location) is drawn from `rng`; `template` picks a fixed
  template index instead. With neither, template 0 and the first location wording are used.
  `omit` lists attributes of OPTIONAL_ATTRIBUTES ('size', 'position') the caption leaves out.
  """
  check_attributes(attrs)
  num = len(CAPTION_TEMPLATES)
  if template is not None and not (isinstance(template, (int, np.integer)) and 0 <= template < num):
    raise ValueError(f"template must be an int in [0, {num}); got {template!r}")
  bad = [a for a in omit if a not in OPTIONAL_ATTRIBUTES]
  if bad or isinstance(omit, str):
    raise ValueError(f"omit={omit!r}: only {OPTIONAL_ATTRIBUTES} can be left out of a caption")
  locs = _LOCATIONS[attrs["position"]]
  if template is None:
    template = 0 if rng is None else int(rng.integers(num))
  loc = locs[0] if rng is None else locs[int(rng.integers(len(locs)))]
  dropped = {"size"} if "size" in omit else set()
  dropped |= {"loc", "Loc"} if "position" in omit else set()

  def optional(m: re.Match) -> str:
    return "" if set(re.findall(r"\{(\w+)\}", m.group(1))) & dropped else m.group(1)

  text = re.sub(r"\[([^\]]*)\]", optional, CAPTION_TEMPLATES[template])
  text = text.format(size=attrs["size"], color=attrs["color"], shape=attrs["shape"], loc=loc,
                     Loc=loc[0].upper() + loc[1:])
  return _with_articles(text)


# Words that carry no information about the image (each one BPE token); `data.synthetic.filler`
# inserts them into captions, so that most text positions have nothing to contribute.
FILLER_WORDS: tuple[str, ...] = ("well", "so", "um", "like", "just", "really", "okay", "yeah")


def add_filler(text: str, count: int, rng: np.random.Generator) -> str:
  """`text` with `count` words of FILLER_WORDS inserted at uniformly drawn word boundaries
  (start and end included); the caption's own words keep their order."""
  words = text.split()
  for _ in range(int(count)):
    words.insert(int(rng.integers(len(words) + 1)), FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))])
  return " ".join(words)


def parse_caption(text: str, partial: bool = False) -> dict[str, str]:
  """Recovers the attributes named in a caption (the inverse of `caption`).

  Raises ValueError if the caption does not name exactly one value of each attribute. With
  `partial=True`, size and position may be absent (captions made with `omit`); the result then
  holds only the attributes the caption names.
  """
  words = re.findall(r"[a-z]+", text.lower())
  attrs = {}
  for name in ("color", "shape", "size"):
    found = [w for w in words if w in _VALUES[name]]
    if not found and partial and name in OPTIONAL_ATTRIBUTES:
      continue
    if len(set(found)) != 1:
      raise ValueError(f"caption {text!r} names {name} values {found}; expected exactly one")
    attrs[name] = found[0]
  vertical = {w for w in words if w in ("top", "bottom")}
  horizontal = {w for w in words if w in ("left", "right")}
  if len(vertical) > 1 or len(horizontal) > 1:
    raise ValueError(f"caption {text!r} names contradicting positions")
  position = " ".join(sorted(vertical) + sorted(horizontal))
  if not position:
    if "center" not in words:
      if partial:
        return attrs
      raise ValueError(f"caption {text!r} names no position; expected one of {tuple(POSITIONS)}")
    position = "center"
  attrs["position"] = position
  return attrs


def one_attribute_variants(attrs: dict) -> list[dict[str, str]]:
  """All attribute dicts that differ from `attrs` in exactly one attribute (20 of them)."""
  check_attributes(attrs)
  out = []
  for name in ATTRIBUTES:
    for value in _VALUES[name]:
      if value != attrs[name]:
        out.append({**attrs, name: value})
  return out


def hard_negative_captions(attrs: dict, template: int = 0) -> list[str]:
  """Captions (one fixed template) that differ from `attrs`' caption in exactly one attribute.

  Compare them with `caption(attrs, template=template)` for a one-attribute retrieval check.
  """
  return [caption(a, template=template) for a in one_attribute_variants(attrs)]


def zeroshot_prompts(ensemble: str = "templates") -> list[list[str]]:
  """Per class (in CLASS_NAMES order), the prompts whose mean embedding stands for the class.

  ensemble='templates': the class name in each of TEMPLATES ("a photo of a red circle.").
  ensemble='attributes': one caption per size and position the class can appear with
  ("a small red circle in the top left corner.", ...; 27 per class) - prompt ensembling over
  the attributes the class name leaves open, in the captions' own wording. No image labels are
  used either way.
  """
  if ensemble == "templates":
    return [[_with_articles(t.format(name)) for t in TEMPLATES] for name in CLASS_NAMES]
  if ensemble == "attributes":
    out = []
    for color in COLORS:
      for shape in SHAPES:
        out.append([caption({"color": color, "shape": shape, "size": size, "position": pos},
                            template=0) for size in SIZES for pos in POSITIONS])
    return out
  raise ValueError(f"unknown prompt ensemble {ensemble!r}; choose 'templates' or 'attributes'")
