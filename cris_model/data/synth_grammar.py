"""Referring-expression grammar of the synthetic scenes: meaning, wording and parsing.

A phrase's meaning is a `Query` over a `Scene`. `evaluate` returns the set of object keys it
selects, or None when the scene leaves it unclear (two shapes about equally far left, sizes
too close to call, a barely touching overlap, "the circle" when there are two). The
generator keeps only phrases whose meaning is clear and selects exactly their targets;
`parse` reads a normalised sentence back into its Query so tests can re-check each phrase.
Left and right are always the plain tokens "left" / "right", so a horizontal flip of the
image is matched by swapping those two words.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "oval", "square", "triangle", "star", "hexagon")
ROUND_SHAPES = frozenset({"circle", "oval"})  # testA's object group; the rest go to testB
POSITIONS = ("left", "right", "top", "bottom")
SIZES = ("largest", "smallest")
RELATIONS = ("left", "right", "above", "below", "front", "behind")

POS_MARGIN = 0.08  # centres must differ by this fraction of the image width/height
SIZE_RATIO = 1.5  # a superlative needs the winner's area this many times the runner-up's
OVERLAP_CLEAR = 0.08  # "in front of" needs this fraction of the back shape hidden

_SIZE_WORDS = {"largest": "largest", "biggest": "largest", "big": "largest",
               "large": "largest", "smallest": "smallest", "small": "smallest",
               "little": "smallest"}
_ANY_NOUNS = ("shape", "object", "one")
_ORDINALS = {"second": 2, "third": 3}
_COUNTS = {"two": 2, "three": 3}
_POSTFIX: dict[tuple[str, ...], str] = {
    ("on", "the", "left"): "left", ("on", "the", "right"): "right",
    ("at", "the", "top"): "top", ("at", "the", "bottom"): "bottom"}
_REL_WORDS = {("to", "the", "left", "of"): "left", ("left", "of"): "left",
              ("to", "the", "right", "of"): "right", ("right", "of"): "right",
              ("above",): "above", ("below",): "below", ("under",): "below",
              ("in", "front", "of"): "front", ("behind",): "behind"}


@dataclass(frozen=True)
class SceneObject:
    """One shape as the grammar sees it; `key` is its annotation id."""

    key: int
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    area: float  # unoccluded area in px^2
    cx: float  # centre x in px (0 = left edge)
    cy: float  # centre y in px (0 = top edge)


@dataclass(frozen=True)
class Scene:
    """The objects of one image and who hides whom."""

    width: int
    height: int
    objects: tuple[SceneObject, ...]
    hidden: dict[tuple[int, int], float]  # (front key, back key) -> fraction of back hidden
    _memo: dict[Desc, list[SceneObject]] = field(  # candidates per head, filled lazily
        default_factory=dict, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Desc:
    """A noun phrase head: an optional colour and an optional shape (None: any)."""

    colour: str | None = None
    shape: str | None = None


@dataclass(frozen=True)
class Query:
    """The meaning of one phrase.

    kind "desc": every object matching `desc`; "extreme": the one matching `desc` that is
    furthest `which` (left/right/top/bottom) or is `which` (largest/smallest); "ordinal":
    the `rank`-th from `which`; "relation": those matching `desc` standing in `relation`
    to the single object matching `landmark`. Singular phrases select at most one object;
    plural ones ("all", "both", "the two") any number, `count` fixing it when given.
    """

    kind: str
    desc: Desc
    which: str | None = None
    rank: int = 1
    relation: str | None = None
    landmark: Desc | None = None
    plural: bool = False
    count: int | None = None


def matches(obj: SceneObject, desc: Desc) -> bool:
    """Whether an object fits a noun phrase head."""
    return (desc.colour is None or obj.colour == desc.colour) and (
        desc.shape is None or obj.shape == desc.shape)


def _candidates(scene: Scene, desc: Desc) -> list[SceneObject]:
    found = scene._memo.get(desc)
    if found is None:
        found = scene._memo[desc] = [o for o in scene.objects if matches(o, desc)]
    return found


def _score(obj: SceneObject, which: str) -> float:
    """Sort key: the object the phrase means comes first."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy,
            "largest": -obj.area, "smallest": obj.area}[which]


def _apart(a: SceneObject, b: SceneObject, which: str, scene: Scene) -> bool:
    """Whether a and b differ clearly along `which` (a before b in its order)."""
    if which in SIZES:
        big, small = max(a.area, b.area), min(a.area, b.area)
        return big >= SIZE_RATIO * small
    dim = scene.width if which in ("left", "right") else scene.height
    return abs(_score(a, which) - _score(b, which)) >= POS_MARGIN * dim


def _related(obj: SceneObject, land: SceneObject, relation: str, scene: Scene) -> bool | None:
    """Three-valued relation: True / False when clear, None in the margin between."""
    if relation in ("front", "behind"):
        pair = (obj.key, land.key) if relation == "front" else (land.key, obj.key)
        frac = scene.hidden.get(pair, 0.0)
        return True if frac >= OVERLAP_CLEAR else (False if frac == 0.0 else None)
    gap = {"left": land.cx - obj.cx, "right": obj.cx - land.cx,
           "above": land.cy - obj.cy, "below": obj.cy - land.cy}[relation]
    dim = scene.width if relation in ("left", "right") else scene.height
    return True if gap >= POS_MARGIN * dim else (False if gap <= 0 else None)


def _select(query: Query, scene: Scene) -> frozenset[int] | None:
    cands = _candidates(scene, query.desc)
    if query.kind == "desc":
        return frozenset(o.key for o in cands)
    if query.kind in ("extreme", "ordinal"):
        need = 2 if query.kind == "extreme" else 3
        if len(cands) < max(need, query.rank):
            return None
        order = sorted(cands, key=lambda o: _score(o, query.which or ""))
        i = query.rank - 1
        neighbours = [order[j] for j in (i - 1, i + 1) if 0 <= j < len(order)]
        if not all(_apart(order[i], n, query.which or "", scene) for n in neighbours):
            return None
        return frozenset({order[i].key})
    if query.kind == "relation" and query.landmark is not None:
        lands = _candidates(scene, query.landmark)
        if len(lands) != 1:
            return None
        verdicts = [(o.key, _related(o, lands[0], query.relation or "", scene))
                    for o in cands if o.key != lands[0].key]
        if any(v is None for _, v in verdicts):
            return None
        return frozenset(k for k, v in verdicts if v)
    raise ValueError(f"unknown query kind {query.kind!r}")


def evaluate(query: Query, scene: Scene) -> frozenset[int] | None:
    """Keys of the objects a phrase selects, or None when its meaning is unclear here."""
    keys = _select(query, scene)
    if keys is None:
        return None
    if not query.plural and len(keys) > 1:
        return None
    if query.count is not None and len(keys) != query.count:
        return None
    return keys


def _np(desc: Desc, plural: bool, pick: _Picker, pre: str | None = None) -> str:
    """'red circle', 'left red one', 'blue shapes' (no article)."""
    if desc.shape is not None:
        noun = desc.shape + ("s" if plural else "")
    else:
        nouns = _ANY_NOUNS if (desc.colour or pre) and not plural else _ANY_NOUNS[:2]
        noun = pick(nouns) + ("s" if plural else "")
    return " ".join(w for w in (pre, desc.colour, noun) if w)


class _Picker:
    """Random choices among wordings, drawn from a numpy Generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def index(self, n: int) -> int:
        """A random int in [0, n)."""
        return int(self._rng.integers(n))

    def weighted(self, weights: list[float]) -> int:
        """A random index, i with odds weights[i]."""
        u = float(self._rng.random()) * sum(weights)
        return next((i for i, c in enumerate(itertools.accumulate(weights)) if u < c),
                    len(weights) - 1)

    def __call__(self, options: tuple[str, ...] | list[str]) -> str:
        return options[self.index(len(options))]


def render(query: Query, rng: np.random.Generator) -> str:
    """Lower-case wording of a query, e.g. 'the second red circle from the left'."""
    return _render(query, _Picker(rng))


def _render(query: Query, pick: _Picker) -> str:
    if query.plural:
        head = "all" if query.count is None else (
            pick(("both", "the two")) if query.count == 2 else "the three")
        text = f"{head} {_np(query.desc, True, pick)}"
    elif query.kind == "extreme" and query.which in SIZES:
        words = [w for w, m in _SIZE_WORDS.items() if m == query.which]
        text = f"the {_np(query.desc, False, pick, pre=pick(words))}"
    elif query.kind == "extreme":
        if pick(("pre", "post")) == "pre":
            text = f"the {_np(query.desc, False, pick, pre=query.which)}"
        else:
            post = next(" ".join(k) for k, v in _POSTFIX.items() if v == query.which)
            text = f"the {_np(query.desc, False, pick)} {post}"
    elif query.kind == "ordinal":
        rank = next(w for w, r in _ORDINALS.items() if r == query.rank)
        text = f"the {rank} {_np(query.desc, False, pick)} from the {query.which}"
    else:
        text = f"the {_np(query.desc, False, pick)}"
    if query.kind == "relation" and query.landmark is not None:
        rel = pick([" ".join(k) for k, v in _REL_WORDS.items() if v == query.relation])
        text += f" {rel} the {_np(query.landmark, False, pick)}"
    return text


def normalize(raw: str) -> str:
    """RefCOCO's `sent`: lower-cased, punctuation dropped, single spaces."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in raw.lower())
    return " ".join(kept.split())


class _Tokens:
    """A cursor over the tokens of one sentence."""

    def __init__(self, sent: str) -> None:
        self.toks = sent.split()
        self.i = 0

    def peek(self, n: int = 0) -> str | None:
        return self.toks[self.i + n] if self.i + n < len(self.toks) else None

    def take(self, *words: str) -> bool:
        """Consume `words` if they come next."""
        if tuple(self.toks[self.i : self.i + len(words)]) == words:
            self.i += len(words)
            return True
        return False

    def take_phrase(self, table: dict[tuple[str, ...], str]) -> str | None:
        for words, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
            if self.take(*words):
                return value
        return None

    def fail(self, what: str) -> ValueError:
        return ValueError(f"cannot parse {' '.join(self.toks)!r}: expected {what} "
                          f"at word {self.i + 1}")


def _parse_desc(t: _Tokens, plural: bool) -> Desc:
    colour = t.peek() if t.peek() in COLOURS else None
    if colour:
        t.i += 1
    word = t.peek() or ""
    stem = word[:-1] if plural and word.endswith("s") else word
    if stem in SHAPES:
        t.i += 1
        return Desc(colour, stem)
    if stem in _ANY_NOUNS:
        t.i += 1
        return Desc(colour, None)
    raise t.fail("a shape noun")


def parse(sent: str) -> Query:
    """Read a normalised sentence of this grammar back into its Query (ValueError if not)."""
    t = _Tokens(sent)
    plural, count = True, None
    if t.take("all"):
        pass
    elif t.take("both"):
        count = 2
    elif t.peek() == "the" and t.peek(1) in _COUNTS:
        count = _COUNTS[t.toks[t.i + 1]]
        t.i += 2
    else:
        plural = False
        t.take("the")
    kind, which, rank = "desc", None, 1
    if not plural and t.peek() in _ORDINALS:
        kind, rank = "ordinal", _ORDINALS[t.toks[t.i]]
        t.i += 1
    elif not plural and (t.peek() in POSITIONS or t.peek() in _SIZE_WORDS):
        word = t.toks[t.i]
        kind, which = "extreme", _SIZE_WORDS.get(word, word)
        t.i += 1
    desc = _parse_desc(t, plural)
    if kind == "ordinal":
        if not t.take("from", "the") or t.peek() not in POSITIONS:
            raise t.fail("'from the left/right/top/bottom'")
        which = t.toks[t.i]
        t.i += 1
    elif kind == "desc" and not plural and (post := t.take_phrase(_POSTFIX)):
        kind, which = "extreme", post
    relation, landmark = None, None
    if kind == "desc" and (relation := t.take_phrase(_REL_WORDS)):
        if not t.take("the"):
            raise t.fail("'the' before the landmark")
        kind, landmark = "relation", _parse_desc(t, False)
    if t.peek() is not None:
        raise t.fail("the end of the phrase")
    return Query(kind, desc, which, rank, relation, landmark, plural, count)


FAMILIES = ("attribute", "size", "position", "ordinal", "relation")  # single-target families
FAMILY_WEIGHTS = {"ordinal": 0.5}  # relative odds of a family being chosen (default 1)

Phrases = list[tuple[tuple[int, ...], list[tuple[str, str]]]]  # (target keys, [(family, raw)])


@dataclass
class PhraseSet:
    """The referring phrases of one image, grouped by how many objects they select."""

    single: Phrases  # one target each, 2-3 sentences from different families
    multi: Phrases  # two or more targets ("all green shapes"), gRefCOCO only
    none: Phrases  # no target ("the purple star" where there is none), gRefCOCO only


def _forms(obj: SceneObject) -> list[Desc]:
    """Noun phrase heads that fit an object, most specific first."""
    return [Desc(obj.colour, obj.shape), Desc(obj.colour, None), Desc(None, obj.shape), Desc()]


def _landmarks(scene: Scene, pick: _Picker) -> dict[int, Desc]:
    """For each object that has one, a random head that picks it out alone."""
    out = {}
    for obj in scene.objects:
        unique = [d for d in _forms(obj)[:3] if len(_candidates(scene, d)) == 1]
        if unique:
            out[obj.key] = unique[pick.index(len(unique))]
    return out


def _single_options(scene: Scene, key: int, lands: dict[int, Desc]) -> dict[str, list[Query]]:
    """Every query of each family that clearly selects just object `key`."""
    obj = next(o for o in scene.objects if o.key == key)
    forms = _forms(obj)
    opts = {
        "attribute": [Query("desc", d) for d in forms[:3]],
        "size": [Query("extreme", d, w) for d in forms for w in SIZES],
        "position": [Query("extreme", d, w) for d in forms for w in POSITIONS],
        "ordinal": [Query("ordinal", d, w, r) for d in forms for w in POSITIONS
                    for r in (2, 3)],
        "relation": [Query("relation", d, relation=r, landmark=ld) for lk, ld in lands.items()
                     if lk != key for r in RELATIONS for d in forms],
    }
    target = frozenset({key})
    kept = {f: [q for q in qs if evaluate(q, scene) == target] for f, qs in opts.items()}
    informative = [q for q in kept["relation"] if sum(  # the head alone would not do
        not matches(o, q.landmark or Desc()) for o in _candidates(scene, q.desc)) >= 2]
    kept["relation"] = informative or kept["relation"]
    return {f: qs for f, qs in kept.items() if qs}


def _heads(scene: Scene) -> list[Desc]:
    """Distinct heads that fit some object of the scene."""
    return list(dict.fromkeys(d for o in scene.objects for d in _forms(o)))


def _multi_options(scene: Scene, eligible: frozenset[int],
                   lands: dict[int, Desc]) -> dict[frozenset[int], list[Query]]:
    """Plural queries selecting >= 2 eligible objects, grouped by the set they select."""
    heads = _heads(scene)
    queries = [Query("desc", d, plural=True) for d in heads]
    queries += [Query("relation", d, relation=r, landmark=ld, plural=True)
                for ld in lands.values() for r in RELATIONS for d in heads]
    groups: dict[frozenset[int], list[Query]] = {}
    for q in queries:
        keys = evaluate(q, scene)
        if keys is not None and len(keys) >= 2 and keys <= eligible:
            counted = [q, Query(q.kind, q.desc, relation=q.relation, landmark=q.landmark,
                                plural=True, count=len(keys))] if len(keys) <= 3 else [q]
            groups.setdefault(keys, []).extend(counted)
    return groups


def _none_options(scene: Scene, lands: dict[int, Desc]) -> dict[str, list[Query]]:
    """Singular queries that clearly select nothing: absent heads, relations that fail."""
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    absent = [Query("desc", Desc(c, s)) for c in COLOURS for s in SHAPES
              if not _candidates(scene, Desc(c, s)) and (c in colours or s in shapes)]
    hard = [q for q in absent if q.desc.colour in colours and q.desc.shape in shapes]
    heads = _heads(scene)
    failed = [Query("relation", d, relation=r, landmark=ld) for ld in lands.values()
              for r in RELATIONS for d in heads if d != ld]
    failed = [q for q in failed if evaluate(q, scene) == frozenset()
              and any(not matches(o, q.landmark or Desc()) for o in _candidates(scene, q.desc))]
    return {k: v for k, v in (("absent", hard or absent), ("relation", failed)) if v}


def _say(query: Query, family: str, pick: _Picker) -> tuple[str, str]:
    """(family, raw sentence): wording plus RefCOCO-like casing and punctuation."""
    text = _render(query, pick)
    if not query.plural and text.startswith("the ") and pick.index(5) == 0:
        text = text[4:]
    if pick.index(2) == 0:
        text = text[0].upper() + text[1:]
    end = pick.index(20)  # a full stop 1 time in 4, "!" 1 in 20
    return family, text + ("." if end < 5 else "!" if end == 5 else "")


def _pick_some(options: dict[str, list[Query]], n: int, pick: _Picker,
               ) -> list[tuple[str, Query]]:
    """Up to n (family, query) pairs from different families, chosen at random."""
    families = list(options)
    chosen: list[tuple[str, Query]] = []
    while families and len(chosen) < n:
        weights = [FAMILY_WEIGHTS.get(f, 1.0) for f in families]
        family = families.pop(pick.weighted(weights))
        chosen.append((family, options[family][pick.index(len(options[family]))]))
    return chosen


def image_phrases(rng: np.random.Generator, scene: Scene, eligible: list[int]) -> PhraseSet:
    """Referring phrases of one scene; `eligible` objects may be targets (test groups).

    A single-target ref gets 2-3 sentences from different families and is left out when
    fewer than two families can pick its object out. Every phrase is clear and selects
    exactly its targets.
    """
    pick = _Picker(rng)
    lands = _landmarks(scene, pick)
    single: Phrases = []
    for key in eligible:
        options = _single_options(scene, key, lands)
        if len(options) >= 2:
            chosen = _pick_some(options, 2 + pick.index(2), pick)
            single.append(((key,), [_say(q, f, pick) for f, q in chosen]))
    multi: Phrases = []
    groups = _multi_options(scene, frozenset(eligible), lands)
    if groups:
        keys = sorted(groups, key=sorted)[pick.index(len(groups))]
        queries = list(dict.fromkeys(groups[keys]))
        chosen = _pick_some({str(i): [q] for i, q in enumerate(queries)}, 1 + pick.index(2), pick)
        multi.append((tuple(sorted(keys)), [_say(q, "multi", pick) for _, q in chosen]))
    none: Phrases = []
    absent = _none_options(scene, lands)
    if absent:
        chosen = _pick_some(absent, 1 + pick.index(2), pick)
        none.append(((), [_say(q, "none", pick) for _, q in chosen]))
    return PhraseSet(single, multi, none)
