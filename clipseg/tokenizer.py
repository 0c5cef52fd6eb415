"""CLIP's text tokenizer as OpenAI's CLIP applies it: text cleaning, then byte-level BPE.

The cleaning is what the original CLIPSeg was trained with (`clip.tokenize`: openai/CLIP
`clip/simple_tokenizer.py`, `basic_clean` and `whitespace_clean`): `ftfy.fix_text`, HTML entities unescaped twice,
surrounding white space stripped, runs of white space collapsed to one space, lower case. Without it a curly
apostrophe, `&amp;` or full-width letters get other token ids than the model saw.
The vocabulary (49,408 tokens) ships in `clip_tokenizer/` (vocab.json + merges.txt, MIT, OpenAI), so this works
offline.

Limits, as CLIP reads at most 77 tokens anyway: a phrase has at most MAX_PHRASE_CHARS characters and a word (a run
of letters, or of symbols) at most MAX_WORD_CHARS, so that byte-pair merging, whose time grows with the square of a
word's length (one 64,000-letter word took a minute), stays fast. `check_phrase` refuses text over them with a
`TextTooLong` error naming the limit (the app's prompts); `encode` cuts it to them with a warning (data sets, the
command line), which can change only tokens far beyond the 77 CLIP reads. The BPE results of words up to
CACHED_WORD_CHARS characters are cached, at most MAX_CACHED_WORDS of them.

    tokenizer = CLIPTokenizer.from_directory()
    tokenizer.encode("the man’s hat")   # [49406, 518, 786, 568, 3801, 49407]
"""

from __future__ import annotations

import functools
import html
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex

TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # CLIP's text positions, start and end tokens included
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_PHRASE_CHARS = 1000  # 77 tokens hold about 300 characters of English
MAX_WORD_CHARS = 500  # far beyond any dictionary word; 500 random letters take 0.03 s to merge
MAX_CACHED_WORDS = 10_000  # the word cache holds at most this many words (least recently used dropped first) ...
CACHED_WORD_CHARS = 40  # ... of at most this many characters: under 20 MB

# CLIP's pre-tokenisation: the special tokens, English contractions, runs of letters, single digits, and runs of
# anything else that is not white space.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITE_SPACE = regex.compile(r"\s+")


class TextTooLong(ValueError):
    """A phrase or a word over the tokenizer's limits; the message names the limit."""


def check_phrase(text: str) -> None:
    """Raise `TextTooLong` when `text` has more than MAX_PHRASE_CHARS characters or, once cleaned, a word of more
    than MAX_WORD_CHARS characters (found without byte-pair merging)."""
    problem = _over_limits(text)
    if problem is not None:
        raise TextTooLong(problem)


def _over_limits(text: str, words: Sequence[str] | None = None) -> str | None:
    """What makes `text` (whose cleaned words are `words`, when known) exceed a limit, naming it; None if nothing."""
    quoted = repr(text[:30]) + ("..." if len(text) > 30 else "")
    if len(text) > MAX_PHRASE_CHARS:
        return (
            f"the prompt {quoted} is {len(text):,} characters long; a prompt has at most {MAX_PHRASE_CHARS:,} "
            f"characters (CLIP reads at most {CONTEXT_LENGTH} tokens)"
        )
    longest = max(WORD_PATTERN.findall(clean_text(text)) if words is None else words, key=len, default="")
    if len(longest) > MAX_WORD_CHARS:
        return (
            f"the prompt {quoted} has a word of {len(longest):,} characters; a word has at most {MAX_WORD_CHARS} "
            f"characters (CLIP reads at most {CONTEXT_LENGTH} tokens)"
        )
    return None


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy, HTML unescaped twice, white space collapsed and stripped, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITE_SPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Each of the 256 byte values -> a printable unicode character (byte-level BPE's reversible alphabet):
    printable Latin-1 bytes map to themselves, the others to code points from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


class CLIPTokenizer:
    """Phrases -> CLIP token ids (start token, BPE tokens of the cleaned text, end token)."""

    def __init__(self, vocabulary: dict[str, int], merges: Sequence[tuple[str, str]]):
        if len(vocabulary) != VOCAB_SIZE:
            raise ValueError(f"a CLIP vocabulary has {VOCAB_SIZE} tokens, got {len(vocabulary)}")
        self.vocabulary = vocabulary
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id, self.end_id = vocabulary[START_TOKEN], vocabulary[END_TOKEN]
        self._cached_word_ids = functools.lru_cache(maxsize=MAX_CACHED_WORDS)(self._bpe_ids)

    @classmethod
    def from_directory(cls, directory: str | Path = TOKENIZER_DIR) -> CLIPTokenizer:
        """Read `vocab.json` and `merges.txt` (the first line of merges.txt is a version header)."""
        directory = Path(directory)
        try:
            vocabulary = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
            tokenizer = cls(vocabulary, [tuple(line.split()) for line in lines if line.strip()])
        except (OSError, ValueError, KeyError) as err:
            raise RuntimeError(
                f"the CLIP vocabulary in {directory} is missing or damaged ({err}); restore clip_tokenizer/ from the "
                "repository"
            ) from err
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """One phrase -> [start, tokens..., end], not padded and not truncated to 77 tokens. Text over the limits
        (`check_phrase`) is cut to MAX_PHRASE_CHARS characters and its words to MAX_WORD_CHARS first, with a
        warning."""
        words = WORD_PATTERN.findall(clean_text(text[:MAX_PHRASE_CHARS]))
        problem = _over_limits(text, words)
        if problem is not None:
            warnings.warn(f"{problem}: cut to the limits", stacklevel=2)
        ids = [self.start_id]
        for word in (word[:MAX_WORD_CHARS] for word in words):
            ids += self._cached_word_ids(word) if len(word) <= CACHED_WORD_CHARS else self._bpe_ids(word)
        return ids + [self.end_id]

    def _bpe_ids(self, word: str) -> list[int]:
        if word in (START_TOKEN, END_TOKEN):
            return [self.vocabulary[word]]
        symbols = "".join(byte_alphabet()[byte] for byte in word.encode("utf-8"))
        return [self.vocabulary[piece] for piece in self._merge(symbols)]

    def _merge(self, symbols: str) -> list[str]:
        """Byte-pair merging of one word: the last symbol carries the end-of-word mark; the pair of lowest merge
        rank is joined everywhere it occurs, until no known pair is left."""
        parts = [*symbols[:-1], symbols[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts
