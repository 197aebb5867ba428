"""A tiny, safe parser and exact evaluator for integer arithmetic: + - * / ( ) and unary minus.

Model text is never `eval`ed: this recursive-descent parser accepts only ASCII integers, the four
operators, parentheses and whitespace (plus the look-alikes × ÷ −), and rejects anything else.
Adversarial input is bounded three ways: a length cap (`MAX_CHARS`), a nesting cap on parentheses
and unary minus (`MAX_DEPTH`), and no exponent operator, so a value can never grow past what
`MAX_CHARS` characters of products allow.  Evaluation uses `Fraction`, so 7/2*2 == 7 exactly.

Grammar:
    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := '-' unary | atom
    atom   := INT | '(' expr ')'
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
_ALIASES = {"×": "*", "÷": "/", "−": "-"}
_OPERATORS = "+-*/()"


class ParseError(ValueError):
    """The text is not an expression of the grammar (or breaks a safety cap)."""


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Neg:
    operand: "Node"


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Node"
    right: "Node"


Node = Num | Neg | BinOp


def tokenize(text: str) -> list[str]:
    """Integers and single-char operators; raises ParseError on any other character."""
    if len(text) > MAX_CHARS:
        raise ParseError(f"expression longer than {MAX_CHARS} chars")
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = _ALIASES.get(text[i], text[i])
        if ch in " \t\r\n":
            i += 1
        elif "0" <= ch <= "9":  # ASCII only: str.isdigit() would accept '²' and friends
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch in _OPERATORS:
            tokens.append(ch)
            i += 1
        else:
            raise ParseError(f"unexpected character {text[i]!r}")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end of expression")
        self.pos += 1
        return token

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"nesting deeper than {MAX_DEPTH}")

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = BinOp(op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = BinOp(op, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            self.nest()
            node: Node = Neg(self.unary())
            self.depth -= 1
            return node
        return self.atom()

    def atom(self) -> Node:
        token = self.take()
        if token == "(":
            self.nest()
            node = self.expr()
            if self.take() != ")":
                raise ParseError("expected ')'")
            self.depth -= 1
            return node
        if token.isascii() and token.isdigit():
            return Num(int(token))
        raise ParseError(f"unexpected token {token!r}")


def parse_expression(text: str) -> Node:
    """The syntax tree of `text`; raises ParseError if it is not one whole expression."""
    parser = _Parser(tokenize(text))
    node = parser.expr()
    if parser.peek() is not None:
        raise ParseError(f"unexpected token {parser.peek()!r}")
    return node


def literals(node: Node) -> list[int]:
    """The integer literals of the tree, left to right (what Countdown checks against its numbers)."""
    if isinstance(node, Num):
        return [node.value]
    if isinstance(node, Neg):
        return literals(node.operand)
    return literals(node.left) + literals(node.right)


def evaluate(node: Node) -> Fraction:
    """The exact value of the tree; raises ZeroDivisionError on division by zero."""
    if isinstance(node, Num):
        return Fraction(node.value)
    if isinstance(node, Neg):
        return -evaluate(node.operand)
    left, right = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        return left + right
    if node.op == "-":
        return left - right
    if node.op == "*":
        return left * right
    return left / right  # Fraction raises ZeroDivisionError on 0
