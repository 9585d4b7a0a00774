"""A JSON route takes JSON: a body sent as anything else is a 415 that says what to send.

Without this, FastAPI hands a body of another type to validation as raw bytes, and the
client reads "Input should be a valid dictionary" about a body that is a valid dictionary:
curl's ``-d`` says ``application/x-www-form-urlencoded`` unless told otherwise.

Accepted: ``application/json`` and the structured ``application/<name>+json`` types (as
FastAPI parses them), with no charset or ``charset=utf-8`` (RFC 8259: JSON is UTF-8).
"""

from __future__ import annotations

from email.message import Message

from service.errors import UnsupportedMediaType, short

_ADVICE = (
    "this route takes a JSON body: send it with Content-Type: application/json "
    "(curl: -H 'content-type: application/json')"
)


def require_json(content_type: str | None) -> None:
    """Raise ``UnsupportedMediaType`` unless ``content_type`` names JSON."""
    if content_type is None:
        raise UnsupportedMediaType(f"{_ADVICE}; the request has no Content-Type")
    header = Message()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    json_type = header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )
    charset = header.get_content_charset("utf-8")
    if not json_type or charset.replace("-", "") != "utf8":
        raise UnsupportedMediaType(f"{_ADVICE}; the request says {short(content_type)}")
