"""Answers JSON that names the model version (from the manifest) that served each request, so
rollout tests can tell versions apart. A body of ``same`` gets the same answer from every version
(shadow comparisons that match); ``sleep:S`` sleeps S seconds first, and model YAML
``rollout: {sleep_s: S}`` makes every answer of the version that long."""

import time


def handle(data, context):
    if data is None:
        return None
    version = context.manifest["model"]["modelVersion"]
    time.sleep(float((context.model_yaml_config.get("rollout") or {}).get("sleep_s", 0)))
    answers = []
    for row in data:
        body = (row.get("body") or row.get("data") or b"") if isinstance(row, dict) else row
        text = body.decode(errors="replace") if isinstance(body, bytes | bytearray) else str(body)
        if text.startswith("sleep:"):
            time.sleep(float(text.partition(":")[2]))
        answers.append({"same": True} if text == "same" else {"version": version})
    return answers
