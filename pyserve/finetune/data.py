"""Training examples as token ids, written by the served model's own chat template and tokenizer,
so a model learns exactly the prompts it will be served.

A supervised line `{"messages": [...]}` learns every assistant turn (one with `"weight": 0` is
context only); a preference line (DPO) `{"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...]}` becomes the prompt and the two answers. Each answer is tokenized
apart from its prompt, as generation produces it after the prompt's tokens.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameter
from ..tokenizer import Tokenizer

IGNORED = -100  # the label of a token that is context, not learned (torch's cross-entropy ignore_index)


@dataclass
class SupervisedExample:
    input_ids: list[int]
    labels: list[int]  # the token to learn at each position, or IGNORED

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


Example = SupervisedExample | PreferenceExample


def read_examples(path: str | Path, tokenizer: Tokenizer, method: str, max_len: int,
                  field: str = "training_file") -> list[Example]:
    """Every example of a JSONL file for `method` (supervised or dpo); InvalidParameter naming
    `field` and the line when a line does not fit the method or the model's context."""
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        line_field = f"{field} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidParameter(field, f"line {number}: not valid JSON ({exc.msg})") from None
        if method == "dpo":
            if "input" not in record:
                raise InvalidParameter(field, f"line {number}: method dpo takes preference lines (\"input\", "
                                              f"\"preferred_output\", \"non_preferred_output\")")
            example = _preference(record, tokenizer, line_field)
        else:
            if "messages" not in record:
                raise InvalidParameter(field, f"line {number}: method supervised takes {{\"messages\": [...]}} lines")
            example = _supervised(record["messages"], tokenizer, line_field)
        longest = (len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
                   if isinstance(example, PreferenceExample) else len(example.input_ids))
        if longest > max_len:
            raise InvalidParameter(field, f"line {number}: {longest} tokens; the model takes at most {max_len}")
        examples.append(example)
    if not examples:
        raise InvalidParameter(field, "has no examples")
    return examples


def _supervised(messages: list[dict], tokenizer: Tokenizer, field: str) -> SupervisedExample:
    ids: list[int] = []
    labels: list[int] = []
    covered = ""  # the conversation's text that `ids` holds
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(_plain(messages[:i]), add_generation_prompt=True)
        after = tokenizer.apply_chat_template(_plain(messages[:i + 1]), add_generation_prompt=False)
        if not before.startswith(covered) or not after.startswith(before):
            raise InvalidParameter(field, "the model's chat template does not write this conversation turn by turn")
        context = tokenizer.encode(before[len(covered):], add_special_tokens=False)
        answer = tokenizer.encode(after[len(before):], add_special_tokens=False)
        ids += context + answer
        labels += [IGNORED] * len(context) + (answer if message.get("weight", 1) else [IGNORED] * len(answer))
        covered = after
    if all(label == IGNORED for label in labels):
        raise InvalidParameter(field, "has no assistant turn to learn")
    return SupervisedExample(ids, labels)


def _preference(record: dict, tokenizer: Tokenizer, field: str) -> PreferenceExample:
    messages = _plain(record["input"]["messages"])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def answer(key: str) -> list[int]:
        text = tokenizer.apply_chat_template(messages + _plain(record[key]), add_generation_prompt=False)
        if not text.startswith(prompt):
            raise InvalidParameter(field, "the model's chat template does not write the answer after the prompt")
        return tokenizer.encode(text[len(prompt):], add_special_tokens=False)

    return PreferenceExample(tokenizer.encode(prompt, add_special_tokens=False), answer("preferred_output"),
                             answer("non_preferred_output"))


def _plain(messages: list[dict]) -> list[dict]:
    """Messages as a chat template takes them: content parts joined into text."""
    plain = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        plain.append({**{k: v for k, v in m.items() if k != "weight"}, "content": content})
    return plain
