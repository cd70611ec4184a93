"""Stored responses of the Responses API, for `previous_response_id`, GET and DELETE.

Each response keeps its own turn only (its input items and its output items) and the id of the
one before it; a conversation is rebuilt by walking back the chain, so a long chain costs
memory in proportion to its length, not its square. The store is in memory and bounded: past
`max_responses` the least recently used response goes (a chain that needs it then gets a 400
naming `previous_response_id`). Responses belong to the tenant of the key that made them: to
another key they do not exist.
"""

from collections import OrderedDict
from dataclasses import dataclass

from ..errors import InvalidParameter, NotFound

MAX_RESPONSES = 10_000
MAX_CHAIN = 1_000  # turns rebuilt for one request


@dataclass
class StoredResponse:
    response: dict  # the Response object as returned
    input_items: list[dict]  # this turn's input, as items with ids
    tenant: str | None

    @property
    def previous_id(self) -> str | None:
        return self.response.get("previous_response_id")


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES):
        self.max_responses = max_responses
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self._responses[stored.response["id"]] = stored
        self._responses.move_to_end(stored.response["id"])
        while len(self._responses) > self.max_responses:
            self._responses.popitem(last=False)

    def get(self, response_id: str, tenant: str | None) -> StoredResponse:
        stored = self._responses.get(response_id)
        if stored is None or stored.tenant != tenant:
            raise NotFound(f"no stored response has id {response_id!r}", "response_id")
        self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, tenant: str | None) -> None:
        self.get(response_id, tenant)
        del self._responses[response_id]

    def conversation(self, response_id: str, tenant: str | None) -> list[dict]:
        """Every item of the chain that ends with this response, oldest first: each turn's input
        items, then its output items."""
        turns: list[list[dict]] = []
        at: str | None = response_id
        while at is not None:
            if len(turns) == MAX_CHAIN:
                raise InvalidParameter("previous_response_id", f"the chain is longer than {MAX_CHAIN} responses")
            try:
                stored = self.get(at, tenant)
            except NotFound:
                raise InvalidParameter("previous_response_id", f"no stored response has id {at!r} (it was never "
                                       "stored, was deleted, or is no longer kept)") from None
            turns.append(stored.input_items + stored.response["output"])
            at = stored.previous_id
        return [item for turn in reversed(turns) for item in turn]
