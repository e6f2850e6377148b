"""libdm's report selections (`-S`): its grammar, its errors, and matching rows against them.

    OR_EX  := AND_EX (('||' | '#') OR_EX)
    AND_EX := EX (('&&' | ',') AND_EX)
    EX     := '!' '(' OR_EX ')' | '(' OR_EX ')' | FIELD CMP VALUE

CMP is one of =~ !~ = != >= > <= < (tried in that order, by prefix, as libdm does); a string
value is quoted by ' or ", or ends at a space or a logical operator; a number is digits with at
most one '.'; a regular expression may also be enclosed in (), {} or []. Parsing follows lvm2
2.03.16's libdm-report.c (_parse_or_ex and below), errors included: `SelectionError` carries
the lines libdm logs and which help (the typed field list, the operators) goes first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# ("item", kind, value fn, op, operand), ("and" | "or", [nodes]) or ("not", node)
Node = tuple[Any, ...]

LOGICAL = (("&&", "and"), (",", "and"), ("||", "or"), ("#", "or"), ("!", "not"), ("(", "ps"),
           (")", "pe"), ("[", "ls"), ("]", "le"), ("{", "subset_ls"), ("}", "subset_le"))
LOGICAL_HELP = ("All fields must match", "All fields must match",
                "At least one field must match", "At least one field must match",
                "Logical negation", "Left parenthesis", "Right parenthesis", "List start",
                "List end", "List subset start", "List subset end")
COMPARISON = (
    ("=~", "Matching regular expression. [regex]"),
    ("!~", "Not matching regular expression. [regex]"),
    ("=", "Equal to. [number, size, percent, string, string list, time]"),
    ("!=", "Not equal to. [number, size, percent, string, string_list, time]"),
    (">=", "Greater than or equal to. [number, size, percent, time]"),
    (">", "Greater than. [number, size, percent, time]"),
    ("<=", "Less than or equal to. [number, size, percent, time]"),
    ("<", "Less than. [number, size, percent, time]"),
    ("since", "Since specified time (same as '>='). [time]"),
    ("after", "After specified time (same as '>'). [time]"),
    ("until", "Until specified time (same as '<='). [time]"),
    ("before", "Before specified time (same as '<'). [time]"),
)
ORDERING = {">=", ">", "<=", "<"}
TIME_ONLY = {"since", "after", "until", "before"}
SIZE_UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
              "p": 1 << 50, "e": 1 << 60}

SYNTAX = "Selection syntax error at '{}'."
HELP_REF = "Use 'help' for selection to get more help."


def operators_help() -> str:
    """libdm's _display_selection_help (dmsetup has no reserved values)."""
    return "".join(line + "\n" for line in (
        "Selection operands",
        "------------------",
        "  field               - Reporting field.",
        "  number              - Non-negative integer value.",
        "  size                - Floating point value with units, 'm' unit used by default if "
        "not specified.",
        "  percent             - Non-negative integer with or without % suffix.",
        "  string              - Characters quoted by ' or \" or unquoted.",
        "  string list         - Strings enclosed by [ ] or { } and elements delimited by "
        "either",
        "                        \"all items must match\" or \"at least one item must match\" "
        "operator.",
        "  regular expression  - Characters quoted by ' or \" or unquoted.",
        " ",
        "Selection operators",
        "-------------------",
        "  Comparison operators:",
        *(f"    {op:>6}  - {text}" for op, text in COMPARISON),
        " ",
        "  Logical and grouping operators:",
        *(f"    {op:>4}  - {text}" for (op, _), text in zip(LOGICAL, LOGICAL_HELP, strict=True)),
        " ",
    ))


class SelectionError(ValueError):
    """What libdm logs for a selection it cannot parse; `preface` is the help it prints
    first: "fields" (the typed field list), "operators" or None."""

    def __init__(self, lines: list[str], preface: str | None = None) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.preface = preface


# A field as a selection sees it: its kind (string, number, size) and its value in a row.
Fields = Mapping[str, tuple[str, Callable[[Any], Any]]]


def _logical(s: str, expect: set[str]) -> tuple[str | None, str]:
    s = s.lstrip()
    for token, flag in LOGICAL:
        if flag in expect and s.startswith(token):
            return flag, s[len(token):]
    return None, s


def parse(text: str, fields: Fields) -> Node | None:
    """The selection's tree, None for an empty one or `all`."""
    if not text or text.lower() == "all":
        return None
    node, rest = _or(text, fields)
    rest = rest.lstrip()
    if rest:
        raise SelectionError(["Expecting logical operator", SYNTAX.format(rest), HELP_REF])
    return node


def _or(s: str, fields: Fields) -> tuple[Node, str]:
    return _joined(s, fields, _and, "or")


def _and(s: str, fields: Fields) -> tuple[Node, str]:
    return _joined(s, fields, _ex, "and")


def _joined(s: str, fields: Fields, part: Callable[[str, Fields], tuple[Node, str]],
            flag: str) -> tuple[Node, str]:
    """PART (OP PART)...: one node, or the `flag` node of them all."""
    items = []
    while True:
        node, s = part(s, fields)
        items.append(node)
        found, after = _logical(s, {flag})
        if found is None:
            return (items[0] if len(items) == 1 else (flag, items)), s
        s = after


def _ex(s: str, fields: Fields) -> tuple[Node, str]:
    flag, after = _logical(s, {"not", "ps"})
    if flag == "not":
        paren, inner = _logical(after, {"ps"})
        if paren is None:
            raise SelectionError([f"Syntax error: left parenthesis expected at '{after}'"])
        node, rest = _or(inner, fields)
        paren, after = _logical(rest, {"pe"})
        if paren is None:
            raise SelectionError([f"Syntax error: right parenthesis expected at '{rest}'"])
        return ("not", node), after
    if flag == "ps":
        node, rest = _or(after, fields)
        paren, after = _logical(rest, {"pe"})
        if paren is None:
            raise SelectionError([f"Syntax error: right parenthesis expected at '{after}'"])
        return node, after
    return _item(s.lstrip(), fields)


def _item(s: str, fields: Fields) -> tuple[Node, str]:
    def bad(*lines: str, preface: str | None = None) -> SelectionError:
        return SelectionError([*lines, SYNTAX.format(s), HELP_REF], preface)

    name_match = re.match(r"[A-Za-z0-9_-]*", s)
    name = name_match[0] if name_match else ""
    if not name:
        raise bad("Expecting field name")
    if name not in fields:
        raise bad(f"Unrecognised selection field: {name}", preface="fields")
    kind, value = fields[name]
    after_name = s[len(name):]
    rest = after_name.lstrip()
    op = next((o for o, _ in COMPARISON if rest.startswith(o)), None)
    if op is None:
        raise bad(f"Unrecognised comparison operator: {after_name}", preface="operators")
    rest = rest[len(op):].lstrip()
    if op in ("=~", "!~"):
        if not rest:
            raise bad(f"Regular expression expected for selection field {name}")
        close = {"(": ")", "{": "}", "[": "]", '"': '"', "'": "'"}.get(rest[0])
        operand, rest = _string(rest[1:] if close else rest, close)
        if operand is None:
            raise bad("Missing end quote.",
                      f"Failed to parse regex value for selection field {name}.")
        return ("item", kind, value, op, re.compile(operand)), rest.lstrip()
    if op in ORDERING and kind == "string":
        raise bad(f"Operator can be used only with number, size, time or percent fields: {s}",
                  preface="operators")
    if op in TIME_ONLY:
        raise bad(f"Operator can be used only with time fields: {s}", preface="operators")
    if kind == "string":
        quote = rest[0] if rest[:1] in ("'", '"') else None
        operand, rest = _string(rest[1:] if quote else rest, quote)
        if operand is None:
            raise bad("Missing end quote.",
                      f"Failed to parse string value for selection field {name}.")
        return ("item", kind, value, op, operand), rest.lstrip()
    number = re.match(r"\d*\.?\d*", rest)
    digits = number[0] if number else ""
    if not digits or digits == ".":
        raise bad(f"Failed to parse numeric value for selection field {name}.")
    rest = rest[len(digits):]
    factor = 1
    unit = rest[:1].lower()
    if unit in SIZE_UNITS:
        if kind != "size":
            raise bad("Found size unit specifier but numeric value expected for selection "
                      f"field {name}.")
        factor, rest = SIZE_UNITS[unit], rest[1:]
    elif kind == "size":
        factor = SIZE_UNITS["m"]  # as lvcreate -L: MiB unless said
    return ("item", kind, value, op, float(digits) * factor), rest.lstrip()


def _string(s: str, close: str | None) -> tuple[str | None, str]:
    """A value up to `close` (consumed; None if missing), or unquoted up to a space or
    one of && , || # )."""
    if close:
        end = s.find(close)
        return (None, s) if end < 0 else (s[:end], s[end + 1:])
    end = 0
    while end < len(s) and s[end] != " " and \
            _logical(s[end:], {"and", "or", "pe"})[0] is None:
        end += 1
    return s[:end], s[end:]


def matches(node: Node | None, row: Any) -> bool:
    if node is None:
        return True
    if node[0] == "and":
        return all(matches(n, row) for n in node[1])
    if node[0] == "or":
        return any(matches(n, row) for n in node[1])
    if node[0] == "not":
        return not matches(node[1], row)
    _, kind, value, op, operand = node
    got = value(row)
    if op in ("=~", "!~"):
        return bool((operand.search(str(got)) is not None) == (op == "=~"))
    a: Any = str(got) if kind == "string" else float(got)
    return bool({"=": a == operand, "!=": a != operand, "<": a < operand,
                 "<=": a <= operand, ">": a > operand, ">=": a >= operand}[op])
