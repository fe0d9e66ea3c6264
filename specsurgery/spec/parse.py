"""Text to typed spec: lark (LALR, positions kept) and one transformer.

Syntax errors stop at the first one (the rest of the file cannot be trusted);
they are converted here, at the boundary, so no lark exception reaches a user.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path as FsPath
from typing import Optional

import lark
from lark import Lark, Token, Transformer, v_args

from ..errors import Diagnostic, SpecError
from . import model as m

_KEYWORDS = {"schema", "model", "vocab", "group", "use", "was", "as", "out"}

# What lark calls a terminal, in words a user knows.
_TERMINAL_WORDS = {
    "NAME": "a name", "INT": "a whole number", "STRING": "a quoted path",
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


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_text(text: str, path: str = "<string>") -> m.SpecFile:
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedInput as error:
        raise SpecError(_syntax_diagnostic(error, text, path)) from None
    return _ToSpec(path).transform(tree)


def _syntax_diagnostic(error: lark.UnexpectedInput, text: str, path: str) -> Diagnostic:
    line, column = error.line, error.column
    if line is None or line < 1:  # unexpected end of input
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    span = m.Span(file=path, line=line, column=column, end_line=line, end_column=column + 1)
    if isinstance(error, lark.UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        return Diagnostic(f"unexpected character {char!r}", span)
    if isinstance(error, lark.UnexpectedToken):
        token = error.token
        if token.type == "$END":
            got = "the end of the file"
        else:
            got = repr(str(token))
            span = span.model_copy(update={"end_column": column + max(1, len(str(token)))})
        expected = sorted(_TERMINAL_WORDS.get(t, repr(t)) for t in error.expected if not t.startswith("__"))
        if len(expected) > 6:
            return Diagnostic(f"unexpected {got}", span)
        return Diagnostic(f"unexpected {got}, expected {_or_list(expected)}", span)
    if isinstance(error, lark.UnexpectedEOF):
        return Diagnostic("unexpected end of the file", span)
    return Diagnostic(str(error).splitlines()[0], span)


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _span(path: str, meta_or_token) -> m.Span:
    return m.Span(
        file=path,
        line=meta_or_token.line,
        column=meta_or_token.column,
        end_line=meta_or_token.end_line,
        end_column=meta_or_token.end_column,
    )


@v_args(meta=True)
class _ToSpec(Transformer):
    def __init__(self, path: str):
        super().__init__()
        self.file = path

    def _s(self, meta) -> m.Span:
        return _span(self.file, meta)

    def start(self, meta, children):
        uses = tuple(c for c in children if isinstance(c, m.Use))
        return m.SpecFile(
            path=self.file,
            uses=uses,
            schemas=tuple(c for c in children if isinstance(c, m.Schema)),
            models=tuple(c for c in children if isinstance(c, m.Model)),
        )

    def use_decl(self, meta, children):
        return m.Use(path=str(children[0])[1:-1], span=self._s(meta))

    def schema(self, meta, children):
        name, *items = children
        return m.Schema(
            name=str(name),
            vocabs=tuple(i for i in items if isinstance(i, m.Vocab)),
            groups=tuple(i for i in items if isinstance(i, m.Group)),
            span=_span(self.file, name),
        )

    def vocab(self, meta, children):
        name, *items = children
        return m.Vocab(name=str(name), items=tuple(i for i in items if i is not None), span=_span(self.file, name))

    def vocab_item(self, meta, children):
        name, was = children
        return m.VocabItem(name=str(name), was=was, span=_span(self.file, name))

    def was(self, meta, children):
        return str(children[0])

    def entity_count(self, meta, children):
        return (int(children[0]), _span(self.file, children[0]))

    def group(self, meta, children):
        name, count, was, *features = children
        return m.Group(
            name=str(name),
            entities=count[0] if count else None,
            entities_span=count[1] if count else m.NO_SPAN,
            was=was,
            features=tuple(features),
            span=_span(self.file, name),
        )

    def feature(self, meta, children):
        name, (type_, vocab), was = children
        return m.Feature(name=str(name), type=type_, vocab=vocab, was=was, span=_span(self.file, name))

    def feature_type(self, meta, children):
        (child,) = children
        if isinstance(child, Token):
            return (str(child), None)
        return ("category", child)

    def category(self, meta, children):
        return str(children[0])

    def model(self, meta, children):
        name, input_name, schema_name, *statements = children
        return m.Model(
            name=str(name),
            input_name=str(input_name),
            schema_name=str(schema_name),
            statements=tuple(statements),
            span=_span(self.file, name),
            schema_span=_span(self.file, schema_name),
        )

    def statement(self, meta, children):
        out, name, was, expr = children
        return m.Statement(name=str(name), expr=expr, out=out is not None, was=was, span=_span(self.file, name))

    def call(self, meta, children):
        name, *rest = children
        alias = rest.pop() if rest and isinstance(rest[-1], tuple) and rest[-1][0] == "alias" else None
        if rest and rest[-1] is None:  # the optional alias slot
            rest.pop()
        args = tuple(a for a in rest if a is not None and not isinstance(a, m.Keyword))
        keywords = tuple(a for a in rest if isinstance(a, m.Keyword))
        return m.Call(
            op=str(name),
            args=args,
            keywords=keywords,
            alias=alias[1] if alias else None,
            span=self._s(meta),
            op_span=_span(self.file, name),
        )

    def alias(self, meta, children):
        return ("alias", str(children[0]))

    def int_argument(self, meta, children):
        return m.IntArg(value=int(children[0]), span=self._s(meta))

    def keyword_argument(self, meta, children):
        name, value = children
        parsed = {"true": True, "false": False}.get(str(value))
        return m.Keyword(name=str(name), value=int(value) if parsed is None else parsed, span=self._s(meta))

    def path(self, meta, children):
        return m.Path(parts=tuple(str(c) for c in children), span=self._s(meta))


def read_spec_file(path: str, text: Optional[str] = None) -> m.SpecFile:
    if text is None:
        text = FsPath(path).read_text(encoding="utf-8")
    return parse_text(text, path)
