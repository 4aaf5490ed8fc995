"""What `phi3ops run` prints at the end, and how it finds a local Prefect server."""

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from phi3ops.cli.main import use_local_prefect_server
from phi3ops.config import MlflowConfig
from phi3ops.report import aliases_note, brief

RESULT = {
    "run_id": "abc123", "version": 3, "promoted": True, "dataset_md5": "9a5d08c4.dir",
    "reason": "rougeL +0.0200 over the champion (champion v2)", "rows_accepted": 240,
    "rows_quarantined": 2,
    "metrics": {"tuned_rougeL": 0.61234, "delta_base_rougeL": 0.34, "delta_base_rougeL_lo": 0.3,
                "delta_base_rougeL_hi": 0.38, "delta_champion_rougeL": 0.02,
                "delta_champion_rougeL_lo": -0.01, "delta_champion_rougeL_hi": 0.05},
}


def test_the_summary_is_short_and_says_where_to_look():
    text = brief(RESULT, MlflowConfig(), "7")
    assert text.splitlines() == [
        "phi3ops-chat v3: promoted (rougeL +0.0200 over the champion (champion v2))",
        "  rougeL: 0.6123, +0.3400 vs base (95% CI +0.3000..+0.3800), +0.0200 vs champion "
        "(95% CI -0.0100..+0.0500)",
        "  data: 9a5d08c4.dir (240 rows, 2 quarantined)",
        "  MLflow run: http://127.0.0.1:5000/#/experiments/7/runs/abc123 (after `make ui`)",
    ]
    served = brief(RESULT, MlflowConfig(tracking_uri="http://mlflow.internal:5000"), "7")
    assert "MLflow run: http://mlflow.internal:5000/#/experiments/7/runs/abc123\n" in served + "\n"
    behind_auth = brief(RESULT, MlflowConfig(
        tracking_uri="https://ops:s3cret@mlflow.internal:5000"), "7")
    assert "MLflow run: https://mlflow.internal:5000/#/experiments/7/runs/abc123" in behind_auth
    assert "s3cret" not in behind_auth and "ops:" not in behind_auth
    skipped = brief({"run_id": "r", "skipped": True, "reason": "nothing changed since v1"},
                    MlflowConfig(), "7")
    assert skipped.splitlines()[0] == "phi3ops-chat: nothing changed since v1"


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


def test_a_running_local_prefect_server_is_used(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert use_local_prefect_server(port) == f"http://127.0.0.1:{port}"
        assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{port}/api"
    finally:
        server.shutdown()
    monkeypatch.delenv("PREFECT_API_URL")
    assert use_local_prefect_server(port) is None, "nothing answers: the temporary server"


def test_the_failure_report_says_where_the_aliases_are():
    before = {"champion": "1", "previous-champion": None, "challenger": "1"}
    assert aliases_note(None, None) == " No alias moved."
    assert "rolled back: the aliases are where they were" in aliases_note(before, dict(before))
    moved = aliases_note(before, {**before, "champion": "2"})
    assert "moved during the run" in moved and "phi3ops promote --rollback" in moved
    unread = aliases_note(before, ConnectionError("refused"))
    assert "Could not read the aliases back (ConnectionError)" in unread
