"""Reports the worker process it runs in: for the tests of the worker template and lazy imports."""

import json
import os
import sys

import torch
from ts.torch_handler.base_handler import BaseHandler


class EnvReporter(BaseHandler):
    def initialize(self, context):
        print(f"env reporter loaded in pid {os.getpid()}", flush=True)  # the worker's output, for the server log
        self.initialized = True

    def preprocess(self, data):
        return data

    def inference(self, data, *args, **kwargs):
        return data

    def postprocess(self, data):
        return [
            json.dumps({
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "cwd": os.getcwd(),
                "threads": torch.get_num_threads(),
                "omp": os.environ.get("OMP_NUM_THREADS"),
                "marker": os.environ.get("ENV_HANDLER_MARKER"),
                "loaded": sorted(m for m in ("torchvision", "PIL", "handlers.images") if m in sys.modules),
            })
            for _ in data
        ]
