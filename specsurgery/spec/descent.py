"""A quick reader of well-formed spec text: recursive descent over one regular
expression, no lark.

Every process that reads a spec (apply reads two: the checkpoint's canonical
text and the new file) would otherwise pay for lark's import, its tables and
its per-token cost, most of a process's start. This reader accepts only what
it is sure the grammar (grammar/spec.lark, read by lark in parse.py) accepts,
and gives the same typed nodes, spans included. At anything else (a syntax
error, a name lark's contextual lexer reads another way, a number out of
bounds, deep nesting) it gives up and returns None: lark parses the text
again and says what is wrong, so every message stays lark's. A test reads the
same texts both ways (tests/test_descent.py).

How lark reads a name depends on where it stands: where a name may stand, a
keyword is a keyword only where it may stand too (`out` at a statement's start,
`was` after a feature's type); where no name may stand, lark matches keywords
as prefixes (`groupx` is `group x`), which this reader leaves to lark.
"""
from __future__ import annotations

import re
from typing import Optional

from . import model as m
from .parse import MAX_INT, MAX_NESTING

# One token after any whitespace and comments: a name, a number (its fraction
# or exponent apart, so a decimal is told from a whole number), a quoted path,
# a punctuation mark, the end, or (last, so a match always succeeds at once)
# any other character, where this reader gives up.
_TOKEN = re.compile(r"""[ \t\f\r\n]*(?:\#[^\n]*[ \t\f\r\n]*)*
    (?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)
      |(?P<int>-?[0-9]+)(?P<fraction>\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)?
      |(?P<string>"[^"\n]*")
      |(?P<mark>[{}()\[\],:=.])
      |(?P<end>\Z)
      |(?P<other>(?s:.)))""", re.VERBOSE)

# A vocabulary's plain names in a row (`a, b, c`), as the grammar's NAME_RUN.
_RUN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:[ \t\r\n]*,[ \t\r\n]*[A-Za-z_][A-Za-z0-9_]*)+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPES = {"float": "float", "int": "int", "bool": "bool"}
_BOOLS = {"true": True, "false": False}


class _GiveUp(Exception):
    """Not surely well-formed: lark reads it."""


def read_well_formed(text: str, path: str) -> Optional[m.SpecFile]:
    """The SpecFile lark would give for `text`, or None where this reader is not sure."""
    try:
        return _Reader(text, path).spec_file()
    except (_GiveUp, RecursionError):
        return None


class _Reader:
    """The tokens of one text, read one at a time (kind, text, line, column).

    A token is a tuple: (kind, text, line, column); `kind` is "name", "int",
    "decimal", "string", the punctuation mark itself, or "end"."""

    def __init__(self, text: str, path: str):
        self.text, self.file = text, path
        self.pos, self.line, self.line_start = 0, 1, 0
        self.token = self._lex()

    def _lex(self) -> tuple:
        text = self.text
        match = _TOKEN.match(text, self.pos)
        kind = match.lastgroup
        if kind == "fraction":
            kind = "decimal"
        start = match.start(kind if kind != "decimal" else "int")
        newlines = text.count("\n", self.pos, start)
        if newlines:
            self.line += newlines
            self.line_start = text.rfind("\n", self.pos, start) + 1
        self.pos = match.end()
        if kind == "other":
            raise _GiveUp
        value = text[start:self.pos]
        return (value if kind == "mark" else kind, value, self.line, start - self.line_start + 1)

    def take(self, kind: str) -> tuple:
        token = self.token
        if token[0] != kind:
            raise _GiveUp
        self.token = self._lex()
        return token

    def keyword(self, word: str) -> tuple:
        token = self.token
        if token[0] != "name" or token[1] != word:
            raise _GiveUp
        self.token = self._lex()
        return token

    def at(self, kind: str, word: Optional[str] = None) -> bool:
        return self.token[0] == kind and (word is None or self.token[1] == word)

    def span(self, first: tuple, last: Optional[tuple] = None) -> m.Span:
        last = first if last is None else last
        return m.built(m.Span, file=self.file, line=first[2], column=first[3], end_line=last[2],
                       end_column=last[3] + len(last[1]))

    def whole(self, token: tuple) -> int:
        """A whole number as the parser's _int takes it; out of bounds lark reports it."""
        digits = token[1].lstrip("-")
        if token[0] != "int" or len(digits) > 9 or int(digits) > MAX_INT:
            raise _GiveUp
        return int(token[1])

    # ---- the grammar, rule by rule (grammar/spec.lark) ----------------------

    def spec_file(self) -> m.SpecFile:
        uses, schemas, models = [], [], []
        while self.at("name", "use"):
            self.take("name")
            path = self.take("string")
            uses.append(m.built(m.Use, path=path[1][1:-1], span=self.span(path)))
        while not self.at("end"):
            if self.at("name", "schema"):
                schemas.append(self.schema())
            elif self.at("name", "model"):
                models.append(self.model())
            else:
                raise _GiveUp
        return m.built(m.SpecFile, path=self.file, uses=tuple(uses), schemas=tuple(schemas), models=tuple(models))

    def was(self) -> Optional[str]:
        if not self.at("name", "was"):
            return None
        self.take("name")
        return self.take("name")[1]

    def schema(self) -> m.Schema:
        self.take("name")
        name = self.take("name")
        self.take("{")
        vocabs, groups = [], []
        while not self.at("}"):
            if self.at("name", "vocab"):
                vocabs.append(self.vocab())
            elif self.at("name", "group"):
                groups.append(self.group())
            else:
                raise _GiveUp
        self.take("}")
        return m.built(m.Schema, name=name[1], vocabs=tuple(vocabs), groups=tuple(groups), span=self.span(name))

    def vocab(self) -> m.Vocab:
        self.take("name")
        name = self.take("name")
        self.take("=")
        self.take("[")
        items: list = []
        while not self.at("]"):
            if self.at("name"):
                self.vocab_entry(items)
            else:
                raise _GiveUp
            if not self.at("]"):
                self.take(",")
        self.take("]")
        return m.built(m.Vocab, name=name[1], items=tuple(items), span=self.span(name))

    def vocab_entry(self, items: list) -> None:
        """One item, or a run of plain names read at once (their cost is most of a large vocabulary's)."""
        first = self.token
        start = self.line_start + first[3] - 1
        run = _RUN.match(self.text, start)
        if run is None:
            self.take("name")
            items.append(m.built(m.VocabItem, name=first[1], was=self.was(), span=self.span(first)))
            return
        text, file, built, Span, VocabItem = self.text, self.file, m.built, m.Span, m.VocabItem
        line, line_start = self.line, self.line_start
        at = start
        for match in _NAME.finditer(text, start, run.end()):
            begin = match.start()
            newlines = text.count("\n", at, begin)
            if newlines:
                line += newlines
                line_start = text.rfind("\n", at, begin) + 1
            at = match.end()
            column = begin - line_start + 1
            span = built(Span, file=file, line=line, column=column, end_line=line, end_column=column + at - begin)
            items.append(built(VocabItem, name=match.group(), was=None, span=span))
        self.pos, self.line, self.line_start = at, line, line_start
        self.token = self._lex()
        was = self.was()
        if was is not None:  # only the last of a run can be renamed
            last = items[-1]
            items[-1] = built(VocabItem, name=last.name, was=was, span=last.span)

    def group(self) -> m.Group:
        self.take("name")
        name = self.take("name")
        entities, entities_span = None, m.NO_SPAN
        if self.at("["):
            self.take("[")
            count = self.token
            entities, entities_span = self.whole(count), self.span(count)
            self.take("int")
            self.take("]")
        was = self.was()
        self.take("{")
        features = []
        while not self.at("}"):
            features.append(self.feature())
        self.take("}")
        return m.built(m.Group, name=name[1], entities=entities, was=was, features=tuple(features),
                       span=self.span(name), entities_span=entities_span)

    def feature(self) -> m.Feature:
        name = self.take("name")
        self.take(":")
        word = self.take("name")[1]
        vocab = None
        if word == "category":
            self.take("(")
            vocab = self.take("name")[1]
            self.take(")")
        elif word not in _TYPES:
            raise _GiveUp
        return m.built(m.Feature, name=name[1], type=word, vocab=vocab, was=self.was(), span=self.span(name))

    def model(self) -> m.Model:
        self.take("name")
        name = self.take("name")
        self.take("(")
        input_name = self.take("name")
        self.take(":")
        schema_name = self.take("name")
        self.take(")")
        self.take("{")
        statements = []
        while not self.at("}"):
            statements.append(self.statement())
        self.take("}")
        return m.built(m.Model, name=name[1], input_name=input_name[1], schema_name=schema_name[1],
                       statements=tuple(statements), span=self.span(name), schema_span=self.span(schema_name))

    def statement(self) -> m.Statement:
        out = self.at("name", "out")
        if out:
            self.take("name")
        name = self.take("name")
        was = self.was()
        self.take("=")
        expr = self.call_or_path(self.take("name"), 0)
        return m.built(m.Statement, name=name[1], expr=expr, out=out, was=was, span=self.span(name))

    def call_or_path(self, name: tuple, depth: int):
        """What follows a name read where an expression starts; `depth` calls enclose it."""
        if not self.at("("):
            return self.path(name)
        if depth >= MAX_NESTING:
            raise _GiveUp  # lark's reading says where the nesting goes too deep
        self.take("(")
        args, keywords = [], []
        if not self.at(")"):
            while True:
                self.argument(args, keywords, depth + 1)
                if self.at(")"):
                    break
                self.take(",")
        close = self.take(")")
        alias = None
        if self.at("name", "as"):
            self.take("name")
            alias = self.take("name")
        return m.built(m.Call, kind="call", op=name[1], args=tuple(args), keywords=tuple(keywords),
                       alias=alias[1] if alias else None, span=self.span(name, alias or close),
                       op_span=self.span(name))

    def argument(self, args: list, keywords: list, depth: int) -> None:
        token = self.token
        kind = token[0]
        if kind == "int":
            self.take("int")
            args.append(m.built(m.IntArg, kind="int", value=self.whole(token), span=self.span(token)))
        elif kind == "decimal":
            self.take("decimal")
            args.append(m.built(m.DecimalArg, kind="decimal", value=float(token[1]), span=self.span(token)))
        elif kind == "name":
            self.take("name")
            if not self.at("="):
                args.append(self.call_or_path(token, depth))
                return
            self.take("=")
            value = self.token
            parsed = _BOOLS[value[1]] if value[0] == "name" and value[1] in _BOOLS else self.whole(value)
            self.token = self._lex()
            keywords.append(m.built(m.Keyword, name=token[1], value=parsed, span=self.span(token, value)))
        else:
            raise _GiveUp

    def path(self, first: tuple) -> m.Path:
        parts, last = [first[1]], first
        while self.at("."):
            self.take(".")
            last = self.take("name")
            parts.append(last[1])
        return m.built(m.Path, kind="path", parts=tuple(parts), span=self.span(first, last))
