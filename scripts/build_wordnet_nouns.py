"""Derive the compact WordNet 3.0 noun table that the default base's text side ships with.

Reads Debian's ``wordnet-base`` (``/usr/share/wordnet``: ``index.noun``, ``data.noun``,
``noun.exc``) and timm's ImageNet-1k synset list (classifier order), and writes
``adapters_store/data/wordnet_nouns.json.gz``: every noun lemma with its senses in WordNet's
frequency order, every noun synset's hypernyms (class and instance), one display word per synset,
the plural exceptions, and the 1000 ImageNet classes as synset indices. Deterministic: the same
inputs give the same bytes, so the committed file can be checked by running this again.

    python scripts/build_wordnet_nouns.py [--wordnet /usr/share/wordnet] [-o FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "adapters_store" / "data" / "wordnet_nouns.json.gz"


def imagenet_wnids() -> list[str]:
    import timm.data

    path = Path(timm.data.__file__).with_name("_info") / "imagenet_synsets.txt"
    wnids = path.read_text().split()
    if len(wnids) != 1000:
        raise SystemExit(f"{path}: expected 1000 ImageNet-1k synsets, got {len(wnids)}")
    return wnids


def read_synsets(wordnet: Path) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """Offsets in file order, their hypernym offsets, and the first word of each synset."""
    offsets: list[str] = []
    hypernyms: dict[str, list[str]] = {}
    words: dict[str, str] = {}
    for line in (wordnet / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        words[offset] = fields[4].replace("_", " ")
        pos = 4 + 2 * w_cnt
        p_cnt = int(fields[pos])
        ptrs = [fields[pos + 1 + 4 * i : pos + 5 + 4 * i] for i in range(p_cnt)]
        offsets.append(offset)
        hypernyms[offset] = [p[1] for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
    return offsets, hypernyms, words


def read_index(wordnet: Path) -> dict[str, list[str]]:
    """Each noun lemma's synset offsets, in WordNet's sense (frequency) order."""
    lemmas: dict[str, list[str]] = {}
    for line in (wordnet / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
        lemmas[lemma] = fields[4 + p_cnt + 2 :][:synset_cnt]
    return lemmas


def build(wordnet: Path) -> dict[str, object]:
    offsets, hypernyms, words = read_synsets(wordnet)
    index = {off: i for i, off in enumerate(offsets)}
    lemmas = read_index(wordnet)
    exceptions: dict[str, list[str]] = {}
    for line in (wordnet / "noun.exc").read_text(encoding="latin-1").splitlines():
        inflected, *bases = line.split()
        exceptions[inflected] = bases
    wnids = imagenet_wnids()
    missing = [w for w in wnids if w[1:] not in index]
    if missing:
        raise SystemExit(f"ImageNet synsets not among WordNet's nouns: {missing[:5]}")
    return {
        "source": "WordNet 3.0 nouns (Princeton University; see WORDNET_LICENSE)",
        "words": [words[o] for o in offsets],
        "hypernyms": [[index[h] for h in hypernyms[o]] for o in offsets],
        "lemmas": {k: [index[o] for o in v] for k, v in sorted(lemmas.items())},
        "exceptions": dict(sorted(exceptions.items())),
        "imagenet": [index[w[1:]] for w in wnids],
        "imagenet_wnids": wnids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    table = build(args.wordnet)
    data = json.dumps(table, separators=(",", ":"), ensure_ascii=False).encode()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(
        f"{args.out}: {len(table['words'])} synsets, {len(table['lemmas'])} lemmas, "  # type: ignore[arg-type]
        f"{args.out.stat().st_size:,} bytes"
    )


if __name__ == "__main__":
    main()
