"""A handler with the default handle and three steps that sleep, releasing the GIL, as real
preprocessing and inference on other cores or a GPU do. For the pipelining tests.

Model YAML ``handler: {preprocess_s, inference_s}`` sets the steps' sleeps (default 0). A body
``sleep:<s>`` makes its batch's inference sleep that much longer, after touching
``$TMPDIR/running-sleep:<s>``; a body ``reject`` is rejected in preprocess (422). Inference
appends each body it runs to ``$TMPDIR/ran.log``. Each answer says
which request id its batch's context gave in preprocess and again in postprocess.
"""

import os
import tempfile
import time

from ts.torch_handler.base_handler import BaseHandler


class StageHandler(BaseHandler):
    stages_thread_safe = True

    def initialize(self, context):
        self.context = context
        section = context.model_yaml_config.get("handler") or {}
        self.preprocess_s = float(section.get("preprocess_s", 0))
        self.inference_s = float(section.get("inference_s", 0))
        self.initialized = True

    def preprocess(self, data):
        time.sleep(self.preprocess_s)
        rows = []
        for idx, row in enumerate(data):
            body = bytes(row.get("body") or b"").decode()
            if body == "reject":
                self.reject_request(idx, "rejected in preprocess", 422)
                continue
            rows.append((idx, body, self.context.get_request_id(idx)))
        return rows

    def inference(self, rows):
        time.sleep(self.inference_s)
        with open(os.path.join(tempfile.gettempdir(), "ran.log"), "a") as ran:
            ran.writelines(f"{body}\n" for _, body, _ in rows)
        for _, body, _ in rows:
            if body.startswith("sleep:"):
                open(os.path.join(tempfile.gettempdir(), f"running-{body}"), "w").close()
                time.sleep(float(body.partition(":")[2]))
        return rows

    def postprocess(self, rows):
        answers = []
        for idx, body, seen_in_preprocess in rows:
            self.context.set_response_header(idx, "x-body", body)
            answers.append({"body": body, "preprocess_id": seen_in_preprocess, "id": self.context.get_request_id(idx)})
        return answers
