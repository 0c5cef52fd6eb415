"""Class lists of the paper's one-shot and zero-shot benchmarks, and the WordNet rule that removes their classes from
PhraseCut for fold-aware training (docs/original.md §11-14).

| benchmark | classes |
|---|---|
| Pascal-5i | VOC ids 1-20, fold k = ids 5k+1 .. 5k+5 (PFENet, HSNet) |
| COCO-20i | COCO's 80 classes as 0-based indices, fold k = {k, k+4, ..., k+76} (HSNet; PFENet's `use_split_coco`) |
| VOC zero-shot | the 21 JoEm names (background first); unseen-2/4/6/8/10 add the pairs of `ZERO_SHOT_PAIRS` |

`--remove-classes` rules (the original's `remove_classes` of its PhraseCut data set):

- `pas5i:K`: the 5 test classes of Pascal-5i fold K, as WordNet synsets (`PASCAL_5I_SYNSETS`);
- `zs:K`: the first K pairs of `ZERO_SHOT_SYNSETS` (K = 5 gives unseen-10, K = 2 unseen-4);
- `aff`: phrases with one of `AFFORDANCE_WORDS` as a space-separated word.

For the synset rules a phrase goes when any multi-word lemma of the synsets or of their hyponyms (recursively;
person.n.01 stands for a fixed list) is a raw substring of it, or when one of its space-separated words,
lemmatised as a noun as nltk's `WordNetLemmatizer` does, is a single-word lemma. Lemmas are lower-cased with '_'
read as a space; phrases are taken as they are.

WordNet comes through nltk: its own data (`python -m nltk.downloader wordnet`) or, offline, Debian's
`wordnet-base` + `wordnet-sense-index` packages in /usr/share/wordnet (or $WNSEARCHDIR), completed with the
`lexnames` file those packages lack (written from `LEXNAMES`, WordNet's lexnames(5) list).
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # nltk is optional (requirements-benchmarks.txt): imported where WordNet is read
    from nltk.corpus.reader.wordnet import Synset, WordNetCorpusReader

# ------------------------------------------------------------------------------------------------ class lists

# VOC ids 1-20 by the names the original's Pascal-5i text prompts use ("a photo of a <name>.").
PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PASCAL_TEXT_TEMPLATE = "a photo of a {}."
PASCAL_FOLDS = 4
# JoEm's names, index = VOC id, background = 0: the zero-shot prompts (bare names).
VOC_ZERO_SHOT_NAMES = (
    "background", "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# JoEm's unseen splits are cumulative: unseen-2k holds the first k pairs (VOC ids).
ZERO_SHOT_PAIRS = ((10, 14), (1, 18), (8, 20), (19, 5), (9, 16))
ZERO_SHOT_UNSEEN = (2, 4, 6, 8, 10)
# The 80 COCO classes, 0-based contiguous index (HSNet's PNG value = index + 1); the text prompt is the bare name.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
COCO_FOLDS = 4

# The synsets of VOC ids 1-20 the original removes for Pascal-5i (its PASCAL_5I_SYNSETS_ORDERED).
PASCAL_5I_SYNSETS = (
    "aeroplane.n.01", "bicycle.n.01", "bird.n.01", "vessel.n.02", "bottle.n.01", "bus.n.01", "car.n.01",
    "cat.n.01", "chair.n.01", "cattle.n.01", "table.n.02", "dog.n.01", "horse.n.01", "motorcycle.n.01",
    "person.n.01", "pot_plant.n.01", "sheep.n.01", "sofa.n.01", "train.n.01", "television.n.03",
)  # fmt: skip
ZERO_SHOT_SYNSETS = (
    ("cattle.n.01", "motorcycle.n.01"), ("aeroplane.n.01", "sofa.n.01"), ("cat.n.01", "television.n.03"),
    ("train.n.01", "bottle.n.01"), ("chair.n.01", "pot_plant.n.01"),
)  # fmt: skip
PERSON_SYNSET = "person.n.01"
PERSON_LEMMAS = ("person", "human", "man", "woman", "toddler", "baby", "body", "child", "infant")
AFFORDANCE_WORDS = frozenset(
    "drink drinks drinking sit sits sitting ride rides riding fly flies flying drive drives driving driven "
    "swim swims swimming wheels wheel legs leg ear ears".split()
)


def pascal_fold_classes(fold: int) -> tuple[int, ...]:
    """VOC ids (1-based) of Pascal-5i fold `fold`: 5 fold + 1 .. 5 fold + 5."""
    _check_fold(fold, PASCAL_FOLDS, "Pascal-5i")
    return tuple(range(5 * fold + 1, 5 * fold + 6))


def coco_fold_classes(fold: int) -> tuple[int, ...]:
    """COCO class indices (0-based) of COCO-20i fold `fold`: fold, fold + 4, ..., fold + 76."""
    _check_fold(fold, COCO_FOLDS, "COCO-20i")
    return tuple(range(fold, len(COCO_CLASSES), COCO_FOLDS))


def zero_shot_unseen(n_unseen: int) -> tuple[int, ...]:
    """Sorted VOC ids of JoEm's unseen-`n_unseen` split (2, 4, 6, 8 or 10)."""
    if n_unseen not in ZERO_SHOT_UNSEEN:
        raise ValueError(f"the zero-shot splits have 2, 4, 6, 8 or 10 unseen classes, not {n_unseen}")
    return tuple(sorted(c for pair in ZERO_SHOT_PAIRS[: n_unseen // 2] for c in pair))


def _check_fold(fold: int, n_folds: int, name: str) -> None:
    if not 0 <= fold < n_folds:
        raise ValueError(f"{name} has folds 0 to {n_folds - 1}, not {fold}")


# ---------------------------------------------------------------------------------------------------- WordNet

DEBIAN_WORDNET = Path("/usr/share/wordnet")
DEBIAN_FILES = ("index.noun", "data.noun", "noun.exc", "index.sense")
# WordNet 3.0's lexicographer files, by number (lexnames(5)); nltk's reader needs them as a `lexnames` file.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WORDNET_HELP = (
    "WordNet data not found. Get it either way: (1) nltk's downloader: `python -m nltk.downloader wordnet` (needs "
    "internet; stores it in ~/nltk_data); or (2) offline on Debian/Ubuntu: `apt-get install wordnet-base "
    "wordnet-sense-index` (files in /usr/share/wordnet, or set WNSEARCHDIR; clipseg adds the lexnames file these "
    "packages lack)."
)


class WordNetMissing(RuntimeError):
    """nltk or the WordNet data is not installed; the message says how to get both."""


def lexnames_text() -> str:
    """WordNet's `lexnames` file: '<number>\\t<name>\\t<syntactic category>' per line, 45 lines."""
    return "".join(
        f"{number:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for number, name in enumerate(LEXNAMES)
    )


def debian_wordnet_dir() -> Path | None:
    """The directory of Debian's WordNet files ($WNSEARCHDIR or /usr/share/wordnet) when they are all there."""
    directory = Path(os.environ.get("WNSEARCHDIR") or DEBIAN_WORDNET)
    return directory if all((directory / name).is_file() for name in DEBIAN_FILES) else None


@functools.cache
def load_wordnet() -> WordNetCorpusReader:
    """nltk's WordNet reader: nltk's own data if installed, else Debian's files plus our `lexnames`.

    Raises WordNetMissing (naming both ways to get the data) when neither is there."""
    try:
        import nltk
    except ImportError as err:
        raise WordNetMissing(
            "nltk is not installed: `pip install -r requirements-benchmarks.txt` (or `pip install nltk`). "
            + WORDNET_HELP
        ) from err
    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    source = debian_wordnet_dir()
    if source is None:
        raise WordNetMissing(WORDNET_HELP)
    if str(source) not in nltk.data.path:
        nltk.data.path.append(str(source))  # nltk reads corpora only below its data paths
    return _debian_wordnet(source)


def _debian_wordnet(directory: Path):
    """nltk's reader on Debian's files, with the `lexnames` file they lack served from `LEXNAMES`."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class DebianWordNet(WordNetCorpusReader):
        def open(self, file):
            return io.StringIO(lexnames_text()) if file == "lexnames" else super().open(file)

        def map_wn(self, version="wordnet"):  # the map to nltk's own copy serves only multilingual lookups
            return None

    with warnings.catch_warnings():  # "multilingual functions are not available": we need English only
        warnings.simplefilter("ignore")
        return DebianWordNet(str(directory), None)


def hyponym_lemmas(synset: Synset) -> list[str]:
    """Lemma names of `synset` and of all its hyponyms, recursively (the original's `traverse_lemmas_hypo`);
    person.n.01 anywhere in the tree stands for `PERSON_LEMMAS` and is not descended."""
    if synset.name() == PERSON_SYNSET:
        return list(PERSON_LEMMAS)
    names = [lemma.name() for lemma in synset.lemmas()]
    for hyponym in synset.hyponyms():
        names += hyponym_lemmas(hyponym)
    return names


def synsets_to_avoid(spec: str) -> tuple[str, ...]:
    """The synset names a `pas5i:K` or `zs:K` spec removes."""
    kind, value = parse_removal(spec)
    if kind == "pas5i":
        return tuple(PASCAL_5I_SYNSETS[c - 1] for c in pascal_fold_classes(value))
    return tuple(name for pair in ZERO_SHOT_SYNSETS[:value] for name in pair)


def parse_removal(spec: str) -> tuple[str, int]:
    """'pas5i:K' (K = 0..3), 'zs:K' (K = 1..5) or 'aff' -> (kind, K); ValueError with the valid forms."""
    match = re.fullmatch(r"(pas5i|zs):(\d+)|(aff)", spec.strip())
    if match is None:
        raise ValueError(f"--remove-classes {spec!r}: give pas5i:K (K = 0..3), zs:K (K = 1..5) or aff")
    if match.group(3):
        return "aff", 0
    kind, value = match.group(1), int(match.group(2))
    if kind == "pas5i" and not 0 <= value < PASCAL_FOLDS:
        raise ValueError(f"--remove-classes {spec!r}: Pascal-5i folds are 0..3")
    if kind == "zs" and not 1 <= value <= len(ZERO_SHOT_PAIRS):
        raise ValueError(f"--remove-classes {spec!r}: zs:K removes the first K of the 5 zero-shot pairs, K = 1..5")
    return kind, value


def removal_rule(spec: str) -> Callable[[str], bool]:
    """A predicate phrase -> True when the phrase must go, for a `--remove-classes` spec (module docstring)."""
    kind, _ = parse_removal(spec)
    if kind == "aff":
        return lambda phrase: any(word in AFFORDANCE_WORDS for word in phrase.split(" "))
    wordnet = load_wordnet()
    lemmas = {
        name.replace("_", " ").lower()
        for synset in synsets_to_avoid(spec)
        for name in hyponym_lemmas(wordnet.synset(synset))
    }
    single = frozenset(lemma for lemma in lemmas if " " not in lemma)
    multi = sorted(lemma for lemma in lemmas if " " in lemma)
    return PhraseRemoval(single, multi, noun_lemmatiser(wordnet))


def noun_lemmatiser(wordnet: WordNetCorpusReader) -> Callable[[str], str]:
    """nltk's `WordNetLemmatizer().lemmatize(word)` on the given reader: the shortest noun lemma morphy finds, or
    the word itself."""

    @functools.lru_cache(maxsize=1 << 18)
    def lemmatise(word: str) -> str:
        lemmas = wordnet._morphy(word, "n")
        return min(lemmas, key=len) if lemmas else word

    return lemmatise


class PhraseRemoval:
    """phrase -> True when a multi-word lemma is a substring of it or a lemmatised word is a single-word lemma."""

    def __init__(self, single: Iterable[str], multi: Iterable[str], lemmatise: Callable[[str], str]):
        self.single, self.multi, self.lemmatise = frozenset(single), tuple(multi), lemmatise
        # substring search without a scan per lemma: the lemmas by their first characters, looked up at each
        # position of the phrase (exact: a lemma occurs at i only if its first characters do)
        self._anchor = min([4, *map(len, self.multi)])
        self._by_anchor: dict[str, list[str]] = {}
        for lemma in self.multi:
            self._by_anchor.setdefault(lemma[: self._anchor], []).append(lemma)

    def has_multi_word_lemma(self, phrase: str) -> bool:
        for start in range(len(phrase) - self._anchor + 1):
            for lemma in self._by_anchor.get(phrase[start : start + self._anchor], ()):
                if phrase.startswith(lemma, start):
                    return True
        return False

    def __call__(self, phrase: str) -> bool:
        if self.multi and self.has_multi_word_lemma(phrase):
            return True
        return any(self.lemmatise(word) in self.single for word in phrase.split(" "))
