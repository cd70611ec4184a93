"""The files API through the `openai` SDK: upload, list, retrieve, content and delete; fine-tune
files checked line by line (a bad line is a 400 naming its number, and nothing is kept)."""

import io
import json

import openai
import pytest

CHAT = {"messages": [{"role": "user", "content": "What is pyserve?"},
                     {"role": "assistant", "content": "An inference server."}]}
DPO = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
       "preferred_output": [{"role": "assistant", "content": "Hello!"}],
       "non_preferred_output": [{"role": "assistant", "content": "What?"}]}


@pytest.fixture
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def jsonl(*lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def test_a_file_is_uploaded_listed_read_and_deleted(client):
    data = jsonl(CHAT, DPO, CHAT)
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert uploaded.filename == "train.jsonl" and uploaded.bytes == len(data) and uploaded.purpose == "fine-tune"
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]
    other = client.files.create(file=("notes.txt", io.BytesIO(b"not checked")), purpose="user_data")
    assert other.id not in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


@pytest.mark.parametrize("lines, message", [
    ((CHAT, "{not json"), "line 2: not valid JSON"),
    ((CHAT, {"messages": [{"role": "robot", "content": "x"}]}), "line 2: messages[0] has an unknown role"),
    (({"messages": [{"role": "user", "content": "x"}]},), "line 1: the last message must be the assistant's"),
    ((CHAT, CHAT, {**DPO, "preferred_output": [{"role": "user", "content": "x"}]}),
     "line 3: preferred_output must be a list of assistant messages"),
    (({"prompt": "x"},), 'line 1: a line needs "messages"'),
])
def test_a_bad_line_is_a_400_naming_it_and_nothing_is_kept(client, lines, message):
    before = [f.id for f in client.files.list()]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("bad.jsonl", io.BytesIO(jsonl(*lines))), purpose="fine-tune")
    assert message in caught.value.message and caught.value.body["param"] == "file"
    assert [f.id for f in client.files.list()] == before


def test_bad_uploads_name_the_field(client):
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", io.BytesIO(jsonl(CHAT))), purpose="wishes")
    with pytest.raises(openai.BadRequestError, match="UTF-8"):
        client.files.create(file=("a.jsonl", io.BytesIO(b"\xff\xfe")), purpose="fine-tune")
