"""Known model families and the prefixes they were trained with.

ruri models expect a prefix that says whether a text is a query or a passage;
without it retrieval quality drops. A request chooses with ``input_type``;
the server-wide default (``DEFAULT_INPUT_TYPE``) applies otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

# Names clients use for input_type, mapped to ours (Cohere, Voyage, Jina's ``task``, Nomic).
INPUT_TYPE_ALIASES: dict[str, str] = {
    "query": "query",
    "search_query": "query",
    "retrieval.query": "query",
    "document": "document",
    "search_document": "document",
    "passage": "document",
    "retrieval.passage": "document",
    "code.query": "query",
    "code.passage": "document",
    "classification": "classification",
    "clustering": "clustering",
    "separation": "clustering",
    "similarity": "similarity",
    "text-matching": "similarity",
}


@dataclass(frozen=True)
class Family:
    name: str
    pattern: re.Pattern[str]
    prefixes: dict[str, str] = field(default_factory=dict)

    def prefix_for(self, input_type: str | None) -> str:
        return self.prefixes.get(input_type, "") if input_type else ""

    @cached_property
    def known_prefixes(self) -> tuple[str, ...]:
        """Non-empty prefixes, longest first (so '検索クエリ: ' is tried before a shorter one)."""
        return tuple(sorted({p for p in self.prefixes.values() if p}, key=len, reverse=True))


_RURI_V1 = {
    "query": "クエリ: ",
    "document": "文章: ",
    # ruri (v1/v2) uses the query prefix for symmetric and non-retrieval tasks.
    "classification": "クエリ: ",
    "clustering": "クエリ: ",
    "similarity": "クエリ: ",
}
_RURI_V3 = {
    "query": "検索クエリ: ",
    "document": "検索文書: ",
    "classification": "トピック: ",
    "clustering": "トピック: ",
    "similarity": "",
}

FAMILIES: tuple[Family, ...] = (
    Family("ruri-v3", re.compile(r"(^|/)ruri-v3-(?!reranker)", re.IGNORECASE), _RURI_V3),
    Family("ruri", re.compile(r"(^|/)ruri-(large|base|small)(-v2)?$", re.IGNORECASE), _RURI_V1),
)
PLAIN = Family("plain", re.compile(""), {})


def family_for(model_name: str) -> Family:
    for family in FAMILIES:
        if family.pattern.search(model_name):
            return family
    return PLAIN


def with_overrides(family: Family, query_prefix: str | None, document_prefix: str | None) -> Family:
    """The family with QUERY_PREFIX / DOCUMENT_PREFIX settings applied (one of blanks
    only is no prefix: kept as it was, it had matched every text as already prefixed,
    and every input type lost its prefix)."""
    prefixes = dict(family.prefixes)
    if query_prefix is not None:
        prefixes["query"] = query_prefix if query_prefix.strip() else ""
    if document_prefix is not None:
        prefixes["document"] = document_prefix if document_prefix.strip() else ""
    return Family(family.name, family.pattern, prefixes)


def apply_prefix(family: Family, text: str, input_type: str | None) -> str:
    """Prefix ``text`` for ``input_type``, never twice.

    A text that already starts with one of the family's prefixes (Dify adds
    them when its prefix fields are set, joining with a space) keeps that
    prefix, written in its canonical form, and gets no second one.
    """
    for prefix in family.known_prefixes:
        bare = prefix.rstrip()
        if text.startswith(bare):
            return prefix + text[len(bare) :].lstrip(" \u3000")
    return family.prefix_for(input_type) + text
