"""If-Match, read as RFC 9110 (§13.1.1) writes it.

``If-Match = "*" / #entity-tag`` and ``entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE``: an
ETag is sent in double quotes, as the ``ETag`` header gives it. What the workers are told:

- ``*``: any current version, i.e. the session must exist;
- one strong tag (``"s_...:3"``): that version, else 412;
- weak tags (``W/"..."``) are well formed but never match: If-Match compares strongly, and
  a session's ETags are strong. A header of weak tags only is passed on as it is, so that
  the step is a 412 once the session is found (a 404 if it is not);
- a list of several strong tags is refused (400): a session has one version at a time,
  so send the one you read;
- anything else (``3``, ``abc``, an empty value) is a 400 ``invalid-header`` that shows the
  quoted form, and nothing is looked up.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import WithJsonSchema

from service.errors import InvalidHeader

# etagc = %x21 / %x23-7E / obs-text: any visible character but the double quote (a comma
# too: the list is read tag by tag, never split on commas).
LIST_ITEM = re.compile(r'[ \t]*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')
# What the document declares (visible ASCII only: obs-text is accepted, not advertised).
PATTERN = r'^(\*|(W/)?"[!#-~]*")$'
LOC = ("header", "If-Match")


def parse_if_match(value: str | None) -> str | None:
    """The precondition to check: None (no header), ``*``, or one entity-tag as sent.

    Args:
        value: the If-Match header, if the request has one.

    Returns:
        None, ``"*"``, the one strong tag in the header, or, when it holds weak tags only,
        the header itself (which then matches no version).

    Raises:
        InvalidHeader: the header is not ``*`` or a list of quoted entity-tags, or it lists
            several strong tags.
    """
    if value is None:
        return None
    text = value  # the server has taken the whitespace around it off already (RFC 9110 §5.5)
    if text == "*":
        return "*"
    items = _entity_tags(text)
    if not items:
        raise InvalidHeader(_unquoted(text), loc=LOC)
    strong = [item for item in items if not item.startswith("W/")]
    if len(strong) > 1:
        raise InvalidHeader(
            "If-Match lists several ETags; a session has one version at a time, so send the "
            "one ETag you read",
            loc=LOC,
        )
    return strong[0] if strong else text


def _entity_tags(text: str) -> list[str]:
    """The entity-tags of a list, in order; none if any part of ``text`` is not one."""
    tags, at = [], 0
    while at < len(text):
        item = LIST_ITEM.match(text, at)
        if item is None:
            return []
        tags.append(item.group(1))
        at = item.end()
    return tags


def _unquoted(text: str) -> str:
    shown = text if len(text) <= 40 else text[:37] + "..."
    bare = shown.strip('"')
    return (
        f"If-Match takes an ETag in double quotes, exactly as the ETag header gave it: "
        f'If-Match: "{bare}" (not If-Match: {shown}), or * for any version'
    )


async def _if_match(
    value: Annotated[
        str | None,
        # A string or no header: never null, which a header cannot carry (a generator that
        # reads "null" as allowed sends the text null, and that is no ETag).
        WithJsonSchema({"type": "string", "pattern": PATTERN}),
        Header(
            alias="If-Match",
            description=(
                'the ETag you read, in its quotes ("s_...:3"): 412 if the session moved since; '
                "* for any version; a weak ETag (W/...) never matches"
            ),
        ),
    ] = None,
) -> str | None:
    return parse_if_match(value)


IfMatchDep = Annotated[str | None, Depends(_if_match)]


async def _refuse_if_match(request: Request) -> None:
    if "if-match" in request.headers:
        raise InvalidHeader(
            "If-Match does not apply to POST /v1/sessions/step: it names one session's version, "
            "and this request steps many; make a step conditional with POST "
            "/v1/sessions/{id}/step and its If-Match",
            loc=LOC,
        )


NoIfMatchDep = Annotated[None, Depends(_refuse_if_match)]
