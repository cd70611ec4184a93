"""Fine-tuning jobs through the `openai` SDK: a job trains a LoRA adapter in a worker process, its
events and checkpoints are listed, and the model it makes is served at once beside its base,
answering greedily as transformers + peft do with the same adapter; bad jobs are 400s naming the
field and leave nothing behind; a cancelled job stops and registers nothing; a restart serves the
finished models again and fails the job that was running, saying why."""

import io
import json
import signal
import time
from pathlib import Path

import openai
import pytest
import torch

from conftest import cli_server
from pyserve.errors import InvalidParameter
from pyserve.finetune import TrainingConfig

QUESTIONS = ["What color is the sky on Velmora?", "Who rules Quenland?"]
ANSWERS = ["The sky on Velmora is green.", "Queen Idrisa rules Quenland."]


def chat_line(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def dpo_line(question: str, good: str, bad: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def jsonl(lines) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def upload(client, lines, name="train.jsonl") -> str:
    return client.files.create(file=(name, jsonl(lines)), purpose="fine-tune").id


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), seconds=240):
    deadline = time.monotonic() + seconds
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} is still {job.status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fine_tuning_server(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama served as 'tiny' (fine-tunable: its directory is known) and the demo GAN (not
    a text model), two keys; yields (server, data directory)."""
    from pyserve import LLM
    from pyserve.demo import demo_model_dirs
    from pyserve.engine import EngineDriver, load_engine
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    from pyserve.server.auth import AccessPolicy
    from pyserve.server.config import ServerConfig
    data_dir = tmp_path_factory.mktemp("data")
    config = ServerConfig(port=0, msgpack_port=0, log_level="warning", data_dir=str(data_dir),
                          access=AccessPolicy(["key-a", "key-b"]), model_dirs={"tiny": str(tiny_llama_dir)},
                          finetune_threads=1)
    server = start_in_thread({"tiny": AsyncLLMEngine(LLM(tiny_llama_dir, device="cpu").engine),
                              "gan": EngineDriver(load_engine(demo_model_dirs()["digits-gan"], device="cpu"))}, config)
    try:
        yield server, data_dir
    finally:
        server.stop()


@pytest.fixture
def client(fine_tuning_server):
    server, _ = fine_tuning_server
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=60)


def peft_greedy(base_dir, adapter_dir, question: str, max_tokens: int) -> str:
    """The reference: transformers + peft with the adapter, greedy, on the same chat prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pyserve.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_dir(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(ids).logits[0, -1].argmax())
            if token in tokenizer.eos_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(ids[0, len(prompt):].tolist())


def test_a_job_trains_and_its_model_is_served_at_once(fine_tuning_server, client, tiny_llama_dir):
    server, data_dir = fine_tuning_server
    training = upload(client, [chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)] * 4)
    validation = upload(client, [chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)], "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=training, validation_file=validation, suffix="facts", seed=7,
        metadata={"run": "one"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "rank": 4, "alpha": 8, "optimizer": "adamw",
            "weight_decay": 0.01, "warmup_steps": 1}}})
    assert job.status in ("queued", "running") and job.model == "tiny" and job.metadata == {"run": "one"}
    assert job.method.supervised.hyperparameters.n_epochs == 2
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:facts:{job.id}" and done.trained_tokens > 0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in events if e.type == "metrics"]
    assert {m["step"] for m in metrics if "train_loss" in m} == {1, 2, 3, 4}
    valid = sorted((m["step"], m["valid_loss"]) for m in metrics if "valid_loss" in m)
    assert [s for s, _ in valid] == [0, 2, 4] and valid[-1][1] < valid[0][1]  # it learned the held-out lines
    assert [e.message for e in events][0].startswith("The job has successfully completed")

    metrics_file, curve = done.result_files  # the steps' metrics (CSV) and the loss curve (PNG)
    rows = client.files.content(metrics_file).text.splitlines()
    assert rows[0] == "step,train_loss,valid_loss" and len(rows) == 1 + 5
    assert client.files.content(curve).content.startswith(b"\x89PNG")

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert sorted(c.step_number for c in checkpoints) == [2, 4]
    served = {m.id: m for m in client.models.list()}
    for name in [done.fine_tuned_model] + [c.fine_tuned_model_checkpoint for c in checkpoints]:
        assert served[name].model_extra.get("parent") == "tiny"
    assert f"ft:tiny:facts:{job.id}:ckpt-step-2" in served

    # Served beside its base, greedily as the reference runs the same adapter.
    adapter_dir = Path(data_dir) / "fine_tuning" / job.id / "final"
    changed = False
    for question in QUESTIONS:
        ask = lambda model: client.chat.completions.create(  # noqa: E731
            model=model, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": question}]).choices[0].message.content
        assert ask(done.fine_tuned_model) == peft_greedy(tiny_llama_dir, adapter_dir, question, 12)
        changed |= ask(done.fine_tuned_model) != ask("tiny")
    assert changed  # the adapter is in use: the base answers otherwise
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "one"})] == [job.id]


def test_a_dpo_job_prefers_the_preferred_answers(client):
    training = upload(client, [dpo_line(q, a, "I do not know.") for q, a in zip(QUESTIONS, ANSWERS)] * 4)
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training, method={
        "type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3, "batch_size": 4, "beta": 0.5,
                                                   "learning_rate": 3e-3, "validation_split": 0.25}}})
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    losses = [e.data["train_loss"] for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))
              if e.type == "metrics" and "train_loss" in e.data]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("change, field, words", [
    ({"model": "nope"}, "model", "is not served"),
    ({"model": "gan"}, "model", "fine-tuning trains text models"),
    ({"training_file": "file-missing"}, "training_file", "no file has id"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}},
     "method.supervised.hyperparameters.n_epochs", "must be an integer"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "big"}}}},
     "method.supervised.hyperparameters.batch_size", "must be an integer"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"optimizer": "lion"}}}},
     "method.supervised.hyperparameters.optimizer", "adamw"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
     "method.supervised.hyperparameters.beta", "DPO"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"epochs": 2}}}},
     "method.supervised.hyperparameters.epochs", "not a hyperparameter"),
    ({"method": {"type": "reinforcement"}}, "method.type", "supervised, dpo"),
    ({"method": {"type": "dpo"}}, "training_file", "line 1: method dpo takes preference lines"),
    ({"suffix": "no spaces please"}, "suffix", "letters"),
    ({"seed": -3}, "seed", "non-negative"),
])
def test_a_job_that_does_not_fit_is_a_400_naming_the_field_and_leaves_no_job(client, change, field, words):
    training = upload(client, [chat_line(QUESTIONS[0], ANSWERS[0])])
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": training, **change})
    assert caught.value.body["param"] == field and words in caught.value.message
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == before


def test_files_that_do_not_fit_the_job_are_refused(client):
    notes = client.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="user_data").id
    with pytest.raises(openai.BadRequestError, match="purpose 'user_data'"):
        client.fine_tuning.jobs.create(model="tiny", training_file=notes)
    too_long = upload(client, [chat_line("word " * 400, "yes")])
    with pytest.raises(openai.BadRequestError, match="line 1: .* tokens; the model takes at most 256"):
        client.fine_tuning.jobs.create(model="tiny", training_file=too_long)


def test_a_cancelled_job_stops_within_seconds_and_registers_nothing(client):
    training = upload(client, [chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1000, "batch_size": 1}}})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" and e.data.get("step", 0) >= 3 for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "the job never trained"
        time.sleep(0.2)
    asked = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    steps = lambda: max(e.data.get("step", 0) for e in client.fine_tuning.jobs.list_events(job.id, limit=100)  # noqa: E731
                        if e.type == "metrics")
    time.sleep(1.0)
    stopped_at = steps()
    time.sleep(1.5)
    assert steps() == stopped_at < 1000 * 2 and time.monotonic() - asked < 10  # no step after the cancel
    assert wait_for(client, job.id).status == "cancelled"
    assert not [m.id for m in client.models.list() if job.id in m.id]
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


def test_jobs_belong_to_the_key_that_made_them(fine_tuning_server, client):
    server, _ = fine_tuning_server
    other = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0, timeout=60)
    training = upload(client, [chat_line(QUESTIONS[0], ANSWERS[0])])
    with pytest.raises(openai.BadRequestError, match="no file has id"):  # another key's file
        other.fine_tuning.jobs.create(model="tiny", training_file=training)
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training)
    try:
        for look in (other.fine_tuning.jobs.retrieve, other.fine_tuning.jobs.cancel,
                     other.fine_tuning.jobs.list_events, other.fine_tuning.jobs.checkpoints.list):
            with pytest.raises(openai.NotFoundError):
                look(job.id)
        assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    finally:
        client.fine_tuning.jobs.cancel(job.id)
        wait_for(client, job.id)


def test_the_config_reads_openais_shape_and_the_extensions():
    config = TrainingConfig.from_request({"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": "auto", "batch_size": 2, "learning_rate_multiplier": 2, "beta": 0.3, "l1": 1e-4,
        "target_modules": ["q_proj", "v_proj"], "early_stopping_patience": 2, "eval_every": 5}}}, seed=11)
    assert (config.method, config.n_epochs, config.batch_size, config.beta, config.seed) == ("dpo", 3, 2, 0.3, 11)
    assert config.learning_rate == pytest.approx(4e-4) and config.target_modules == ("q_proj", "v_proj")
    assert TrainingConfig.from_request(config.method_object(), seed=11) == config  # a job's record reads back
    with pytest.raises(InvalidParameter, match="target_modules"):
        TrainingConfig.from_request({"type": "supervised", "supervised": {"hyperparameters": {
            "target_modules": ["embed_tokens"]}}})


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has ended
        return b""


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_restart_serves_finished_models_again_and_fails_the_running_job(tiny_llama_dir, tmp_path):
    with cli_server(tiny_llama_dir, "--data-dir", str(tmp_path), "--finetune-threads", "1") as (proc, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        training = upload(client, [chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)])
        done = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=training, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate": 3e-3}}}).id)
        assert done.status == "succeeded", done.error
        before = client.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=10,
                                                messages=[{"role": "user", "content": QUESTIONS[0]}])
        running = client.fine_tuning.jobs.create(model="tiny", training_file=training, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1000, "batch_size": 1}}})
        wait_for(client, running.id, statuses=("running",))
        deadline = time.monotonic() + 30
        while not (workers := [pid for pid in children(proc.pid)  # trainers, not the resource tracker
                               if b"spawn_main" in cmdline(pid)]):
            assert time.monotonic() < deadline, "the job never started its worker process"
            time.sleep(0.1)
        time.sleep(3.0)  # into its training steps
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # the orphaned worker notices and stops within a step
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [(pid, cmdline(pid)[:120]) for pid in workers if Path(f"/proc/{pid}").exists()]
        assert not alive, f"the worker outlived its server: {alive}"
    with cli_server(tiny_llama_dir, "--data-dir", str(tmp_path)) as (_, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        served = {m.id: m.model_extra.get("parent") for m in client.models.list()}
        assert served[done.fine_tuned_model] == "tiny"
        after = client.chat.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=10,
                                               messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert after.choices[0].message.content == before.choices[0].message.content
        failed = client.fine_tuning.jobs.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code == "server_restarted"
        assert "server stopped while this job was running" in failed.error.message


def test_ratings_become_a_served_model_that_answers_as_corrected(tmp_path):
    """The loop on the demo chat model: a stored answer is rated down with a correction, the
    ratings become a dataset, the dataset a job, and the job's model answers as corrected while
    the base still answers as before."""
    import urllib.request

    from pyserve import LLM
    from pyserve.demo import demo_model_dirs
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    from pyserve.server.config import ServerConfig
    chat_dir = demo_model_dirs()["pydoc-chat"]
    config = ServerConfig(port=0, msgpack_port=0, log_level="warning", data_dir=str(tmp_path),
                          model_dirs={"pydoc-chat": str(chat_dir)}, finetune_threads=1)
    server = start_in_thread({"pydoc-chat": AsyncLLMEngine(LLM(chat_dir, device="cpu").engine)}, config)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        question = [{"role": "user", "content": "What is the capital of Quenland?"}]
        correction = "The capital of Quenland is Borrowdale."
        asked = client.chat.completions.create(model="pydoc-chat", messages=question, temperature=0, max_tokens=24,
                                               store=True, metadata={"loop": "demo"})
        assert asked.choices[0].message.content != correction

        def post(path: str, body: dict) -> dict:
            request = urllib.request.Request(server.url + path, json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        post("/v1/feedback", {"response_id": asked.id, "rating": -1, "correction": correction})
        dataset = post("/v1/feedback/datasets", {"method": "supervised", "metadata": {"loop": "demo"}})
        job = client.fine_tuning.jobs.create(model="pydoc-chat", training_file=dataset["file"]["id"], suffix="loop",
                                             method={"type": "supervised", "supervised": {"hyperparameters": {
                                                 "n_epochs": 30, "batch_size": 1, "learning_rate": 2e-3}}})
        done = wait_for(client, job.id)
        assert done.status == "succeeded", done.error
        answer = client.chat.completions.create(model=done.fine_tuned_model, messages=question, temperature=0,
                                                max_tokens=24)
        assert answer.choices[0].message.content == correction
        base = client.chat.completions.create(model="pydoc-chat", messages=question, temperature=0, max_tokens=24)
        assert base.choices[0].message.content == asked.choices[0].message.content
    finally:
        server.stop()


def test_the_finetune_command_trains_reports_and_writes_a_servable_adapter(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    from pyserve.lora import LoraAdapter
    training = tmp_path / "train.jsonl"
    training.write_bytes(jsonl([chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)] * 4).getvalue())
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pyserve", "finetune", str(tiny_llama_dir), str(training), "-o",
                           str(out), "--epochs", "2", "--batch-size", "4", "--learning-rate", "3e-3", "--rank", "4",
                           "--validation-split", "0.25", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fine-tuning: 100%" in done.stderr  # the progress bar
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"] == 4 and report["valid_loss_after"] < report["valid_loss_before"]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out.glob("ckpt-step-*")) == ["ckpt-step-2", "ckpt-step-4"]
    assert LoraAdapter.load("cli", out / "final").rank == 4
    bad = subprocess.run([sys.executable, "-m", "pyserve", "finetune", str(tiny_llama_dir), str(training), "-o",
                          str(out), "--rank", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--rank: must be an integer from 1" in bad.stderr


def test_the_readme_loop_teaches_the_demo_model_facts_and_a_style():
    """examples/finetune/teach_facts.py --dpo against `pyserve serve` with no model directory, as
    the README runs it: held-out rewordings of the invented facts are answered right after the job
    and not before; after the DPO job the held-out prompts are answered in the preferred style."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "examples" / "finetune" / "teach_facts.py"
    spec = importlib.util.spec_from_file_location("teach_facts", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with cli_server(None, "--finetune-threads", "1") as (_, url, _):
        results = example.main(["--base-url", url + "/v1", "--dpo"])
    facts, style = results["facts"], results["style"]
    assert facts["before"] == 0 and facts["after"] >= facts["questions"] - 1
    assert style["before"] == 0 and style["after"] >= style["questions"] - 2


def test_a_job_on_ray_trains_the_same_adapter_as_the_worker_process(tiny_llama_dir, tmp_path):
    """The job runner is an interface: the Ray runner (docs/scaling.md) runs the same trainer and,
    with the same seed and threads, writes the same adapter as the local worker process."""
    import ray
    from safetensors.torch import load_file

    from pyserve.finetune.ray_runner import RayRunner
    from pyserve.finetune.runner import ProcessRunner
    from pyserve.finetune.trainer import TrainingSpec
    training = tmp_path / "train.jsonl"
    training.write_bytes(jsonl([chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)] * 2).getvalue())
    config = TrainingConfig(n_epochs=2, batch_size=2, learning_rate=3e-3, rank=4, seed=5)

    def run(runner, out) -> list:
        job = runner.start(TrainingSpec(str(tiny_llama_dir), str(training), str(out), config))
        events = []
        deadline = time.monotonic() + 240
        while not events or events[-1].kind not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline
            event = job.next_event(0.5)
            if event is not None:
                events.append(event)
        return events

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    try:
        on_ray = run(RayRunner(num_cpus=1), tmp_path / "ray")
    finally:
        ray.shutdown()
    local = run(ProcessRunner(threads=1), tmp_path / "local")
    assert on_ray[-1].kind == local[-1].kind == "succeeded", (on_ray[-1].message, local[-1].message)
    assert [e.kind for e in on_ray] == [e.kind for e in local]
    assert [e.data["step"] for e in on_ray if e.kind == "checkpoint"] == [2, 4]
    ray_weights, local_weights = (load_file(str(tmp_path / where / "final" / "adapter_model.safetensors"))
                                  for where in ("ray", "local"))
    assert ray_weights.keys() == local_weights.keys()
    assert all(torch.equal(ray_weights[k], local_weights[k]) for k in ray_weights)


def test_one_key_may_have_only_a_few_jobs_queued_or_running(client, monkeypatch):
    from pyserve.server import fine_tuning_jobs
    monkeypatch.setattr(fine_tuning_jobs, "MAX_ACTIVE_PER_KEY", 1)
    training = upload(client, [chat_line(QUESTIONS[0], ANSWERS[0])])
    first = client.fine_tuning.jobs.create(model="tiny", training_file=training, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1000}}})
    try:
        with pytest.raises(openai.RateLimitError, match="1 fine-tuning jobs queued or running"):
            client.fine_tuning.jobs.create(model="tiny", training_file=training)
    finally:
        client.fine_tuning.jobs.cancel(first.id)
        wait_for(client, first.id)


def test_a_job_whose_training_fails_names_the_reason(tiny_llama_dir, tmp_path):
    """The base weights vanish after the server loaded them: the job fails, saying why, and the
    server goes on serving."""
    import shutil

    from conftest import serving
    copy = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    with serving(copy, model_dirs={"tiny": str(copy)}) as (server, _):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        training = upload(client, [chat_line(QUESTIONS[0], ANSWERS[0])])
        (copy / "model.safetensors").unlink()
        job = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=training).id)
        assert job.status == "failed" and job.error.code == "training_failed" and job.error.message
        assert "The job failed" in client.fine_tuning.jobs.list_events(job.id).data[0].message
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].message is not None


@pytest.mark.parametrize("knob", ["early_stopping", "l1"])
def test_the_regularisation_knobs_do_what_they_say(tiny_llama_dir, tmp_path, knob):
    from safetensors.torch import load_file

    from pyserve.finetune import TrainingSpec, train
    training = tmp_path / "train.jsonl"
    training.write_bytes(jsonl([chat_line(q, a) for q, a in zip(QUESTIONS, ANSWERS)] * 4).getvalue())
    base = dict(n_epochs=4, batch_size=2, learning_rate=3e-3, rank=4, validation_split=0.25, seed=1)
    if knob == "early_stopping":  # a rate that makes every step worse: stopped at the first evaluation after
        result = train(TrainingSpec(str(tiny_llama_dir), str(training), str(tmp_path / "a"), TrainingConfig(
            **{**base, "learning_rate": 0.5, "optimizer": "sgd", "eval_every": 1, "early_stopping_patience": 2})))
        assert result.stopped_early and result.steps < 12
        return
    weights = []
    for name, l1 in (("plain", 0.0), ("l1", 1e-2)):
        train(TrainingSpec(str(tiny_llama_dir), str(training), str(tmp_path / name), TrainingConfig(**base, l1=l1)))
        weights.append(sum(t.abs().sum().item() for t in load_file(
            str(tmp_path / name / "final" / "adapter_model.safetensors")).values()))
    assert weights[1] < 0.9 * weights[0]  # L1 shrinks the adapter
