"""How vector-store search ranks: reciprocal rank fusion of the dense and keyword rankings, and
OpenAI's attribute filters (comparisons and compound and/or)."""

from ..errors import InvalidParameter

RRF_K = 60  # the usual constant: a document's share of each ranking is 1 / (RRF_K + its rank)
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")
MAX_FILTER_DEPTH = 8


def fuse(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Items by their summed reciprocal ranks, best first, scored so that an item first in every
    ranking scores 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    best = len(rankings) / (k + 1)
    return sorted(((item, score / best) for item, score in scores.items()), key=lambda pair: -pair[1])


def check_filter(node, depth: int = 0) -> None:
    """InvalidParameter ("filters") unless `node` is a comparison or a compound filter."""
    if depth > MAX_FILTER_DEPTH or not isinstance(node, dict):
        raise InvalidParameter("filters", f"must be a comparison or a compound filter, nested at most "
                                          f"{MAX_FILTER_DEPTH} deep")
    kind = node.get("type")
    if kind in ("and", "or"):
        if not isinstance(node.get("filters"), list) or not node["filters"]:
            raise InvalidParameter("filters", f"a compound '{kind}' filter needs a non-empty list of filters")
        for child in node["filters"]:
            check_filter(child, depth + 1)
        return
    if kind not in COMPARISONS:
        raise InvalidParameter("filters", f"type must be one of {', '.join(COMPARISONS)}, and or or")
    if not isinstance(node.get("key"), str):
        raise InvalidParameter("filters", "a comparison needs a string key")
    value = node.get("value")
    if kind in ("in", "nin") and not isinstance(value, list):
        raise InvalidParameter("filters", f"'{kind}' compares with a list of values")
    if kind not in ("in", "nin") and not isinstance(value, (str, int, float, bool)):
        raise InvalidParameter("filters", "a comparison's value must be a string, number or boolean")


def matches(attributes: dict, node: dict) -> bool:
    """Whether a file's attributes pass a (checked) filter; a missing key passes only ne and nin."""
    kind = node["type"]
    if kind == "and":
        return all(matches(attributes, child) for child in node["filters"])
    if kind == "or":
        return any(matches(attributes, child) for child in node["filters"])
    present, value, target = node["key"] in attributes, attributes.get(node["key"]), node["value"]
    if kind in ("ne", "nin"):
        return not present or (value != target if kind == "ne" else value not in target)
    if not present:
        return False
    if kind == "eq":
        return value == target
    if kind == "in":
        return value in target
    try:
        return {"gt": value > target, "gte": value >= target, "lt": value < target, "lte": value <= target}[kind]
    except TypeError:  # a string compared with a number
        return False
