"""Who is asking. Every session belongs to the principal that made it.

Until API keys are configured the service is open and every caller is the same anonymous
principal ``""``; the ownership checks in the store are in place all the same.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

ANONYMOUS = ""


async def _principal() -> str:
    return ANONYMOUS


PrincipalDep = Annotated[str, Depends(_principal)]
