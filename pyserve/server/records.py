"""What the routes over stored records share (stored completions, responses, files, feedback):
the records' owner, query integers, OpenAI's list pages, and a record looked up by a path parameter
off the event loop."""

import asyncio
import re
from typing import Any, Callable

from starlette.requests import Request

from ..errors import InvalidParameter


def tenant_of(request: Request) -> str | None:
    """Whose records a request reads and writes: its key's (`Principal.owner`), so that one key
    never sees another's stored completions, responses, files or ratings."""
    principal = request.state.principal
    return principal.owner if principal is not None else None


def int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,6}", value):
        raise InvalidParameter(name, "must be a positive integer")
    return int(value)


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[key]=value` query parameters, as OpenAI's list routes filter by them."""
    return {m.group(1): value for key, value in request.query_params.multi_items()
            if (m := re.fullmatch(r"metadata\[(.+)\]", key))}


def page(items: list[dict], has_more: bool = False) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def page_after(request: Request, items: list[dict], default_limit: int = 20) -> dict:
    """A list page of record bodies already in order: those after the one whose id is the
    `after` query parameter, at most `limit` of them."""
    after = request.query_params.get("after")
    if after is not None:
        items = items[next((i + 1 for i, item in enumerate(items) if item["id"] == after), len(items)):]
    limit = int_param(request, "limit", default_limit)
    return page(items[:limit], len(items) > limit)


async def by_path(request: Request, lookup: Callable[[str, str | None], Any], param: str) -> Any:
    """lookup(the path parameter `param`, the caller's tenant), in a worker thread."""
    return await asyncio.to_thread(lookup, request.path_params[param], tenant_of(request))
