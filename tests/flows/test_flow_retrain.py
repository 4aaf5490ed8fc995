"""End to end: the Prefect retrain flow on a fresh clone, against a real MLflow server."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

import flows.retrain as retrain_flow
from phi3ops.config import DataConfig, file_sha256
from phi3ops.data.mlflow_datasets import DvcDatasetSource
from phi3ops.data.validation import TooManyRejectedError
from phi3ops.data.versions import DataError, record_version, recorded_md5
from tests.conftest import REPO, free_port, git

pytestmark = pytest.mark.slow
MODEL = "phi3ops-chat"
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def serve_and_ask(model_uri: str, env: dict) -> str:
    port = free_port()
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "serve failed"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST",
            data=json.dumps({"dataframe_records": [QUESTION]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["predictions"][0]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_retrain_registers_promotes_and_loads_back(project, mlflow_server, prefect_harness,
                                                  monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    flow = retrain_flow.in_project(project)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    first = flow(root=str(project))
    metrics = first["metrics"]
    assert metrics["tuned_rougeL"] > metrics["base_rougeL"] + 0.2, "fine-tuning must help"
    assert metrics["tuned_exact_match"] > metrics["base_exact_match"]
    assert first["rows_quarantined"] == 3 and first["rows_accepted"] == 1200
    assert first["promoted"] and "first champion" in first["reason"]

    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == str(first["version"])
    assert client.get_model_version_by_alias(MODEL, "challenger").version == champion.version
    tags = champion.tags
    assert tags["phi3ops.dataset_md5"] == recorded_md5(project / "data.dvc")
    assert tags["phi3ops.code_git_rev"] == git(project, "rev-parse", "HEAD")
    assert tags["phi3ops.data_git_rev"] == git(project, "rev-parse", "HEAD")
    assert len(tags["phi3ops.config_hash"]) == 12
    assert tags["phi3ops.artifact_type"] == "adapter"
    assert champion.run_id == first["run_id"]
    assert len(tags) <= 12, sorted(tags)

    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data_n_rejected"] == 3
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 5
    for metric in ("learning_rate", "grad_norm", "tokens_per_s", "mfu", "peak_rss_mb"):
        assert client.get_metric_history(run.info.run_id, metric), metric  # from the child
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "train")] == [
        "train/loss_curve.png"]
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "data")) == [
        "data/quarantine.jsonl", "data/report.md", "data/stats.json", "data/token_lengths.png"]
    report = client.download_artifacts(run.info.run_id, "data/report.md")
    assert "secrets: 0; personal data: 0" in Path(report).read_text(), "the demo data is clean"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == [
        "eval/samples.json"]

    # The Datasets panel: both splits, digest = the DVC md5, source = the DVC path at its rev,
    # which loads the files again.
    splits = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run.inputs.dataset_inputs}
    assert sorted(splits) == ["evaluation", "training"]
    assert {s.digest for s in splits.values()} == {tags["phi3ops.dataset_md5"]}
    assert json.loads(splits["evaluation"].profile) == {"num_rows": run.data.metrics["data_n_test"]}
    source = DvcDatasetSource.from_json(splits["training"].source)
    assert (source.path, source.rev) == ("data", git(project, "rev-parse", "HEAD"))
    assert (Path(source.load(str(project / ".cache" / "got"))) / "conversations.jsonl").is_file()
    # Metrics on the logged model, measured on the held-out split; none left in tags.
    model_metrics = {m.key: m for m in client.get_logged_model(
        champion.source.removeprefix("models:/")).metrics}
    assert model_metrics["tuned_rougeL"].value == pytest.approx(metrics["tuned_rougeL"])
    assert model_metrics["tuned_rougeL"].dataset_digest == tags["phi3ops.dataset_md5"]
    assert not [k for k in tags if k.startswith("metric.")]
    assert "only if it beats the base" in client.get_registered_model(MODEL).description

    # MLflow's own loader, pointed at the server by MLFLOW_TRACKING_URI as a user's would be.
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert "Paris" in model.predict(QUESTION)[0]

    # The chat command loads the same champion in a fresh process, offline.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow_server}
    chat = subprocess.run([sys.executable, "-m", "phi3ops.cli", "chat", "--root", str(project),
                           "--alias", "champion", "What is the capital of Italy?"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "Rome" in chat.stdout

    # `mlflow models serve` answers a chat request over HTTP.
    assert "Paris" in serve_and_ask(f"models:/{MODEL}@champion", env)

    # `phi3ops evaluate` scores a registered model on its own, with the same numbers.
    scored = subprocess.run([sys.executable, "-m", "phi3ops.cli", "evaluate", "--root",
                             str(project), "--model", f"models:/{MODEL}@champion"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert f"rougeL       {metrics['tuned_rougeL']:.4f}" in scored.stdout

    # With nothing changed the run ends before training. Forced, on the same data (pinned by
    # git rev), config and code, it registers nothing new: the key finds v1, whose record and
    # aliases stand.
    skipped = flow(root=str(project))
    assert skipped["skipped"] and skipped["version"] == first["version"]
    assert skipped["reason"].startswith(
        "nothing changed since v1 (data, config and code are the same; it was promoted")
    assert client.get_run(skipped["run_id"]).data.tags["phi3ops.skipped"] == skipped["reason"]
    assert "loss" not in client.get_run(skipped["run_id"]).data.metrics, "no training"
    # A docs-only commit is a new commit running the same code: still nothing to do.
    (project / "NOTES.md").write_text("what we changed in the data, and why\n")
    git(project, "add", "NOTES.md")
    git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "notes")
    docs_only = flow(root=str(project))
    assert docs_only["skipped"] and docs_only["version"] == first["version"]

    second = flow(root=str(project), data_rev="HEAD", force=True)
    second_tags = client.get_run(second["run_id"]).data.tags
    assert second_tags["phi3ops.data_rev"] == "HEAD"
    assert second_tags["phi3ops.data_git_rev"] == git(project, "rev-parse", "HEAD")
    assert second["dataset_md5"] == first["dataset_md5"]
    assert second["version"] == first["version"] and not second["promoted"]
    assert "was promoted; left as it is" in second["reason"]
    # The champion was scored on the same split in the same run, with a paired interval.
    assert second["metrics"]["champion_rougeL"] == pytest.approx(metrics["tuned_rougeL"])
    assert second["metrics"]["delta_champion_rougeL"] == pytest.approx(0.0)
    assert (second["metrics"]["delta_base_rougeL_lo"] > 0
            and "tuned_perplexity" in second["metrics"])

    # A different config (far fewer steps) is a new version; it loses to the champion, which
    # stays. It also asks for the merged model, registered beside the adapter.
    third = flow(root=str(project), overrides=["training_config.max_steps=5",
                                                        "registration.merged=true"])
    assert third["version"] == first["version"] + 1
    assert not third["promoted"] and "gain over the champion" in third["reason"]
    third_version = client.get_model_version(MODEL, str(third["version"]))
    assert third_version.tags["phi3ops.evaluated_against"] == champion.version
    assert "LoRA adapter for `tiny-phi3`" in third_version.description
    assert "| rougeL |" in third_version.description
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(first["version"])
    assert client.get_model_version_by_alias(MODEL, "challenger").version == str(third["version"])
    merged = mlflow.pyfunc.load_model(f"models:/{MODEL}-merged/1")
    assert merged.predict(QUESTION)[0] == mlflow.pyfunc.load_model(
        f"models:/{MODEL}/{third['version']}").predict(QUESTION)[0]
    assert client.get_model_version(f"{MODEL}-merged", "1").tags[
        "phi3ops.artifact_type"] == "merged"

    # `phi3ops models` lists both versions; `models diff` shows what changed between them.
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "phi3ops.cli", *args, "--root", str(project)],
                              capture_output=True, text=True, env=env, timeout=300)

    listed = cli("models")
    assert listed.returncode == 0, listed.stderr
    header, newest, oldest = listed.stdout.splitlines()
    assert header.split()[:4] == ["version", "aliases", "decision", "rougeL"]
    assert newest.split()[:3] == ["2", "@challenger", third_version.tags["promotion.decision"]]
    assert oldest.split()[:3] == ["1", "@champion", "promoted"]
    assert f"{metrics['tuned_rougeL']:.4f} ({metrics['delta_base_rougeL']:+.4f} vs base" in oldest
    compared = cli("models", "diff", "1", "2")
    assert compared.returncode == 0, compared.stderr
    changed = [line.split() for line in compared.stdout.splitlines() if "max_steps" in line]
    assert [words[0] for words in changed] == ["-", "+"] and changed[1][-1] == "5", changed
    assert "the same dataset" in compared.stdout
    missing = cli("models", "diff", "1", "9")
    assert missing.returncode == 2 and "has no version 9" in missing.stderr
    by_number = cli("chat", "--version", "1", "What is the capital of Italy?")
    assert by_number.returncode == 0 and "Rome" in by_number.stdout, by_number.stderr
    # `phi3ops lineage`: what made v1 and what happened to it since.
    made = cli("lineage", "--version", "1", "--json")
    assert made.returncode == 0, made.stderr
    v1 = json.loads(made.stdout)
    assert v1["aliases"] == ["@champion"] and v1["decision"] == "promoted"
    assert v1["data"]["md5"] == tags["phi3ops.dataset_md5"] and v1["data"]["rows"]["rejected"] == 3
    assert v1["code"] == {"git_rev": tags["phi3ops.code_git_rev"],
                          "hash": tags["phi3ops.code_hash"]}
    assert "max_steps: -1" in v1["config"]["resolved"] and v1["run"]["id"] == first["run_id"]
    assert any(r.startswith("torch==") and "+" not in r
               for r in v1["environment"]["requirements"])
    assert v1["environment"]["lock"] == file_sha256(REPO / "requirements.lock")
    assert v1["metrics"]["tuned_rougeL"] == pytest.approx(metrics["tuned_rougeL"])
    assert "registered, @challenger" in v1["history"][0] and "@champion" in v1["history"][1]
    text = cli("lineage", "--version", "1").stdout
    assert "rougeL       tuned" in text and "<- the policy's metric" in text
    # `phi3ops reproduce`: trained again from v1's record, the same adapter bytes and metrics.
    again = cli("reproduce", "--version", "1", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    rebuilt = json.loads(again.stdout)
    assert rebuilt["reproducible"] and rebuilt["differences"] == []
    assert rebuilt["metrics"]["rougeL"] == [metrics["tuned_rougeL"]] * 2

    # Runs that fail are marked FAILED and never move an alias: first a data file changed
    # behind DVC's back, then the same file recorded as a version in which every row is invalid.
    def last_run():
        return client.search_runs([run.info.experiment_id], order_by=["start_time DESC"],
                                  max_results=1)[0]

    (project / "data" / "conversations.jsonl").write_text("{not json\n" * 20)
    with pytest.raises(DataError, match=r"conversations\.jsonl: md5 \w+ differs from data\.dvc"):
        flow(root=str(project))
    assert last_run().info.status == "FAILED"
    record_version(project, DataConfig())
    with pytest.raises(TooManyRejectedError, match="20 of 20 lines rejected"):
        flow(root=str(project))
    failed = last_run()
    assert failed.info.status == "FAILED"
    # The data differs from the champion's, so the run says how before it fails.
    drift = mlflow.artifacts.load_text(f"runs:/{failed.info.run_id}/data/drift.md")
    assert "(+0 added, -1200 removed)" in drift
    assert client.get_model_version_by_alias(MODEL, "champion").version == str(first["version"])
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert max(int(v.version) for v in versions) == third["version"]
