"""The README's drop-in plugin, run as written: a TENSOR plugin in a folder outside the repository,
written from pyserve.plugin and pyserve.tasks alone, served by `pyserve serve` over KServe V2
(tritonclient) and msgpack, with both protocols' requests in /metrics under the same names."""

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_server

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(first_line: str) -> str:
    """The fenced code block of the README that starts with `first_line`."""
    for block in re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"the README has no code block starting {first_line!r}")


def requests_counted(url: str) -> dict[tuple[str, str], float]:
    """pyserve_requests_total by (task, status) for the model served as "tiny"."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    counts = {}
    for labels, value in re.findall(r"pyserve_requests_total\{([^}]*)\} (\S+)", text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields["model"] == "tiny":
            counts[fields["task"], fields["status"]] = float(value)
    return counts


@pytest.fixture(scope="module")
def scaler(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    code = readme_block("# my_plugins/scaler.py")
    assert set(re.findall(r"^from (\S+) import", code, flags=re.M)) == {"pyserve.plugin", "pyserve.tasks"}
    (root / "my_plugins").mkdir()
    (root / "my_plugins" / "scaler.py").write_text(code)
    shell = readme_block("mkdir -p my-scaler")
    config = json.loads(re.search(r"echo '(.*?)' > my-scaler/config.json", shell).group(1))
    (root / "my-scaler").mkdir()
    (root / "my-scaler" / "config.json").write_text(json.dumps(config))
    with cli_server(root / "my-scaler", "--plugin-dir", str(root / "my_plugins")) as (_, url, tcp_port):
        yield url, tcp_port, config


def test_the_readme_plugin_serves_kserve_and_msgpack_with_metrics(scaler):
    import tritonclient.http as triton

    from pyserve.client import Client, RemoteError
    from pyserve.protocol import tensor_from_wire
    url, tcp_port, config = scaler
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    want = config["a"] * x + config["b"]

    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        meta = client.get_model_metadata("tiny")
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("x", "FP32")]
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_allclose(client.infer("tiny", [tensor]).as_numpy("y"), want, rtol=1e-6)
        wrong = triton.InferInput("x", [3], "INT32")
        wrong.set_data_from_numpy(np.arange(3, dtype=np.int32))
        with pytest.raises(triton.InferenceServerException, match="x"):  # names the input
            client.infer("tiny", [wrong])
    finally:
        client.close()

    with Client("127.0.0.1", tcp_port) as c:
        np.testing.assert_allclose(tensor_from_wire(c.infer("tiny", {"x": x})["outputs"]["y"]), want, rtol=1e-6)
        with pytest.raises(RemoteError) as err:
            c.infer("tiny", {"z": x})
        assert err.value.code == 400 and "z" in err.value.message

    # the README's curl line, as a JSON body
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    request = urllib.request.Request(f"{url}/v2/models/tiny/infer", data=json.dumps(body).encode(), method="POST")
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert answer["outputs"][0]["data"] == [config["a"] * v + config["b"] for v in (1, 2, 3)]

    # one family of names and labels, whichever protocol carried the request
    assert requests_counted(url) == {("tensor", "finished"): 3.0}
    with Client("127.0.0.1", tcp_port) as c:
        c.infer("tiny", {"x": x})
    assert requests_counted(url) == {("tensor", "finished"): 4.0}
