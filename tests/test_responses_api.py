"""OpenAI's Responses API, called with the `openai` SDK itself against the demo chat model: plain,
streamed (raw events and the SDK's stream helper), with tools, structured output, chained by
`previous_response_id`, retrieved and deleted. Replies are checked against the offline engine
given the same conversation as chat messages."""

import json

import openai
import pytest

from pyserve import SamplingParams
from pyserve.demo import demo_model_dirs

from conftest import serving

QUESTION = "Tell me about json.dumps."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def demo():
    with serving(demo_model_dirs()["pydoc-chat"]) as (server, llm):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield client, llm


def offline(llm, messages: list[dict], max_tokens: int):
    return llm.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0))[0]


def test_a_plain_response_is_the_chat_reply_with_usage(demo):
    client, llm = demo
    want = offline(llm, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}], 24)
    got = client.responses.create(model="tiny", input=QUESTION, instructions="Answer briefly.", max_output_tokens=24,
                                  temperature=0)
    assert got.output_text == want.outputs[0].text
    assert got.object == "response" and got.id.startswith("resp_") and got.model == "tiny"
    assert got.usage.input_tokens == len(want.prompt_token_ids)
    assert got.usage.output_tokens == len(want.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.input_tokens + got.usage.output_tokens
    if want.outputs[0].finish_reason == "length":
        assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    else:
        assert got.status == "completed" and got.incomplete_details is None


def test_cut_by_max_output_tokens_is_incomplete(demo):
    client, _ = demo
    got = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=3, temperature=0)
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    assert got.usage.output_tokens == 3 and got.output[0].status == "incomplete"


def test_streamed_events_follow_the_documented_sequence(demo):
    client, _ = demo
    plain = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=20, temperature=0)
    events = list(client.responses.create(model="tiny", input=QUESTION, max_output_tokens=20, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{plain.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == plain.output_text
    assert events[2].item.id == final.output[0].id
    # the SDK's own accumulating helper takes the events (its final response needs response.completed)
    with client.responses.stream(model="tiny", input=QUESTION, max_output_tokens=20, temperature=0) as stream:
        last = list(stream)[-1]
        assert last.type == f"response.{plain.status}" and last.response.output_text == plain.output_text
        if plain.status == "completed":
            assert stream.get_final_response().output_text == plain.output_text


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_tool_calls_come_as_function_call_items_and_their_output_continues_the_chain(demo, choice):
    client, llm = demo
    got = client.responses.create(model="tiny", input="What is the weather in Paris?", tools=[WEATHER],
                                  tool_choice=choice, parallel_tool_calls=False, max_output_tokens=64, temperature=0)
    calls = [item for item in got.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    assert got.status == "completed"
    follow = client.responses.create(model="tiny", previous_response_id=got.id, max_output_tokens=12, temperature=0,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "sunny, 21 C"}])
    assert follow.previous_response_id == got.id and follow.output[0].type == "message"


def test_streamed_tool_calls_arrive_as_complete_items(demo):
    client, _ = demo
    events = list(client.responses.create(model="tiny", input="Weather in Oslo?", tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=64,
                                          temperature=0, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    args = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done and [d.arguments for d in done] == args
    assert [i.id for i in events[-1].response.output if i.type == "function_call"] == [d.id for d in done]


def test_previous_response_id_continues_the_conversation(demo):
    client, llm = demo
    first = client.responses.create(model="tiny", input="What does json.loads do?", max_output_tokens=12,
                                    temperature=0)
    second = client.responses.create(model="tiny", input="And json.dumps?", previous_response_id=first.id,
                                     max_output_tokens=12, temperature=0)
    want = offline(llm, [{"role": "user", "content": "What does json.loads do?"},
                         {"role": "assistant", "content": first.output_text},
                         {"role": "user", "content": "And json.dumps?"}], 12)
    assert second.output_text == want.outputs[0].text
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = client.responses.input_items.list(second.id).data
    assert [i.content[0].text for i in items] == ["And json.dumps?"]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="tiny", input="Hi", previous_response_id=first.id)


def test_json_schema_text_format_is_followed(demo):
    client, _ = demo
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "year": {"type": "integer", "maximum": 2100}},
              "required": ["name", "year"]}
    got = client.responses.create(model="tiny", input="A Python release as JSON.", max_output_tokens=60,
                                  temperature=0, text={"format": {"type": "json_schema", "name": "release",
                                                                  "schema": schema, "strict": True}})
    value = json.loads(got.output_text)
    assert set(value) == {"name", "year"} and isinstance(value["year"], int)


@pytest.mark.parametrize("fields, param", [
    ({"input": [{"type": "web_search_call"}]}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"previous_response_id": "resp_nothing"}, "previous_response_id"),
    ({"metadata": {"k": 5}}, "metadata"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_fields_are_400s_naming_them(demo, fields, param):
    client, _ = demo
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**{"model": "tiny", "input": "Hi", "max_output_tokens": 4, **fields})
    assert caught.value.body["param"] == param, caught.value.body
