"""Labels to ImageNet-1k classes through WordNet 3.0 nouns: the default base's text side.

ImageNet's classes are WordNet noun synsets, so an English label reaches the classifier's label
space through WordNet: find the label's lemma, take its senses in WordNet's frequency order, and
keep the first sense that has ImageNet classes under it (its hyponym closure, itself included).
The rules, in order (deterministic, no randomness, no network):

1. Lemma lookup: lower case, ``_``/``-``/spaces tried as WordNet writes them (``ankle_boot``,
   ``t-shirt``), then plural forms through WordNet's exception list and its suffix rules.
2. A multi-word label that is no lemma falls back to its head noun (the last word).
3. Senses in frequency order: the first whose hyponym closure holds ImageNet classes wins.
4. When no sense has any, the nearest ancestors: for each sense in order, its hypernyms one level
   up, then two, up to ``MAX_ANCESTOR_LEVELS``; the first level whose ImageNet descendants number
   between 1 and ``MAX_ANCESTOR_CLASSES`` wins (a broader ancestor says nothing about the label).
5. Otherwise the label maps nowhere: :class:`UnmappedLabel` names it.

The table is derived from Debian's ``wordnet-base`` by ``scripts/build_wordnet_nouns.py`` and
shipped in the package (``data/wordnet_nouns.json.gz``, with WordNet's licence in
``data/WORDNET_LICENSE``), so the default base needs no WordNet installation at run time.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UnmappedLabel

TABLE = Path(__file__).with_name("data") / "wordnet_nouns.json.gz"
MAX_ANCESTOR_LEVELS = 2
MAX_ANCESTOR_CLASSES = 30
# WordNet's noun detachment rules (morphy): plural suffix -> singular suffix.
_SUFFIXES = (
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("s", ""),
)


@dataclass(frozen=True)
class LabelMapping:
    """Why a label means what it means to the default base's teacher.

    Attributes:
        label: the label as given.
        lemma: the WordNet lemma it was found under.
        rule: ``lemma``, ``head noun``, or either followed by ``+ ancestor`` (rules 1–4).
        sense: the WordNet sense used, as ``word`` plus its rank among the lemma's senses.
        via: the synset whose ImageNet descendants were taken (the sense or an ancestor).
        classes: ImageNet-1k class indices, in classifier order.
        class_names: their ImageNet names.
    """

    label: str
    lemma: str
    rule: str
    sense: str
    via: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "lemma": self.lemma,
            "rule": self.rule,
            "sense": self.sense,
            "via": self.via,
            "classes": list(self.classes),
            "class_names": list(self.class_names),
        }


class WordNetNouns:
    """The shipped noun table: lemmas, hypernyms and the ImageNet-1k classes."""

    def __init__(self, table: dict[str, object]) -> None:
        self.words: list[str] = table["words"]  # type: ignore[assignment]
        self.hypernyms: list[list[int]] = table["hypernyms"]  # type: ignore[assignment]
        self.lemmas: dict[str, list[int]] = table["lemmas"]  # type: ignore[assignment]
        self.exceptions: dict[str, list[str]] = table["exceptions"]  # type: ignore[assignment]
        self.imagenet: list[int] = table["imagenet"]  # type: ignore[assignment]
        self.wnids: list[str] = table["imagenet_wnids"]  # type: ignore[assignment]
        # Every synset with ImageNet classes under it -> those classes (via each class's ancestors).
        under: dict[int, list[int]] = {}
        for cls, synset in enumerate(self.imagenet):
            for ancestor in self._ancestors(synset):
                under.setdefault(ancestor, []).append(cls)
        self.under = under

    def _ancestors(self, synset: int) -> set[int]:
        seen, todo = {synset}, [synset]
        while todo:
            for parent in self.hypernyms[todo.pop()]:
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def class_name(self, cls: int) -> str:
        return self.words[self.imagenet[cls]]

    def find_lemma(self, text: str) -> str | None:
        """The WordNet lemma for ``text`` (already lower case, single-spaced), or None."""
        forms = dict.fromkeys(
            [
                text.replace(" ", "_"),
                text.replace(" ", "-"),
                text.replace("-", "_").replace(" ", "_"),
            ]
        )
        for form in forms:
            if form in self.lemmas:
                return form
        for form in forms:
            for base in self.exceptions.get(form, ()):
                if base in self.lemmas:
                    return base
            for plural, singular in _SUFFIXES:
                if form.endswith(plural) and len(form) > len(plural):
                    base = form[: len(form) - len(plural)] + singular
                    if base in self.lemmas:
                        return base
        return None

    def map(self, label: str) -> LabelMapping:
        """Map one label (rules in the module docstring). Raises :class:`UnmappedLabel`."""
        text = " ".join(label.replace("_", " ").split()).lower()
        lemma, rule = self.find_lemma(text), "lemma"
        if lemma is None and " " in text:
            lemma, rule = self.find_lemma(text.rsplit(" ", 1)[1]), "head noun"
        if lemma is None:
            raise UnmappedLabel(f"label {label!r} is not an English noun that WordNet 3.0 knows")
        senses = self.lemmas[lemma]
        for rank, sense in enumerate(senses, 1):
            if sense in self.under:
                return self._mapping(label, lemma, rule, sense, rank, sense)
        for level in range(1, MAX_ANCESTOR_LEVELS + 1):
            for rank, sense in enumerate(senses, 1):
                for ancestor in self._level(sense, level):
                    classes = self.under.get(ancestor, ())
                    if 0 < len(classes) <= MAX_ANCESTOR_CLASSES:
                        return self._mapping(
                            label, lemma, f"{rule} + ancestor", sense, rank, ancestor
                        )
        raise UnmappedLabel(
            f"label {label!r} (WordNet lemma {lemma!r}) has no ImageNet-1k class under any of its "
            f"{len(senses)} senses nor within {MAX_ANCESTOR_LEVELS} levels above them"
        )

    def _level(self, synset: int, level: int) -> list[int]:
        frontier = [synset]
        for _ in range(level):
            frontier = sorted({p for s in frontier for p in self.hypernyms[s]})
        return frontier

    def _mapping(
        self, label: str, lemma: str, rule: str, sense: int, rank: int, via: int
    ) -> LabelMapping:
        classes = tuple(sorted(self.under[via]))
        return LabelMapping(
            label=label,
            lemma=lemma,
            rule=rule,
            sense=f"{self.words[sense]} (sense {rank})",
            via=self.words[via],
            classes=classes,
            class_names=tuple(self.class_name(c) for c in classes),
        )


@functools.lru_cache(maxsize=1)
def nouns() -> WordNetNouns:
    """The shipped table, read once per process (about 0.5 s)."""
    return WordNetNouns(json.loads(gzip.decompress(TABLE.read_bytes())))


def map_labels(labels: Iterable[str]) -> list[LabelMapping]:
    """Map every label; :class:`UnmappedLabel` names all labels that map nowhere at once."""
    table, out, failed = nouns(), [], []
    for label in labels:
        try:
            out.append(table.map(label))
        except UnmappedLabel as exc:
            failed.append(str(exc))
    if failed:
        raise UnmappedLabel("; ".join(failed))
    return out


def class_sets(labels: Sequence[str]) -> list[tuple[int, ...]]:
    """The ImageNet classes of each label, in label order."""
    return [m.classes for m in map_labels(labels)]
