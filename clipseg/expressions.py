"""Prompt expressions: several phrases combined into one mask, e.g. `cat | dog`, `person & red shirt`,
`car - wheel:0.5`, `(cat | dog) - leash`. This module owns the syntax (`parse`), the canonical text and JSON form of
an expression (`str(expression)`, `Expression.to_dict`) and the soft logic that combines probability maps
(`evaluate`). The caller decodes the phrases of all its expressions (`distinct_phrases`) against ONE encoding of the
image, then evaluates them (`evaluate_many`).

Syntax, from the loosest to the tightest binding (Python's precedence for its set operators, all left-associative):

| syntax            | meaning                                        | soft logic on probabilities in [0, 1]       |
|-------------------|------------------------------------------------|---------------------------------------------|
| `a | b`           | union                                          | max(a, b)                                   |
| `a & b`           | intersection                                   | min(a, b)                                   |
| `a - b`           | difference (a and not b)                       | min(a, 1 - b)                               |
| `term:w`          | weight w >= 0 on a phrase or a `( ... )` group | clip(w * term, 0, 1)                        |
| `( ... )`, `"..."`| grouping; a quoted phrase taken literally      |                                             |

So `a | b & c - d` is `a | (b & (c - d))`, and `a - b - c` is `(a - b) - c`. The logic is Zadeh's fuzzy logic
(max, min, 1 - x): on maps of 0s and 1s it is exactly set union, intersection and difference, and set identities
(associativity, De Morgan, `a - (b | c) == (a - b) - c`) hold on any map. A weight below 1 dims a term (a subtracted
`wheel:0.5` removes less), above 1 strengthens it; the threshold comes after `evaluate`.

Phrases are the text between operators, stripped of surrounding spaces and otherwise used as typed. So that plain
prompts stay plain, `-` is part of a phrase when it joins two letters or digits (`t-shirt`, `x-ray`), and `:` starts
a weight only when a number follows it that ends the term and no digit precedes it (`car:1.5`, `(cat | dog):0.5`;
but `16:9 photo`, `note: cat` are phrases). Commas are ordinary phrase characters. Any other text can be quoted:
`"rock & roll"`. A syntax error is an `ExpressionError` naming the column (1-based) and what was expected there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

UNION, INTERSECTION, DIFFERENCE = "|", "&", "-"
OPERATOR_NAMES = {UNION: "union", INTERSECTION: "intersection", DIFFERENCE: "difference"}
PRECEDENCE = {UNION: 1, INTERSECTION: 2, DIFFERENCE: 3}  # higher binds tighter
MAX_DEPTH = 16  # nested parentheses
MAX_TERMS = 32  # phrase occurrences in one expression
MAX_WEIGHT = 1e6  # a weight scales probabilities clipped to [0, 1]: beyond this it only overflows float32 maps

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_SPACES = re.compile(r"\s*")
_RESERVED_CHARS = '()|&"'


class ExpressionError(ValueError):
    """A prompt expression that cannot be parsed: `column` (1-based) is where, `expected` what would have fitted."""

    def __init__(self, text: str, column: int, expected: str):
        self.text, self.column, self.expected = text, column, expected
        found = f"found {text[column - 1]!r}" if column <= len(text) else "found the end of the expression"
        super().__init__(
            f"prompt expression, column {column}: expected {expected}, {found}\n  {text}\n  {'^':>{column}}"
        )


@dataclass(frozen=True)
class Phrase:
    """One phrase to decode; its map is scaled by `weight` (clipped to [0, 1])."""

    text: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.text or self.text != self.text.strip() or '"' in self.text:
            raise ValueError(f"a phrase must be non-empty, stripped and free of '\"', got {self.text!r}")
        _check_weight(self.weight)


@dataclass(frozen=True)
class Combination:
    """`operator` (UNION, INTERSECTION or DIFFERENCE) applied to two or more `terms` in order; the result is scaled
    by `weight`. A difference keeps its first term minus each of the others."""

    operator: str
    terms: tuple[Phrase | Combination, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.operator not in PRECEDENCE or len(self.terms) < 2:
            raise ValueError(f"a combination needs an operator of {list(PRECEDENCE)} and two or more terms")
        _check_weight(self.weight)


Node = Phrase | Combination


@dataclass(frozen=True)
class Expression:
    """A parsed prompt expression. `phrases`: the distinct phrase texts in order of first appearance (decode each
    once); `str(expression)`: the canonical text (parses back to an equal expression); `source`: the text typed."""

    root: Node
    source: str = field(default="", compare=False)

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_phrase_texts(self.root)))

    @property
    def is_plain(self) -> bool:
        """True for one phrase without a weight: the prompt as it was before expressions existed."""
        return isinstance(self.root, Phrase) and self.root.weight == 1.0

    def __str__(self) -> str:
        return _format(self.root)

    def to_dict(self) -> dict:
        """{"expression": canonical text, "phrases": [...], "tree": nested {"phrase", "weight"} /
        {"operator": "union" | "intersection" | "difference", "terms", "weight"}} (strict JSON)."""
        return {"expression": str(self), "phrases": list(self.phrases), "tree": _node_dict(self.root)}


def parse(text: str) -> Expression:
    """A prompt expression (module docstring) -> `Expression`; a syntax error is an `ExpressionError`."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt expression is a string, got {type(text).__name__}")
    parser = _Parser(text)
    root = parser.union(depth=0)
    if parser.peek().kind != "end":
        raise parser.error("an operator ('|', '&' or '-'), a weight (':1.5') or the end")
    return Expression(root, text)


def evaluate(expression: Expression, probs_by_phrase: Mapping[str, np.ndarray]) -> np.ndarray:
    """The soft logic of the module table applied to maps (H, W) (any one shape) of probabilities in [0, 1], one
    per phrase of `expression.phrases` -> (H, W) float32 in [0, 1]. Raises KeyError naming a missing phrase and
    ValueError for maps of different shapes or values outside [0, 1] (including NaN)."""
    maps = {}
    for text in expression.phrases:
        if text not in probs_by_phrase:
            raise KeyError(f"no probability map for the phrase {text!r} of {str(expression)!r}")
        maps[text] = np.asarray(probs_by_phrase[text], dtype=np.float32)
        if not np.all((maps[text] >= 0) & (maps[text] <= 1)):
            raise ValueError(f"the map of {text!r} holds values outside [0, 1] (or NaN): give probabilities")
    shapes = {value.shape for value in maps.values()}
    if len(shapes) > 1:
        raise ValueError(f"the phrases' maps differ in shape: {sorted(shapes)}")
    return np.array(_evaluate(expression.root, maps), dtype=np.float32)  # a copy: never a caller's array


def distinct_phrases(expressions: Sequence[Expression]) -> list[str]:
    """The phrases of all `expressions`, each once, in order of first appearance: decode these against one image
    encoding, then `evaluate_many`."""
    return list(dict.fromkeys(text for expression in expressions for text in expression.phrases))


def evaluate_many(expressions: Sequence[Expression], phrases: Sequence[str], probs: np.ndarray) -> np.ndarray:
    """(K, H, W) probabilities of `phrases` (e.g. `distinct_phrases(expressions)`, in that order) -> (E, H, W)
    float32, one map per expression (`evaluate`)."""
    if len(phrases) != len(probs):
        raise ValueError(f"{len(phrases)} phrases but {len(probs)} probability maps")
    by_phrase = dict(zip(phrases, probs))
    return np.stack([evaluate(expression, by_phrase) for expression in expressions])


def _evaluate(node: Node, maps: Mapping[str, np.ndarray]) -> np.ndarray:
    if isinstance(node, Phrase):
        value = maps[node.text]
    else:
        values = [_evaluate(term, maps) for term in node.terms]
        if node.operator == UNION:
            value = np.maximum.reduce(values)
        elif node.operator == INTERSECTION:
            value = np.minimum.reduce(values)
        else:
            value = np.minimum.reduce([values[0]] + [1.0 - v for v in values[1:]])
    if node.weight != 1.0:
        value = np.clip(value * np.float32(node.weight), 0.0, 1.0)
    return value.astype(np.float32, copy=False)


# -------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Token:
    kind: str  # "phrase", "(", ")", "|", "&", "-", "weight", "end"
    value: str | float
    column: int  # 1-based


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    start, i = None, 0  # start: where the unquoted phrase being read began

    def end_phrase(at: int) -> None:
        nonlocal start
        if start is not None and text[start:at].strip():
            lead = len(text[start:at]) - len(text[start:at].lstrip())
            tokens.append(_Token("phrase", text[start:at].strip(), start + lead + 1))
        start = None

    while i < len(text):
        char = text[i]
        weight = _weight_at(text, i) if char == ":" else None
        if char in "()|&" or (char == "-" and _is_minus(text, i)):
            end_phrase(i)
            tokens.append(_Token(char, char, i + 1))
        elif weight is not None:
            end_phrase(i)
            if not float(weight) <= MAX_WEIGHT:
                raise ExpressionError(text, i + 2, f"a weight of at most {MAX_WEIGHT:g} (not {weight[:12]}...)")
            tokens.append(_Token("weight", float(weight), i + 1))
            i += len(weight)
        elif char == '"':
            end_phrase(i)
            close = text.find('"', i + 1)
            if close < 0:
                raise ExpressionError(text, len(text) + 1, f"a closing '\"' for the quote at column {i + 1}")
            if not text[i + 1 : close].strip():
                raise ExpressionError(text, i + 1, "a phrase inside the quotes")
            tokens.append(_Token("phrase", text[i + 1 : close].strip(), i + 1))
            i = close
        elif start is None and not char.isspace():
            start = i
        i += 1
    end_phrase(len(text))
    return tokens + [_Token("end", "", len(text) + 1)]


def _is_minus(text: str, i: int) -> bool:
    """True when the '-' at `i` is the difference operator, False when it joins two letters or digits."""
    return not (0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum())


def _weight_at(text: str, colon: int) -> str | None:
    """The number after the ':' at `colon` if it is a weight (module docstring), else None: no digit before the
    ':', and after the number only the end, an operator or ')' (spaces between)."""
    number = _NUMBER.match(text, colon + 1)
    if number is None or (colon > 0 and text[colon - 1].isdigit()):
        return None
    after = _SPACES.match(text, number.end()).end()
    if after == len(text) or text[after] in "|&)" or (text[after] == "-" and _is_minus(text, after)):
        return number.group()
    return None


class _Parser:
    """Recursive descent over `_tokens`: union > intersection > difference > weighted atom."""

    def __init__(self, text: str):
        self.text, self.tokens, self.position, self.phrases = text, _tokens(text), 0, 0

    def peek(self) -> _Token:
        return self.tokens[self.position]

    def take(self) -> _Token:
        self.position += 1
        return self.tokens[self.position - 1]

    def error(self, expected: str, token: _Token | None = None) -> ExpressionError:
        return ExpressionError(self.text, (token or self.peek()).column, expected)

    def union(self, depth: int) -> Node:
        return self.chain(UNION, self.intersection, depth)

    def intersection(self, depth: int) -> Node:
        return self.chain(INTERSECTION, self.difference, depth)

    def difference(self, depth: int) -> Node:
        return self.chain(DIFFERENCE, self.weighted, depth)

    def chain(self, operator: str, operand: Callable[[int], Node], depth: int) -> Node:
        terms = [operand(depth)]
        while self.peek().kind == operator:
            self.take()
            terms.append(operand(depth))
        return _combine(operator, terms)

    def weighted(self, depth: int) -> Node:
        node = self.atom(depth)
        if self.peek().kind == "weight":
            if node.weight != 1.0:
                raise self.error("one weight per term: an operator, ')' or the end")
            node = replace(node, weight=float(self.take().value))
        return node

    def atom(self, depth: int) -> Node:
        token = self.peek()
        if token.kind == "phrase":
            self.take()
            self.phrases += 1
            if self.phrases > MAX_TERMS:
                raise self.error(f"at most {MAX_TERMS} phrases in one expression", token)
            return Phrase(str(token.value))
        if token.kind == "(":
            if depth >= MAX_DEPTH:
                raise self.error(f"at most {MAX_DEPTH} nested parentheses", token)
            self.take()
            node = self.union(depth + 1)
            if self.peek().kind != ")":
                raise self.error(f"an operator or ')' to close the '(' at column {token.column}")
            self.take()
            return node
        raise self.error("a phrase or '('")


def _combine(operator: str, terms: list[Node]) -> Node:
    """`terms` joined by `operator`, flattening unweighted groups that mean the same: any term of a union in a union
    (or intersection in an intersection), and the first term of a difference in a difference."""
    if len(terms) == 1:
        return terms[0]
    flat: list[Node] = []
    for index, term in enumerate(terms):
        same = isinstance(term, Combination) and term.operator == operator and term.weight == 1.0
        if same and (operator != DIFFERENCE or index == 0):
            flat.extend(term.terms)
        else:
            flat.append(term)
    return Combination(operator, tuple(flat))


def _check_weight(weight: float) -> None:
    if not (isinstance(weight, int | float) and 0 <= weight <= MAX_WEIGHT):
        raise ValueError(f"a weight is a number from 0 to {MAX_WEIGHT:g}, got {weight!r}")


# ------------------------------------------------------------------------------------ canonical forms


def _phrase_texts(node: Node) -> list[str]:
    return [node.text] if isinstance(node, Phrase) else [text for term in node.terms for text in _phrase_texts(term)]


def _format(node: Node) -> str:
    weight = "" if node.weight == 1.0 else f":{_number(node.weight)}"
    if isinstance(node, Phrase):
        return node.text + weight if _reads_back(node.text, weight) else f'"{node.text}"{weight}'
    text = f" {node.operator} ".join(_format_term(node, index, term) for index, term in enumerate(node.terms))
    return f"({text}){weight}" if weight else text


def _format_term(parent: Combination, index: int, term: Node) -> str:
    text = _format(term)
    if not isinstance(term, Combination) or term.weight != 1.0:
        return text  # a weighted group brings its own parentheses
    looser = PRECEDENCE[term.operator] < PRECEDENCE[parent.operator]
    same = term.operator == parent.operator and not (parent.operator == DIFFERENCE and index == 0)
    return f"({text})" if looser or same else text


def _reads_back(text: str, weight: str) -> bool:
    """True when `text` followed by `weight` (":1.5" or "") reads back, unquoted, as this phrase and weight."""
    if any(char in _RESERVED_CHARS for char in text):
        return False
    expected = [("phrase", text)] + ([("weight", float(weight[1:]))] if weight else [])
    return [(token.kind, token.value) for token in _tokens(text + weight)[:-1]] == expected


def _number(value: float) -> str:
    """The shortest decimal (no exponent) that reads back as `value`."""
    return np.format_float_positional(value, trim="-")


def _node_dict(node: Node) -> dict:
    if isinstance(node, Phrase):
        return {"phrase": node.text, "weight": node.weight}
    terms = [_node_dict(term) for term in node.terms]
    return {"operator": OPERATOR_NAMES[node.operator], "terms": terms, "weight": node.weight}
