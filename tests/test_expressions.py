"""clipseg/expressions.py: plain prompts stay one phrase, precedence and associativity, weights, the soft logic
against hand-computed maps and set algebra on binary maps, errors that name the column, the canonical forms."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipseg.expressions import (
    MAX_DEPTH,
    MAX_TERMS,
    Combination,
    Expression,
    ExpressionError,
    Phrase,
    distinct_phrases,
    evaluate,
    evaluate_many,
    parse,
)


@pytest.mark.parametrize(
    "prompt",
    [
        "a cat",
        "the red t-shirt on the left",
        "x-ray image, black and white",
        "a 16:9 photo",
        "note: the cat",
        "cat:big",
        "10:30 clock",
        "über-cute kätzchen",
    ],
)
def test_plain_prompts_are_one_phrase_as_typed(prompt):
    expression = parse(f"  {prompt} ")
    assert expression.root == Phrase(prompt)
    assert expression.phrases == (prompt,)
    assert expression.is_plain and str(expression) == prompt


def test_precedence_is_pythons_for_sets_difference_then_intersection_then_union():
    a, b, c, d = (Phrase(x) for x in "abcd")
    assert parse("a | b & c - d").root == Combination("|", (a, Combination("&", (b, Combination("-", (c, d))))))
    assert parse("a - b & c | d").root == Combination("|", (Combination("&", (Combination("-", (a, b)), c)), d))
    assert parse("(a | b) & c").root == Combination("&", (Combination("|", (a, b)), c))


def test_difference_is_left_associative_and_chains_flatten():
    a, b, c = (Phrase(x) for x in "abc")
    assert parse("a - b - c").root == Combination("-", (a, b, c)) == parse("(a - b) - c").root
    assert parse("a - (b - c)").root == Combination("-", (a, Combination("-", (b, c))))
    assert parse("a | (b | c)").root == Combination("|", (a, b, c)) == parse("(a | b) | c").root
    maps = {"a": np.array([1.0]), "b": np.array([1.0]), "c": np.array([1.0])}
    assert evaluate(parse("a - b - c"), maps)[0] == 0.0
    assert evaluate(parse("a - (b - c)"), maps)[0] == 1.0  # b - c is empty, so nothing is taken from a


def test_weights_bind_to_phrases_and_groups():
    assert parse("car:1.5").root == Phrase("car", 1.5)
    assert parse("car :2 - wheel:.5").root == Combination("-", (Phrase("car", 2.0), Phrase("wheel", 0.5)))
    assert parse("(cat | dog):0.25").root == Combination("|", (Phrase("cat"), Phrase("dog")), 0.25)
    assert parse("(cat):3").root == Phrase("cat", 3.0)
    assert parse("(cat | dog):1.0 | bird").root == Combination("|", (Phrase("cat"), Phrase("dog"), Phrase("bird")))


def test_soft_logic_against_hand_computed_maps():
    a = np.array([[0.2, 0.9], [0.6, 0.0]], np.float32)
    b = np.array([[0.5, 0.3], [0.6, 1.0]], np.float32)
    c = np.array([[0.1, 0.8], [0.4, 0.7]], np.float32)
    maps = {"cat": a, "dog": b, "sofa": c}
    cases = {
        "cat | dog": [[0.5, 0.9], [0.6, 1.0]],
        "cat & dog": [[0.2, 0.3], [0.6, 0.0]],
        "cat - dog": [[0.2, 0.7], [0.4, 0.0]],  # min(a, 1 - b)
        "cat:1.5": [[0.3, 1.0], [0.9, 0.0]],  # clipped at 1
        "cat - dog:0.5": [[0.2, 0.85], [0.6, 0.0]],  # min(a, 1 - 0.5 b)
        "(cat | dog):0.5 & sofa": [[0.1, 0.45], [0.3, 0.5]],
        "cat | dog & sofa": [[0.2, 0.9], [0.6, 0.7]],  # a | (b & c)
        "(cat | dog) & sofa": [[0.1, 0.8], [0.4, 0.7]],
    }
    for text, expected in cases.items():
        result = evaluate(parse(text), maps)
        assert result.dtype == np.float32 and result.shape == (2, 2)
        np.testing.assert_allclose(result, expected, atol=1e-6, err_msg=text)


SET_ALGEBRA = {
    "a | b": lambda a, b, c: a | b,
    "a & b": lambda a, b, c: a & b,
    "a - b": lambda a, b, c: a & ~b,
    "a | b & c": lambda a, b, c: a | (b & c),
    "(a | b) - c": lambda a, b, c: (a | b) & ~c,
    "a - b - c": lambda a, b, c: a & ~b & ~c,
    "a - (b - c)": lambda a, b, c: a & ~(b & ~c),
    "a & b | c - a": lambda a, b, c: (a & b) | (c & ~a),
}


@pytest.mark.parametrize("text", list(SET_ALGEBRA))
def test_binary_maps_give_set_algebra(text):
    rng = np.random.default_rng(len(text))
    a, b, c = (rng.random((24, 31)) < 0.5 for _ in range(3))
    result = evaluate(parse(text), {"a": a.astype(np.float32), "b": b.astype(np.float32), "c": c.astype(np.float32)})
    assert set(np.unique(result)) <= {0.0, 1.0}
    np.testing.assert_array_equal(result.astype(bool), SET_ALGEBRA[text](a, b, c))


def test_set_identities_hold_on_soft_maps():
    rng = np.random.default_rng(1)
    maps = {name: rng.random((16, 16)).astype(np.float32) for name in "abc"}
    pairs = [("a - (b | c)", "a - b - c"), ("a - (b & c)", "(a - b) | (a - c)"), ("a & (b | c)", "a & b | a & c")]
    for left, right in pairs:
        np.testing.assert_allclose(evaluate(parse(left), maps), evaluate(parse(right), maps), err_msg=left)


@pytest.mark.parametrize(
    "text, column, expected",
    [
        ("cat |", 6, "a phrase or '('"),
        ("| cat", 1, "a phrase or '('"),
        ("cat & & dog", 7, "a phrase or '('"),
        ("(cat | dog", 11, "to close the '(' at column 1"),
        ("cat)", 4, "an operator"),
        ("cat (dog)", 5, "an operator"),
        ('"rock & roll', 13, "a closing '\"' for the quote at column 1"),
        ('cat | ""', 7, "a phrase inside the quotes"),
        ("(cat:2):3", 8, "one weight per term"),
        ("", 1, "a phrase or '('"),
        ("cat - ", 7, "a phrase or '('"),
        ("car:" + "9" * 400, 5, "a weight of at most 1e+06 (not 999999999999...)"),  # float() gives inf
        ("(cat:0 | dog:0):" + "9" * 39, 17, "a weight of at most 1e+06"),  # inf in float32: 0 x inf made NaN
    ],
)
def test_syntax_errors_name_the_column_and_what_was_expected(text, column, expected):
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    assert caught.value.column == column and expected in caught.value.expected
    assert f"column {column}:" in str(caught.value)
    assert str(caught.value).splitlines()[-1] == "  " + " " * (column - 1) + "^"


def test_limits_on_nesting_and_phrases():
    with pytest.raises(ExpressionError, match=f"at most {MAX_DEPTH} nested") as caught:
        parse("(" * (MAX_DEPTH + 1) + "cat" + ")" * (MAX_DEPTH + 1))
    assert caught.value.column == MAX_DEPTH + 1
    assert parse("(" * MAX_DEPTH + "cat" + ")" * MAX_DEPTH).root == Phrase("cat")
    assert len(parse(" | ".join(f"p{i}" for i in range(MAX_TERMS))).phrases) == MAX_TERMS
    with pytest.raises(ExpressionError, match=f"at most {MAX_TERMS} phrases"):
        parse(" | ".join(f"p{i}" for i in range(MAX_TERMS + 1)))


def test_phrases_are_distinct_in_order_of_appearance():
    assert parse("dog | cat & dog - (bird | cat)").phrases == ("dog", "cat", "bird")


def test_canonical_text_and_dict():
    expression = parse('  (cat|dog) :0.50-"rock & roll"  &  t-shirt ')
    assert str(expression) == '(cat | dog):0.5 - "rock & roll" & t-shirt'
    assert parse(str(expression)) == expression
    assert expression.source == '  (cat|dog) :0.50-"rock & roll"  &  t-shirt '
    document = expression.to_dict()
    assert json.loads(json.dumps(document, allow_nan=False)) == {
        "expression": '(cat | dog):0.5 - "rock & roll" & t-shirt',
        "phrases": ["cat", "dog", "rock & roll", "t-shirt"],
        "tree": {  # "-" binds tighter than "&": ((cat | dog):0.5 - "rock & roll") & t-shirt
            "operator": "intersection",
            "terms": [
                {
                    "operator": "difference",
                    "terms": [
                        {
                            "operator": "union",
                            "terms": [{"phrase": "cat", "weight": 1.0}, {"phrase": "dog", "weight": 1.0}],
                            "weight": 0.5,
                        },
                        {"phrase": "rock & roll", "weight": 1.0},
                    ],
                    "weight": 1.0,
                },
                {"phrase": "t-shirt", "weight": 1.0},
            ],
            "weight": 1.0,
        },
    }


PHRASES = ["cat", "red shirt", "t-shirt", "16:9", "rock & roll", "a (b)", "car:2", "x - y", "note:"]


def trees(depth: int = 3):
    weights = st.sampled_from([1.0, 1.0, 0.5, 1.5, 0.0000001, 2.0])
    leaf = st.builds(Phrase, st.sampled_from(PHRASES), weights)
    return st.recursive(
        leaf,
        lambda children: st.builds(
            Combination, st.sampled_from("|&-"), st.lists(children, min_size=2, max_size=3).map(tuple), weights
        ),
        max_leaves=6,
    )


@settings(max_examples=150, deadline=None)
@given(trees())
def test_canonical_text_reads_back_to_the_same_maps(root):
    expression = Expression(root)
    again = parse(str(expression))
    assert parse(str(again)) == again and str(again) == str(parse(str(again)))
    rng = np.random.default_rng(0)
    maps = {text: rng.random((3, 4)).astype(np.float32) for text in PHRASES}
    np.testing.assert_allclose(evaluate(again, maps), evaluate(expression, maps), atol=1e-6)


def test_evaluate_refuses_missing_phrases_mismatched_shapes_and_non_probabilities():
    expression = parse("cat - dog")
    with pytest.raises(KeyError, match="'dog'"):
        evaluate(expression, {"cat": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate(expression, {"cat": np.zeros((2, 2)), "dog": np.zeros((2, 3))})
    for bad in (np.full((2, 2), 1.5), np.full((2, 2), np.nan), np.full((2, 2), -0.1)):
        with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
            evaluate(expression, {"cat": bad, "dog": np.zeros((2, 2))})


def test_evaluate_returns_a_new_array():
    probs = np.full((2, 2), 0.5, np.float32)
    result = evaluate(parse("cat"), {"cat": probs})
    result[:] = 0
    assert probs[0, 0] == 0.5


def test_nodes_refuse_invalid_values():
    for make in (
        lambda: Phrase(""),
        lambda: Phrase(" cat"),
        lambda: Phrase('a "b"'),
        lambda: Phrase("cat", -1.0),
        lambda: Phrase("cat", float("inf")),
        lambda: Combination("|", (Phrase("cat"),)),
        lambda: Combination("^", (Phrase("a"), Phrase("b"))),
    ):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(TypeError):
        parse(None)


def test_many_expressions_share_one_decode_of_their_distinct_phrases():
    expressions = [parse("cat | dog"), parse("dog - leash"), parse("cat")]
    phrases = distinct_phrases(expressions)
    assert phrases == ["cat", "dog", "leash"]
    probs = np.stack([np.full((2, 3), value, np.float32) for value in (0.2, 0.7, 0.4)])
    maps = evaluate_many(expressions, phrases, probs)
    assert maps.shape == (3, 2, 3) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[:, 0, 0], [0.7, 0.6, 0.2], atol=1e-6)
    with pytest.raises(ValueError, match="3 phrases but 2 probability maps"):
        evaluate_many(expressions, phrases, probs[:2])
