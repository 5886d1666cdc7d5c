"""Reports where its worker was placed: GPU id, torch thread budget and whether torch is loaded."""

import json
import os


def handle(data, context):
    if data is None:
        return None
    report = {
        "gpu_id": context.system_properties["gpu_id"],
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "pid": os.getpid(),
    }
    return [json.dumps(report) for _ in data]
