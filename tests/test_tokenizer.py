"""tokenizer.py: OpenAI CLIP's cleaning and BPE, offline, with the ids the original model was trained with."""

import random
import time
import warnings

import pytest
import transformers

from clipseg import tokenizer as tokenizer_module
from clipseg.tokenizer import TOKENIZER_DIR, CLIPTokenizer, TextTooLong, check_phrase, clean_text


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_directory()


@pytest.mark.parametrize(
    "phrase, ids",
    [
        ("the man’s hat", [49406, 518, 786, 568, 3801, 49407]),  # curly apostrophe -> 's
        ("rock &amp; roll", [49406, 2172, 261, 3341, 49407]),  # HTML entity -> &
        ("ＡＢ wide letters", [49406, 3937, 3184, 9181, 49407]),  # full-width letters -> ab
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("  A   Photo\tof a CAT \n", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ],
)
def test_token_ids_of_the_original(tokenizer, phrase, ids):
    assert tokenizer.encode(phrase) == ids


def test_cleaning_steps():
    assert clean_text("  Rock &amp;amp; Roll\t\n") == "rock & roll"  # unescaped twice, white space collapsed
    assert clean_text("the man’s hat") == "the man's hat"
    assert clean_text("ＡＢ") == "ab"


def test_plain_phrases_match_the_hf_tokenizer(tokenizer):
    hf = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    words = ["the", "red", "car", "left", "who's", "2 cats", "x-ray", "U.S.A.", "e-mail", "don't", "naïve", "日本"]
    rng = random.Random(0)
    for _ in range(300):
        phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        assert tokenizer.encode(phrase) == hf(phrase)["input_ids"], phrase


def test_digits_are_single_tokens_and_special_tokens_survive(tokenizer):
    two_digits = tokenizer.encode("42")
    assert two_digits[1:-1] == tokenizer.encode("4")[1:-1] + tokenizer.encode("2")[1:-1]
    assert tokenizer.encode("a <|endoftext|>")[-2:] == [49407, 49407]


def test_a_damaged_vocabulary_is_a_clear_error(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(RuntimeError, match="missing or damaged.*restore clip_tokenizer"):
        CLIPTokenizer.from_directory(tmp_path)


def random_word(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def test_text_over_the_limits_is_refused_or_cut_at_once_naming_the_limit(tokenizer):
    rng = random.Random(0)
    started = time.perf_counter()
    for text, limit, cut in [
        (random_word(rng, 64_000), "a prompt has at most 1,000 characters", None),  # took a minute in BPE
        ("a " + random_word(rng, 600), "has a word of 600 characters; a word has at most 500 characters", None),
        ("猫" * 501, "has a word of 501 characters", "猫" * 500),  # characters, not UTF-8 bytes
    ]:
        with pytest.raises(TextTooLong, match=limit):
            check_phrase(text)
        with pytest.warns(UserWarning, match=f"{limit}.*: cut to the limits"):
            ids = tokenizer.encode(text)
        cut = cut or " ".join(word[:500] for word in text[:1000].split())
        assert ids == tokenizer.encode(cut)
    assert time.perf_counter() - started < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_phrase("x" * 500)
        check_phrase("cat " * 250)  # at the limits
        assert len(tokenizer.encode("cat " * 250)) == 252


def test_the_word_cache_stays_bounded_and_right(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_CACHED_WORDS", 50)
    bounded, reference = CLIPTokenizer.from_directory(), CLIPTokenizer.from_directory()
    rng = random.Random(1)
    words = [random_word(rng, rng.randint(3, 12)) for _ in range(300)] + [random_word(rng, 100)]
    first = [bounded.encode(word) for word in words]
    assert bounded._cached_word_ids.cache_info().currsize == 50
    assert [bounded.encode(word) for word in words] == first == [reference.encode(word) for word in words]
