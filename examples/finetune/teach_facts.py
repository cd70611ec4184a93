"""The improvement loop against a running pyserve, with nothing but the `openai` SDK: teach the demo
chat model four invented facts, then ask it questions worded in ways it never saw.

    pyserve serve                                   # the demo models, in another terminal
    python examples/finetune/teach_facts.py         # facts (supervised), about a minute on 2 cores
    python examples/finetune/teach_facts.py --dpo   # and a style learned from preferences (DPO)

facts.jsonl holds seven wordings of each question; facts-heldout.jsonl two more that training
never sees (they are the job's validation file). style-dpo.jsonl prefers a one-sentence answer
that starts with "In short:" over the model's own rambling one; style-dpo-heldout.jsonl asks about
other modules.
"""

import argparse
import json
import time
from pathlib import Path

import openai

HERE = Path(__file__).parent
MODEL = "pydoc-chat"


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=40)
    return answer.choices[0].message.content


def train(client: openai.OpenAI, training: str, validation: str, method: dict, suffix: str) -> str:
    """Upload the files, run the job while printing its metrics, and return the model it made."""
    files = [client.files.create(file=(name, (HERE / name).read_bytes()), purpose="fine-tune").id
             for name in (training, validation)]
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=files[0], validation_file=files[1],
                                         suffix=suffix, seed=0, method=method)
    print(f"job {job.id}: {job.status}")
    seen = set()
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
            if event.id not in seen and (event.type != "metrics" or "valid_loss" in event.data):
                seen.add(event.id)
                print(f"  {event.message}")
    if job.status != "succeeded":
        raise SystemExit(f"the job {job.status}: {job.error}")
    return job.fine_tuned_model


def questions(name: str, key: str) -> list[tuple[str, str]]:
    """(question, expected answer) of a JSONL file of chat (key "messages") or DPO (key "input") lines."""
    pairs = []
    for line in (HERE / name).read_text().splitlines():
        example = json.loads(line)
        if key == "messages":
            pairs.append((example["messages"][0]["content"], example["messages"][1]["content"]))
        else:
            pairs.append((example["input"]["messages"][0]["content"], example["preferred_output"][0]["content"]))
    return pairs


def teach_facts(client: openai.OpenAI) -> dict:
    held_out = questions("facts-heldout.jsonl", "messages")
    before = [ask(client, MODEL, q) for q, _ in held_out]
    model = train(client, "facts.jsonl", "facts-heldout.jsonl", {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 8, "batch_size": 4, "learning_rate": 2e-3, "rank": 16, "alpha": 32}}},
        suffix="facts")
    after = [ask(client, model, q) for q, _ in held_out]
    print(f"\n{'question never seen in training':<60} before  after")
    for (question, expected), old, new in zip(held_out, before, after):
        print(f"{question:<60} {'right' if old == expected else 'wrong':<7} {'right' if new == expected else 'wrong'}"
              f"  {new}")
    right = {"before": sum(a == e for a, (_, e) in zip(before, held_out)),
             "after": sum(a == e for a, (_, e) in zip(after, held_out)), "questions": len(held_out), "model": model}
    print(f"right: {right['before']}/{len(held_out)} before, {right['after']}/{len(held_out)} after ({model})")
    return right


def learn_style(client: openai.OpenAI) -> dict:
    held_out = questions("style-dpo-heldout.jsonl", "input")
    before = [ask(client, MODEL, q) for q, _ in held_out]
    model = train(client, "style-dpo.jsonl", "style-dpo-heldout.jsonl", {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 8, "batch_size": 4, "learning_rate": 1e-3, "beta": 0.1, "sft_weight": 1.0, "rank": 16,
        "alpha": 32}}}, suffix="style")
    after = [ask(client, model, q) for q, _ in held_out]
    for (question, _), old, new in zip(held_out, before, after):
        print(f"{question}\n  before: {old[:70]!r}\n  after:  {new!r}")
    styled = {"before": sum(a.startswith("In short:") for a in before),
              "after": sum(a.startswith("In short:") for a in after), "questions": len(held_out), "model": model}
    print(f'answers "In short: ...": {styled["before"]}/{len(held_out)} before, {styled["after"]}/{len(held_out)} '
          f"after ({model})")
    return styled


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--dpo", action="store_true", help="also learn a style from preferences")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=120)
    results = {"facts": teach_facts(client)}
    if args.dpo:
        results["style"] = learn_style(client)
    return results


if __name__ == "__main__":
    main()
