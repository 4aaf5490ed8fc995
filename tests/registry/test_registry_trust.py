"""Loading from the registry trusts only what phi3ops registered, against a real MLflow server
and the real tiny model: a version someone else added runs no code, files changed after
registration are refused, and a genuine version still loads and answers. `adapter` (an
untrained LoRA adapter on the tiny base) comes from conftest.py."""

import json
import uuid
from pathlib import Path

import mlflow
import pytest

from phi3ops.config import file_sha256, load_mlflow_config
from phi3ops.errors import RegistryError
from phi3ops.registry.client import Registry
from phi3ops.registry.store import (
    Candidate,
    Lineage,
    check_registered,
    load_champion,
    load_registered,
    register_adapter,
)
from phi3ops.registry.trusted_load import MANIFEST_TAG
from tests.cli.test_cli import phi3ops
from tests.cli.test_cli_errors import one_paragraph, own_model

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture
def root(tmp_path, mlflow_server, monkeypatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    own_model(tmp_path, f"trust-{uuid.uuid4().hex[:8]}")
    return tmp_path


def settings(root: Path) -> Registry:
    return Registry(load_mlflow_config(root / "mlflow.yaml").resolved(root))


def register_genuine(cfg: Registry, adapter, config_hash: str = "c1") -> tuple[str, str]:
    """(version, run id) registered the way the flow registers a trained adapter."""
    run_id = cfg.client.create_run(cfg.experiment_id).info.run_id
    lineage = Lineage(dataset_md5="abc.dir", data_git_rev="r1", config_hash=config_hash,
                      code_git_rev="r1", code_hash="h1", env_lock="l1", pipeline="tiny-cpu",
                      base_model="tiny-phi3")
    version = register_adapter(cfg, run_id, Candidate(lineage, {"tuned_rougeL": 0.5}, *adapter,
                                                      max_new_tokens=8, card="card"))
    return version.version, run_id


def register_evil(cfg: Registry, marker: Path, alias: str, tags: dict | None = None) -> str:
    """Someone else's cloudpickled PythonModel under phi3ops' model name: loading it through
    MLflow runs its code, which writes `marker`."""

    class Evil(mlflow.pyfunc.PythonModel):  # a local class: cloudpickle stores its code
        def load_context(self, context):
            marker.write_text("load_context ran")

        def predict(self, context, model_input, params=None):
            marker.write_text("predict ran")
            return ["pwned"]

    with cfg.as_process_default(), mlflow.start_run(experiment_id=cfg.experiment_id):
        info = mlflow.pyfunc.log_model(name="evil", python_model=Evil(),
                                       pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, cfg.model, tags=tags).version
    cfg.client.set_registered_model_alias(cfg.model, alias, version)
    marker.unlink(missing_ok=True)
    return version


FORGED = {"phi3ops.registration_key": "k", "phi3ops.artifact_type": "adapter",
          MANIFEST_TAG: "{}"}


def test_chat_never_runs_code_someone_else_registered(root, tmp_path):
    cfg, marker = settings(root), tmp_path / "marker"
    evil = register_evil(cfg, marker, "evil")
    result = phi3ops("chat", "--alias", "evil", "hi", "--root", str(root))
    error = one_paragraph(result)
    assert f"refusing {cfg.model} v{evil}: it lacks phi3ops' registration tags" in error
    assert "pwned" not in result.stdout and not marker.exists()

    # With phi3ops' tags forged, its MLmodel still gives it away.
    forged = register_evil(cfg, marker, "forged", FORGED)
    error = one_paragraph(phi3ops("chat", "--alias", "forged", "hi", "--root", str(root)))
    assert f"refusing {cfg.model} v{forged}" in error
    assert "not models-from-code" in error and "pickled python_model" in error
    assert not marker.exists()


def test_the_champion_loader_refuses_it_too(root, tmp_path):
    cfg, marker = settings(root), tmp_path / "marker"
    register_evil(cfg, marker, cfg.config.champion_alias, FORGED)
    with pytest.raises(RegistryError, match="pickled python_model"):
        load_champion(cfg)
    assert not marker.exists()
    # What the flow did before: MLflow's loader runs the version's code.
    mlflow.pyfunc.load_model(f"models:/{cfg.model}@{cfg.config.champion_alias}")
    assert marker.read_text() == "load_context ran"


def test_a_genuine_version_loads_and_answers(root, adapter):
    cfg = settings(root)
    version, run_id = register_genuine(cfg, adapter)
    cfg.client.set_registered_model_alias(cfg.model, "champion", version)
    manifest = json.loads(cfg.client.get_model_version(
        cfg.model, version).tags[MANIFEST_TAG])
    adapter_dir, base_dir = adapter
    assert manifest["adapter/adapter_model.safetensors"] == file_sha256(
        adapter_dir / "adapter_model.safetensors")
    assert manifest["base_model/model.safetensors"] == file_sha256(base_dir / "model.safetensors")
    assert "chat_model_code.py" in manifest and "code/chat_runtime.py" in manifest

    champion_version, (model, tokenizer) = load_champion(cfg)
    assert champion_version == version and tokenizer.chat_template
    assert check_registered(cfg, f"runs:/{run_id}/adapter").version == version
    # One loading implementation: phi3ops' trusted load and MLflow's pyfunc answer alike.
    reply = load_registered(cfg, f"models:/{cfg.model}/{version}").answer(
        [QUESTION["messages"]])[0]
    deployed = mlflow.pyfunc.load_model(f"models:/{cfg.model}/{version}")
    assert deployed.predict(QUESTION)[0] == reply and reply

    chat = phi3ops("chat", "What is the capital of France?", "--root", str(root))
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == reply.strip()


def test_files_changed_after_registration_are_refused(root, adapter, tmp_path):
    cfg = settings(root)
    client = cfg.client
    version, _ = register_genuine(cfg, adapter)
    # A byte flipped in the artifact store, written back through MLflow's own API.
    model_id = client.get_model_version(cfg.model, version).source.removeprefix(
        "models:/")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes((adapter[0] / "adapter_model.safetensors").read_bytes())
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    client.log_model_artifact(model_id, str(weights), "artifacts/adapter")
    with pytest.raises(RegistryError, match=r"changed \['adapter/adapter_model\.safetensors'\]"):
        load_registered(cfg, f"models:/{cfg.model}/{version}")

    # Files as registered, but a hash tag that does not match them.
    other, _ = register_genuine(cfg, adapter, config_hash="c2")
    manifest = json.loads(client.get_model_version(cfg.model, other).tags[
        MANIFEST_TAG])
    manifest["base_model/model.safetensors"] = "0" * 64
    client.set_model_version_tag(cfg.model, other, MANIFEST_TAG, json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"changed \['base_model/model\.safetensors'\]"):
        load_registered(cfg, f"models:/{cfg.model}/{other}")


def test_a_version_registered_before_hashes_loads_once_trusted(root, adapter):
    cfg = settings(root)
    client = cfg.client
    version, _ = register_genuine(cfg, adapter)
    client.delete_model_version_tag(cfg.model, version, MANIFEST_TAG)
    with pytest.raises(RegistryError, match=f"phi3ops trust --version {version}"):
        load_registered(cfg, f"models:/{cfg.model}/{version}")

    trusted = phi3ops("trust", "--version", version, "--root", str(root))
    assert trusted.returncode == 0, trusted.stderr
    assert load_registered(cfg, f"models:/{cfg.model}/{version}").answer(
        [QUESTION["messages"]])
    again = one_paragraph(phi3ops("trust", "--version", version, "--root", str(root)))
    assert "already has its files' hashes" in again


# One process for every URI given: the venv compiles nothing, so each start costs seconds.
ANSWER_FROM_THE_REGISTRY = """
import json, sys, mlflow
question = {"role": "user", "content": "What is the capital of France?"}
for uri in sys.argv[1:]:
    print(json.dumps(mlflow.pyfunc.load_model(uri).predict({"messages": [question]})[0]))
"""


@pytest.mark.slow
def test_the_adapter_and_the_merged_model_load_in_a_venv_built_from_their_requirements(
        root, adapter, tiny_config, tiny_models, tmp_path):
    """Portable: a fresh venv with only the registered model's requirements.txt, no phi3ops,
    loads both registered forms through MLflow and answers as phi3ops' own loader does."""
    import subprocess
    import sys

    from phi3ops.model.inference import merge_adapter

    cfg = settings(root)
    version, run_id = register_genuine(cfg, adapter)
    merged_dir = merge_adapter(tiny_config.model, adapter[0], tmp_path / "merged", tiny_models)
    lineage = Lineage(dataset_md5="abc.dir", data_git_rev="r1", config_hash="c1",
                      code_git_rev="r1", code_hash="h1", env_lock="l1", pipeline="tiny-cpu",
                      base_model="tiny-phi3")
    merged = register_adapter(cfg, run_id, Candidate(
        lineage, {"tuned_rougeL": 0.5}, None, merged_dir, max_new_tokens=8, artifact_type="merged"))
    uris = [f"models:/{cfg.model}/{version}",
            f"models:/{cfg.model}-merged/{merged.version}"]
    requirements = mlflow.artifacts.download_artifacts(f"{uris[0]}/requirements.txt",
                                                       dst_path=str(tmp_path / "req"))
    assert "phi3ops" not in Path(requirements).read_text()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", "-r",
                              requirements], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": cfg.uri, "HF_HUB_OFFLINE": "1"}
    assert subprocess.run([python, "-c", "import phi3ops"], env=env, cwd=tmp_path,
                          capture_output=True).returncode != 0, "phi3ops is not in that venv"
    answered = subprocess.run([python, "-c", ANSWER_FROM_THE_REGISTRY, *uris], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr[-3000:]
    answers = [json.loads(line) for line in answered.stdout.strip().splitlines()]
    assert len(answers) == len(uris)
    for uri, answer in zip(uris, answers, strict=True):
        assert answer.strip() == load_registered(cfg, uri).answer(
            [QUESTION["messages"]])[0].strip(), uri
