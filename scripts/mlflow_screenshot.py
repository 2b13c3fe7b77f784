#!/usr/bin/env python
"""Screenshot of MLflow's compare view of the last runs, for the README (docs/img/mlflow_compare.png).

Starts ``mlflow server`` on a store (default ``results/mlflow.db``) on 127.0.0.1, opens
``/#/compare-runs?runs=[...]&experiments=[...]`` of the newest ``--runs`` top-level runs (a job's
run, not its nested stage runs) of ``--experiment`` in headless Chromium (Debian's ``chromium``:
``apt-get install chromium``) and writes the PNG; the server is stopped afterwards.

``--demo`` first makes the runs to show: the tiny preset twice into a temporary store, with
``distill.layer_weighting=fisher`` and ``uniform`` (about a minute each on 2 cores)::

    .venv/bin/python scripts/mlflow_screenshot.py --demo
    .venv/bin/python scripts/mlflow_screenshot.py --store results/mlflow.db --runs 3 --out /tmp/compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium on PATH: install it (Debian: apt-get install chromium)")


def make_demo_runs(folder: Path, experiment: str) -> Path:
    """The tiny pipeline twice (Fisher vs uniform layer weights) into ``folder/mlflow.db``."""
    for weighting in ("fisher", "uniform"):
        cmd = [
            str(BIN / "layerwise-dist"),
            "pipeline",
            "--preset",
            "tiny",
            "--nproc",
            "1",
            f"output_dir={folder / weighting}",
            "tracking.enabled=true",
            f"tracking.experiment={experiment}",
            f"distill.layer_weighting={weighting}",
            f"tracking.run_name=tiny-{weighting}",
        ]
        print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"demo run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return folder / "mlflow.db"


def start_server(store: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store.resolve()}",
        "--default-artifact-root",
        (store.resolve().parent / "mlartifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"mlflow server did not answer in {limit:.0f} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def compare_url(url: str, experiment: str, count: int) -> tuple[str, list[str]]:
    """The compare view of the newest ``count`` top-level runs of ``experiment`` (nested stage runs left out)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in the store")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500)
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][:count]
    if len(top) < 2:
        raise SystemExit(f"experiment {experiment!r} has {len(top)} top-level run(s); the compare view needs 2")
    ids = [r.info.run_id for r in reversed(top)]  # oldest first, as the runs table lists them
    query = urllib.parse.urlencode(
        {"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id]), "workflowType": "machine_learning"},
        quote_via=urllib.parse.quote,
    )
    return f"{url}/#/compare-runs?{query}", [r.info.run_name for r in reversed(top)]


# The UI's own settings (its localStorage keys, ``<key>_v<version>``): the model-training view, and the
# assistant panel that opens by itself on a first visit left closed.
UI_SETTINGS = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.assistant.panelOpen_v1": False,
}


def _chromium(chromium: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def seed_ui_settings(chromium: str, profile: str, port: int) -> None:
    """Write ``UI_SETTINGS`` into the browser profile's localStorage for ``http://127.0.0.1:<port>``: a page
    served on that origin (before the MLflow server takes the port) sets them."""
    import http.server
    import threading

    script = "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});" for k, v in UI_SETTINGS.items()
    )
    page = f"<html><body><script>{script}document.body.textContent='seeded';</script></body></html>".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        done = _chromium(chromium, profile, "--virtual-time-budget=2000", "--dump-dom", f"http://127.0.0.1:{port}/")
    finally:
        server.shutdown()
        server.server_close()
    if "seeded" not in done.stdout:
        raise SystemExit(f"chromium could not set the UI settings ({done.returncode}):\n{done.stderr[-3000:]}")


def screenshot(chromium: str, profile: str, url: str, out: Path, window: str, budget_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _chromium(
        chromium,
        profile,
        f"--window-size={window}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={out.resolve()}",
        url,
    )
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=REPO / "results" / "mlflow.db", help="SQLite store")
    parser.add_argument("--experiment", default="layerwise_dist")
    parser.add_argument("--runs", type=int, default=2, help="how many of the newest top-level runs to compare")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "mlflow_compare.png")
    parser.add_argument("--window", default="1600,2250", help="browser window WIDTH,HEIGHT")
    parser.add_argument("--budget-ms", type=int, default=20000, help="Chromium's --virtual-time-budget")
    parser.add_argument("--demo", action="store_true", help="first run the tiny preset twice into a temporary store")
    parser.add_argument("--demo-dir", type=Path, help="with --demo: make (and keep) the runs and store here instead")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    with tempfile.TemporaryDirectory(prefix="mlflow-shot-") as tmp:
        store = make_demo_runs(args.demo_dir or Path(tmp), args.experiment) if args.demo else args.store
        if not store.is_file():
            raise SystemExit(f"no store at {store}")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        profile = str(Path(tmp) / "chromium-profile")
        seed_ui_settings(chromium, profile, port)
        proc = start_server(store, port, log_path)
        try:
            wait_healthy(url, proc, log_path)
            page, names = compare_url(url, args.experiment, args.runs)
            print(f"comparing {', '.join(names)}: {page}", flush=True)
            screenshot(chromium, profile, page, args.out, args.window, args.budget_ms)
        finally:
            stop(proc)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
