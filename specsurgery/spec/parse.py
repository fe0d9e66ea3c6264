"""Text to typed spec: lark (LALR) runs one transformer inline, as each rule
is reduced, so no parse tree is built; spans come from the tokens.

Syntax errors stop at the first one (the rest of the file cannot be trusted);
they are converted here, at the boundary, so no lark exception reaches a user.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import re
import threading
from importlib import resources
from pathlib import Path as FsPath
from typing import Optional

import lark
from lark import Lark, Token

from ..errors import Diagnostic, SpecError
from . import model as m

_KEYWORDS = {"schema", "model", "vocab", "group", "use", "was", "as", "out"}

# What lark calls a terminal, in words a user knows.
_TERMINAL_WORDS = {
    "NAME": "a name", "NAME_RUN": "a name", "INT": "a whole number", "STRING": "a quoted path",
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='",
    "DOT": "'.'", "FLOAT": "'float'", "INT_TYPE": "'int'", "BOOL": "'bool'",
    "TRUE": "'true'", "FALSE": "'false'", "OUT": "'out'", "CATEGORY": "'category'",
    "SCHEMA": "'schema'", "MODEL": "'model'", "VOCAB": "'vocab'", "GROUP": "'group'",
    "USE": "'use'", "WAS": "'was'", "AS": "'as'", "$END": "the end of the file",
}


def grammar_text() -> str:
    """The grammar shipped in the wheel, or the checkout's top-level copy."""
    packaged = resources.files("specsurgery").joinpath("grammar/spec.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (FsPath(__file__).resolve().parents[2] / "grammar" / "spec.lark").read_text(encoding="utf-8")


# No propagate_positions: no parse tree is built, every span comes from tokens.
_OPTIONS = dict(parser="lalr", maybe_placeholders=True)
# The LALR tables of the grammar, built once and shipped as plain JSON (lark's
# own cache would pickle.load a file in the temp folder that anyone can plant).
TABLES = FsPath(__file__).with_name("parser_tables.json")


def _grammar_key(grammar: str) -> dict:
    return {"grammar_sha256": hashlib.sha256(grammar.encode()).hexdigest(), "lark": lark.__version__}


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    grammar = grammar_text()
    try:
        with open(TABLES, encoding="utf-8") as f:
            stored = json.load(f, object_hook=_int_keys)
        if stored["key"] == _grammar_key(grammar):
            return Lark._load_from_dict(stored["data"], stored["memo"], transformer=_BUILDER)
    except (OSError, ValueError, KeyError):
        pass
    return Lark(grammar, transformer=_BUILDER, **_OPTIONS)  # edited grammar or another lark: build the tables (~0.1 s)


def _int_keys(obj: dict) -> dict:
    # JSON keys are strings; lark numbers its states, tokens and memo entries.
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def write_parser_tables(path: FsPath = TABLES) -> None:
    """Rebuild the shipped tables after editing the grammar (`python -m specsurgery.spec.parse`)."""
    from lark.grammar import Rule
    from lark.lexer import TerminalDef

    grammar = grammar_text()
    data, memo = Lark(grammar, **_OPTIONS).memo_serialize([TerminalDef, Rule])
    text = json.dumps({"key": _grammar_key(grammar), "data": data, "memo": memo}, sort_keys=True)
    if json.loads(text, object_hook=_int_keys)["data"] != json.loads(json.dumps(data), object_hook=_int_keys):
        raise AssertionError("the parser tables do not survive JSON")
    path.write_text(text + "\n", encoding="utf-8")


def parse_text(text: str, path: str = "<string>") -> m.SpecFile:
    # Parsing allocates many small objects and frees none: the cyclic garbage
    # collector would only rescan them (a third of the time on a large spec).
    was_enabled = gc.isenabled()
    gc.disable()
    _STATE.file, _STATE.errors = path, []
    try:
        spec_file = _parser().parse(text)
        too_deep = _first_too_deep(spec_file)
        if too_deep is not None:
            raise SpecError(Diagnostic(f"calls nest more than {MAX_NESTING} deep", too_deep.span,
                                       "name the inner values in statements of their own"))
        if _STATE.errors:
            raise SpecError(_STATE.errors)
        return spec_file
    except lark.UnexpectedInput as error:
        raise SpecError(_syntax_diagnostic(error, text, path)) from None
    finally:
        _STATE.errors = []
        if was_enabled:
            gc.enable()


# Limits that keep every later stage (graph, maps, plans, the torch model) in
# bounds: nesting within the interpreter's stack, a whole number within what
# an axis can hold in memory (the model's total is checked when it is loaded).
MAX_NESTING = 100
MAX_INT = 1 << 20


def _first_too_deep(spec_file: m.SpecFile) -> Optional[m.Call]:
    """The outermost call nested more than MAX_NESTING calls deep (walked without
    recursion, the last statement first, as the parse tree was)."""
    stack = [(s.expr, 0) for model in spec_file.models for s in model.statements]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, m.Call):
            depth += 1
            if depth > MAX_NESTING:
                return node
            stack.extend((arg, depth) for arg in node.args if isinstance(arg, m.Call))
    return None


def _syntax_diagnostic(error: lark.UnexpectedInput, text: str, path: str) -> Diagnostic:
    line, column = error.line, error.column
    if line is None or line < 1:  # unexpected end of input
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    span = m.Span(file=path, line=line, column=column, end_line=line, end_column=column + 1)
    if isinstance(error, lark.UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        allowed = set(error.allowed or ())
        history = [_one_name(t, last=True) for t in error.token_history or []]
        if char == '"' and allowed == {"STRING"}:
            return Diagnostic("unterminated path: a quoted path must end with '\"' on the same line", span)
        message = f"unexpected character {char!r}"
        if history:
            message += f" after {str(history[-1])!r}"
        hint = None
        if char == "-" and history and history[-1].type == "NAME" and error.pos_in_stream == history[-1].end_pos:
            hint = "names hold letters, digits and '_' only"
        elif char in "+*/":
            hint = "there are no operators; write add(a, b) or mul(a, b)"
        return Diagnostic(message, span, hint)
    if isinstance(error, lark.UnexpectedToken):
        return _token_diagnostic(error, span, text, path)
    if isinstance(error, lark.UnexpectedEOF):
        return Diagnostic("unexpected end of the file", span)
    return Diagnostic(str(error).splitlines()[0], span)


_BLOCK_WORDS = {"schema", "model", "group", "vocab", "use"}
_CLOSERS = {"LPAR": "RPAR", "LBRACE": "RBRACE", "LSQB": "RSQB"}
_TYPES = {"FLOAT", "INT_TYPE", "BOOL", "CATEGORY"}


def _token_diagnostic(error: lark.UnexpectedToken, span: m.Span, text: str, path: str) -> Diagnostic:
    """Turn lark's "unexpected token" into what the user most likely got wrong.

    The parser's value stack holds the tokens read so far that are not yet part
    of a finished rule; any opening bracket on it is still open, and the tokens
    before that bracket say what it belongs to (a group, a call, ...).
    """
    token = _one_name(error.token, last=False)
    at_end = token.type == "$END"
    got = "the end of the file" if at_end else repr(str(token))
    if not at_end:
        span = span.model_copy(update={"end_column": span.column + max(1, len(str(token)))})
    state = error.interactive_parser.parser_state if error.interactive_parser else None
    tokens = [v for v in (state.value_stack if state else ()) if isinstance(v, Token)]
    if error.token_history:
        prev = _one_name(error.token_history[-1], last=True)
    else:
        prev = _one_name(_previous_token(text, len(text) if at_end else token.start_pos), last=True)
    opened = _open_brackets(tokens)
    bracket = opened[-1] if opened else None
    kind, owner = _owner(tokens, bracket) if bracket is not None else (None, None)
    expected_types = {t for t in error.expected if not t.startswith("__")}
    expected_words = {_TERMINAL_WORDS.get(t, repr(t)) for t in expected_types}  # NAME_RUN is a name too
    expected = _or_list(sorted(expected_words)) or "something else"

    def at(tok: Token, width: Optional[int] = None) -> m.Span:
        return m.Span(file=path, line=tok.line, column=tok.column, end_line=tok.line,
                      end_column=tok.column + (len(str(tok)) if width is None else width))

    # A block keyword where a block cannot start: the block above lacks its '}'.
    keyword = None
    if str(token) in _BLOCK_WORDS and token.type != "NAME":
        keyword = token
    elif (prev is not None and prev.type == "NAME" and str(prev) in _BLOCK_WORDS and token.line == prev.line
          and not text[text.rfind("\n", 0, prev.start_pos) + 1:prev.start_pos].strip()):
        keyword = prev  # read as a feature or statement name at the start of a line; what follows gives it away
    in_block = bracket is not None and bracket.type == "LBRACE"
    if keyword is not None and in_block and (keyword is prev or "RBRACE" in expected_types):
        return Diagnostic(f"{owner} (line {bracket.line}) is not closed: expected '}}' before {str(keyword)!r}",
                          at(keyword))
    # The end of the file inside a block or a call: point at what was left open.
    if at_end and bracket is not None:
        closer = _TERMINAL_WORDS[_CLOSERS[bracket.type]]
        return Diagnostic(f"the {str(bracket)!r} of {owner} has no matching {closer} before the end of the file",
                          at(bracket))
    # A stray closing brace with nothing open.
    if token.type == "RBRACE" and not opened:
        return Diagnostic("unmatched '}': every block above is already closed", span,
                          "remove it, or look for a '{' missing above")
    # `1.5`: only whole numbers exist in the language.
    if token.type == "DOT" and prev is not None and prev.type == "INT" and token.start_pos == prev.end_pos:
        match = re.match(r"\.[0-9]*", text[token.start_pos:])
        number = str(prev) + match.group(0)
        where = f"{owner} takes" if kind == "call" else "expected"
        return Diagnostic(f"{where} whole numbers, got {number}", at(prev, len(number)))
    # The next thing starts a new line, so the culprit is at the end of the line
    # before: point there.
    new_line = (prev is not None and token.line > prev.end_line
                and (at_end or token.type in ("RBRACE", "NAME") or str(token) in _BLOCK_WORDS | {"out"}))
    end = prev and m.Span(file=path, line=prev.end_line, column=prev.end_column, end_line=prev.end_line,
                          end_column=prev.end_column + 1)
    # `mana: double`, `mana:` (no type)
    if expected_types and expected_types <= _TYPES and (token.type == "NAME" or new_line):
        feature = str(tokens[-2]) if len(tokens) >= 2 and tokens[-1].type == "COLON" else None
        if feature and kind == "group":
            feature = f"{owner.split()[1]}.{feature}"
        what = f" for feature {feature}" if feature else ""
        if new_line:
            return Diagnostic(f"missing type{what}", end, "types: float, int, bool, category(VOCAB)")
        return Diagnostic(f"unknown type {str(token)!r}{what}", span, "types: float, int, bool, category(VOCAB)")
    in_list = bracket is not None and bracket.type in ("LPAR", "LSQB") and _CLOSERS[bracket.type] in expected_types
    if new_line and in_list:
        found = f"found {got} on line {token.line}"
        if bracket.type == "LPAR":  # calls are written on one line: most likely never closed
            return Diagnostic(f"the '(' of {owner} is not closed: expected {expected} after {str(prev)!r}, {found}", end)
        return Diagnostic(f"expected {expected} after {str(prev)!r} in {owner}, {found}", end)
    after = f" after {str(prev)!r}" if prev is not None else ""
    if len(expected_words) > 6:
        return Diagnostic(f"unexpected {got}{after}", span)
    return Diagnostic(f"expected {expected}{after}, found {got}", span)


def _previous_token(text: str, pos: int) -> Optional[Token]:
    """The token before `pos` (lark's error only knows it when its lexer failed)."""
    try:
        *_, last = _parser().lex(text[:pos])
    except (lark.LarkError, ValueError):
        return None
    return last


def _open_brackets(tokens: list[Token]) -> list[Token]:
    stack: list[Token] = []
    closers = set(_CLOSERS.values())
    for tok in tokens:
        if tok.type in _CLOSERS:
            stack.append(tok)
        elif tok.type in closers and stack:
            stack.pop()
    return stack


def _owner(tokens: list[Token], bracket: Token) -> tuple[Optional[str], str]:
    """What an open bracket belongs to: (kind, words), e.g. ("group", "group hero"), ("call", "linear")."""
    before = tokens[:next(k for k in range(len(tokens) - 1, -1, -1) if tokens[k] is bracket)]
    if bracket.type == "LPAR":
        if len(before) >= 2 and before[-2].type == "MODEL":
            return "model", f"model {before[-1]}"
        if before and before[-1].type == "CATEGORY":
            return "category", "category"
        if before and before[-1].type == "NAME":
            return "call", str(before[-1])
    if bracket.type == "LSQB":
        if len(before) >= 3 and before[-3].type == "VOCAB":
            return "vocab", f"vocab {before[-2]}"
        if len(before) >= 2 and before[-2].type == "GROUP":
            return "group", f"group {before[-1]}"
    if bracket.type == "LBRACE":
        for k in range(len(before) - 2, -1, -1):
            if before[k].type in ("GROUP", "SCHEMA", "MODEL"):
                return str(before[k]), f"{before[k]} {before[k + 1]}"
    return None, f"line {bracket.line}"


def _or_list(words: list[str]) -> str:
    if not words:
        return ""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _run_names(run: Token) -> list[Token]:
    """The NAME tokens of a NAME_RUN (`a, b, c`), each where it stands in the file."""
    text, names = str(run), []
    line, line_start = run.line, -(run.column - 1)  # the run's offset of its line's first column
    at = 0
    for match in _NAME.finditer(text):
        start = match.start()
        newlines = text.count("\n", at, start)
        if newlines:
            line += newlines
            line_start = text.rfind("\n", at, start) + 1
        at = match.end()
        column = start - line_start + 1
        names.append(Token("NAME", match.group(), run.start_pos + start, line, column, line, column + at - start,
                           run.start_pos + at))
    return names


def _one_name(token: Optional[Token], last: bool) -> Optional[Token]:
    """A NAME_RUN as what a user wrote there: its last name (the one before what
    follows), or its first (where it starts); any other token as it is."""
    if token is None or token.type != "NAME_RUN":
        return token
    names = _run_names(token)
    return names[-1] if last else names[0]


def _span(path: str, token: Token, end: Optional[Token] = None) -> m.Span:
    """From the start of `token` to the end of `end` (else of `token` itself)."""
    end = token if end is None else end
    # The most made node of all; its fields come straight from lark's ints, so
    # pydantic's validation is skipped (m.built).
    return m.built(m.Span, file=path, line=token.line, column=token.column, end_line=end.end_line,
                   end_column=end.end_column)


class _State(threading.local):
    """What the parse under way in this thread reads and adds to: its file and its errors."""

    def __init__(self):  # once per thread
        self.file = "<string>"
        self.errors: list[Diagnostic] = []


_STATE = _State()


class _ToSpec:
    """The typed node of each rule, made from its children as lark reduces it
    (lark calls the method named after the rule). A node's span runs from its
    first token to its last: `call` keeps its ')' for that (`!call` in the grammar)."""

    def _int(self, token: Token) -> int:
        """A whole number within MAX_INT; out of bounds it is reported, and 1 stands in for it."""
        digits = str(token).lstrip("-")
        if len(digits) <= 9 and int(digits) <= MAX_INT:
            return int(str(token))
        shown = str(token) if len(str(token)) <= 20 else f"{str(token)[:12]}... ({len(digits):,} digits)"
        _STATE.errors.append(Diagnostic(f"{shown} is too large: whole numbers in a spec are at most {MAX_INT:,}",
                                        _span(_STATE.file, token)))
        return 1

    def start(self, children):
        return m.SpecFile(
            path=_STATE.file,
            uses=tuple(c for c in children if isinstance(c, m.Use)),
            schemas=tuple(c for c in children if isinstance(c, m.Schema)),
            models=tuple(c for c in children if isinstance(c, m.Model)),
        )

    def use_decl(self, children):
        return m.Use(path=str(children[0])[1:-1], span=_span(_STATE.file, children[0]))  # the caret goes under the path

    def schema(self, children):
        name, *items = children
        return m.Schema(
            name=str(name),
            vocabs=tuple(i for i in items if isinstance(i, m.Vocab)),
            groups=tuple(i for i in items if isinstance(i, m.Group)),
            span=_span(_STATE.file, name),
        )

    def vocab(self, children):
        name, *entries = children
        items = []
        for entry in entries:
            if isinstance(entry, list):  # a run of names
                items.extend(entry)
            elif entry is not None:
                items.append(entry)
        return m.Vocab(name=str(name), items=tuple(items), span=_span(_STATE.file, name))

    def vocab_item(self, children):
        name, was = children  # as many as a vocabulary has items: made without pydantic's checks
        return m.built(m.VocabItem, name=str(name), was=was, span=_span(_STATE.file, name))

    def vocab_run(self, children):
        run, was = children
        names, file = _run_names(run), _STATE.file
        # `a, b, c was old`: only the last one can be renamed
        return [m.built(m.VocabItem, name=str(n), was=was if k == len(names) - 1 else None, span=_span(file, n))
                for k, n in enumerate(names)]

    def was(self, children):
        return str(children[0])

    def entity_count(self, children):
        return (self._int(children[0]), _span(_STATE.file, children[0]))

    def group(self, children):
        name, count, was, *features = children
        return m.Group(
            name=str(name),
            entities=count[0] if count else None,
            entities_span=count[1] if count else m.NO_SPAN,
            was=was,
            features=tuple(features),
            span=_span(_STATE.file, name),
        )

    def feature(self, children):
        name, (type_, vocab), was = children
        return m.Feature(name=str(name), type=type_, vocab=vocab, was=was, span=_span(_STATE.file, name))

    def feature_type(self, children):
        (child,) = children
        if isinstance(child, Token):
            return (str(child), None)
        return ("category", child)

    def category(self, children):
        return str(children[0])

    def model(self, children):
        name, input_name, schema_name, *statements = children
        return m.Model(
            name=str(name),
            input_name=str(input_name),
            schema_name=str(schema_name),
            statements=tuple(statements),
            span=_span(_STATE.file, name),
            schema_span=_span(_STATE.file, schema_name),
        )

    def statement(self, children):
        out, name, was, expr = children
        return m.Statement(name=str(name), expr=expr, out=out is not None, was=was, span=_span(_STATE.file, name))

    def call(self, children):
        # NAME "(" [argument ("," argument)*] ")" [alias], every token kept (`!call`)
        name, alias = children[0], children[-1]
        rest = [c for c in children[1:-1] if c is not None and not isinstance(c, Token)]
        args = tuple(a for a in rest if not isinstance(a, m.Keyword))
        keywords = tuple(a for a in rest if isinstance(a, m.Keyword))
        return m.Call(
            op=str(name),
            args=args,
            keywords=keywords,
            alias=alias[1] if alias else None,
            span=_span(_STATE.file, name, alias[2] if alias else children[-2]),
            op_span=_span(_STATE.file, name),
        )

    def alias(self, children):
        return ("alias", str(children[0]), children[0])

    def int_argument(self, children):
        return m.IntArg(value=self._int(children[0]), span=_span(_STATE.file, children[0]))

    def decimal_argument(self, children):
        return m.DecimalArg(value=float(children[0]), span=_span(_STATE.file, children[0]))

    def keyword_argument(self, children):
        name, value = children
        parsed = {"true": True, "false": False}.get(str(value))
        return m.Keyword(name=str(name), value=self._int(value) if parsed is None else parsed,
                         span=_span(_STATE.file, name, value))

    def path(self, children):
        return m.Path(parts=tuple(str(c) for c in children), span=_span(_STATE.file, children[0], children[-1]))


_BUILDER = _ToSpec()


if __name__ == "__main__":
    write_parser_tables()
    print(f"wrote {TABLES}")
