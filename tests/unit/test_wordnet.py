"""Labels to ImageNet-1k classes through WordNet 3.0: the default base's text side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapters_store.errors import UnmappedLabel
from adapters_store.wordnet import TABLE, map_labels, nouns

ROOT = Path(__file__).resolve().parents[2]


def classes(label: str) -> tuple[str, ...]:
    return nouns().map(label).class_names


def test_imagenet_classes_are_in_the_classifier_order() -> None:
    table = nouns()
    assert len(table.wnids) == 1000
    # The indices the classifier answers for scikit-image's chelsea and coffee (tests/unit/test_bases.py).
    assert (table.wnids[285], table.class_name(285)) == ("n02124075", "Egyptian cat")
    assert (table.wnids[967], table.class_name(967)) == ("n07920052", "espresso")


def test_lemma_lookup_normalises_case_separators_and_plurals() -> None:
    assert classes("Trousers") == classes("trouser") == ("jean",)
    assert classes("T-Shirt") == classes("t shirt") == classes("t_shirt") == ("jersey",)
    assert nouns().map("Egyptian_Cat").rule == "lemma"
    assert nouns().map("mice").lemma == "mouse"  # WordNet's exception list
    assert nouns().map("teddy bears").lemma == "teddy_bear"  # suffix rule on a multi-word lemma


def test_first_sense_with_imagenet_classes_under_it() -> None:
    bag = nouns().map("bag")
    assert bag.sense == "bag (sense 1)" and bag.rule == "lemma"
    assert bag.class_names == ("backpack", "mailbag", "plastic bag", "purse", "sleeping bag")
    # "mouse" sense 1 is the rodent, which has no ImageNet class; sense 4 (the device) has one.
    assert nouns().map("mouse").sense == "mouse (sense 4)"
    cat = nouns().map("cat")
    assert "Egyptian cat" in cat.class_names and "tabby" in cat.class_names


def test_nearest_ancestor_when_no_sense_has_classes() -> None:
    sneaker = nouns().map("sneaker")
    assert sneaker.rule == "lemma + ancestor" and sneaker.via == "shoe"
    assert "running shoe" in sneaker.class_names


def test_head_noun_of_a_multi_word_label_that_is_no_lemma() -> None:
    boot = nouns().map("ankle boot")
    assert (boot.rule, boot.lemma, boot.class_names) == ("head noun", "boot", ("cowboy boot",))


def test_labels_that_map_nowhere_are_named() -> None:
    with pytest.raises(UnmappedLabel) as err:
        map_labels(["cat", "xyzzy", "unicorn"])
    assert "'xyzzy'" in str(err.value) and "'unicorn'" in str(err.value)
    assert "'cat'" not in str(err.value)
    assert err.value.code == "unmapped_label"


def test_mapping_is_deterministic_across_processes() -> None:
    code = "from adapters_store.wordnet import map_labels as m; print([x.as_dict() for x in m(['bag', 'sneaker', 'dog'])])"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] == f"{[x.as_dict() for x in map_labels(['bag', 'sneaker', 'dog'])]}\n"


def test_shipped_table_is_what_the_committed_script_derives(tmp_path: Path) -> None:
    """The package's table is exactly scripts/build_wordnet_nouns.py's output from Debian's
    wordnet-base (installed by `make test`)."""
    out = tmp_path / "nouns.json.gz"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_wordnet_nouns.py"), "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert out.read_bytes() == TABLE.read_bytes()
    assert (TABLE.parent / "WORDNET_LICENSE").read_text().count("WordNet 3.0 Copyright 2006") == 1
