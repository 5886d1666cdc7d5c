"""Worker placement: GPU round-robin, deviceIds, CPU thread budgets, and a torch-free frontend.

No GPU is needed: CUDA_VISIBLE_DEVICES is how the frontend counts GPUs, so these tests declare
two, and the handler only reports the gpu_id it was given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import InProcessServer, Server, make_mar


def placements(server: Server, model: str, workers: int) -> dict[int, dict]:
    """Ask until every worker of ``model`` has answered once; keyed by worker pid."""
    seen: dict[int, dict] = {}
    for _ in range(200):
        report = json.loads(server.predict(model).content)
        seen[report["pid"]] = report
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only {len(seen)} of {workers} workers answered")


def test_workers_round_robin_over_gpus(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path)
    server.env["CUDA_VISIBLE_DEVICES"] = "0,1"
    server.start()
    try:
        make_mar(server.store, "placed", "placement_handler.py")
        assert server.register("placed.mar", initial_workers=4).status_code == 200
        gpus = sorted(r["gpu_id"] for r in placements(server, "placed", 4).values())
        assert gpus == [0, 0, 1, 1]
        described = server.http.get(f"{server.management}/models/placed").json()[0]
        assert described["deviceType"] == "gpu"
        assert all(worker["gpu"] for worker in described["workers"])
    finally:
        server.stop()


def test_device_ids_and_cpu_device_type(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path, config="number_of_gpu=3\n")
    server.env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
    server.start()
    try:
        (tmp_path / "pinned.yaml").write_text("deviceIds: [2]\nminWorkers: 2\nmaxWorkers: 2\n")
        make_mar(server.store, "pinned", "placement_handler.py", config_file=str(tmp_path / "pinned.yaml"))
        assert server.register("pinned.mar").status_code == 200
        assert {r["gpu_id"] for r in placements(server, "pinned", 2).values()} == {2}
        (tmp_path / "cpu.yaml").write_text("deviceType: cpu\n")
        make_mar(server.store, "oncpu", "placement_handler.py", config_file=str(tmp_path / "cpu.yaml"))
        assert server.register("oncpu.mar").status_code == 200
        assert {r["gpu_id"] for r in placements(server, "oncpu", 1).values()} == {None}
    finally:
        server.stop()


def test_cpu_workers_share_the_cores(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
        server.env.pop(name, None)
    server.start()
    try:
        make_mar(server.store, "threads", "placement_handler.py")
        assert server.register("threads.mar", initial_workers=2).status_code == 200
        reports = placements(server, "threads", 2).values()
        assert {r["gpu_id"] for r in reports} == {None}
        expected = str(max(1, (os.cpu_count() or 1) // 2))
        assert {r["omp_threads"] for r in reports} == {expected}
        # Idle OpenMP threads sleep instead of spinning on the cores the frontend needs.
        assert {r["omp_wait_policy"] for r in reports} == {"PASSIVE"}
    finally:
        server.stop()


def test_a_users_openmp_settings_stand(tmp_path: Path) -> None:
    server = InProcessServer(tmp_path)
    server.env.update(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="3")
    server.start()
    try:
        make_mar(server.store, "spin", "placement_handler.py")
        assert server.register("spin.mar", initial_workers=2).status_code == 200
        reports = placements(server, "spin", 2).values()
        assert {(r["omp_wait_policy"], r["omp_threads"]) for r in reports} == {("ACTIVE", "3")}
    finally:
        server.stop()


def test_frontend_never_loads_torch(tmp_path: Path) -> None:
    # A serve process: the memory map checked must be the frontend's alone, not the test process's.
    server = Server(tmp_path).start()
    try:
        digits = Path(__file__).resolve().parents[2] / "examples" / "digits"
        make_mar(
            server.store, "digits", str(digits / "digits_handler.py"),
            model_file=str(digits / "model.py"), serialized_file=str(digits / "digits.pt"),
        )  # fmt: skip
        assert server.register("digits.mar").status_code == 200
        png = (digits / "samples" / "digit_4.png").read_bytes()
        assert next(iter(server.predict("digits", png).json())) == "4"
        assert server.process is not None
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        assert "libtorch" not in maps
        worker_maps = Path(f"/proc/{server.worker_pids()[0]}/maps").read_text()
        assert "libtorch" in worker_maps
    finally:
        server.stop()
