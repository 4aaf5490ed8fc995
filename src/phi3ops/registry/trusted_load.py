"""Load a registered model trusting only what phi3ops registered: its files are data, not code.

    phi3ops chat --alias champion "What is the capital of France?"   # loads through here

Anyone who can write to a shared MLflow registry can add a version under phi3ops' model name,
and `mlflow.pyfunc.load_model` runs whatever code that version's MLmodel names (a cloudpickled
object, a code file). So phi3ops never calls it. It resolves the version, refuses one that
phi3ops did not register (its tags, its MLmodel's flavor), downloads the files as data, checks
each against the sha256 manifest recorded at registration, and loads safetensors weights, the
tokenizer and the adapter with its own code (chat_runtime.ChatModel, which the MLflow pyfunc
also uses, for those who deploy it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3ops.config import file_sha256
from phi3ops.errors import RegistryError, safe_uri
from phi3ops.serve.artifacts import MODEL_CODE, RUNTIME_CODE, model_artifacts

if TYPE_CHECKING:
    from phi3ops.model.inference import ChatModel

MANIFEST_TAG = "phi3ops.artifacts_sha256"
OWN_TAGS = ("phi3ops.registration_key", "phi3ops.artifact_type", MANIFEST_TAG)
CODE_FILE = Path(MODEL_CODE).name  # the models-from-code file MLflow copies into the model
CODE_DIR = "code"  # where MLflow puts code_paths: chat_runtime.py, which CODE_FILE imports
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
ARTIFACT_NAMES = {"adapter", "base_model"}
FORMS = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/adapter or a run id (phi3ops "
         "evaluate also takes an adapter directory that exists)")
REFUSE = ("phi3ops loads only versions it registered itself, because loading a model from the "
          "registry can run code that anyone with write access put there")


def _hash_tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): file_sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def artifact_manifest(adapter_dir: Path | None, base_dir: Path | None) -> str:
    """sha256 of every file registration logs, as JSON for the version tag MANIFEST_TAG: a load
    checks the files it downloads against it, so files changed in the artifact store after
    registration are never loaded."""
    files = {CODE_FILE: file_sha256(Path(MODEL_CODE)),
             f"{CODE_DIR}/{Path(RUNTIME_CODE).name}": file_sha256(Path(RUNTIME_CODE))}
    for name, directory in model_artifacts(adapter_dir, base_dir).items():
        files.update({f"{name}/{rel}": h for rel, h in _hash_tree(Path(directory)).items()})
    return _as_tag(files)


def _as_tag(files: dict[str, str]) -> str:
    return json.dumps(files, sort_keys=True, separators=(",", ":"))


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1..3, 5': the versions that exist, short."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)


def _missing_model(client: MlflowClient, name: str) -> RegistryError | None:
    try:
        client.get_registered_model(name)
        return None
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    return RegistryError(f"registered model {name} does not exist on "
                         f"{safe_uri(client.tracking_uri)}. "
                         "Register one with `phi3ops run`, check the name (registered_model in "
                         "mlflow.yaml) and MLFLOW_TRACKING_URI.")


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """The version, or an error that says which versions exist."""
    if not str(version).isdigit():
        raise RegistryError(f"version '{version}' of {name} is not a number; give one of its "
                            "versions, e.g. --version 3")
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    if error := _missing_model(client, name):
        raise error
    numbers = [int(v.version) for v in client.search_model_versions(f"name='{name}'")]
    exist = f"its versions are {_spans(numbers)}" if numbers else "it has no versions yet"
    raise RegistryError(f"version {version} of {name} does not exist; {exist}. See them in the "
                        "MLflow UI (`make ui`) or pick one of those.")


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    if error := _missing_model(client, name):
        raise error
    aliases = sorted(client.get_registered_model(name).aliases)
    raise RegistryError(f"{name} has no alias @{alias} (its aliases: "
                        f"{', '.join('@' + a for a in aliases) or 'none'}). A version becomes "
                        "@champion when `phi3ops run` or `phi3ops promote --version N` promotes "
                        "it.")


def resolve(client: MlflowClient, uri: str) -> ModelVersion:
    """The registered version behind a model URI; runs:/ID/TYPE is the version that run
    registered, since only a registered version carries the tags that let it be checked."""
    if re.fullmatch(r"[0-9a-f]{32}", uri):  # a bare run id: the adapter it registered
        uri = f"runs:/{uri}/adapter"
    if m := re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri):
        return get_alias(client, *m.groups())
    if m := re.fullmatch(r"models:/([^/@]+)/([^/]+)", uri):
        return get_version(client, *m.groups())
    if m := re.fullmatch(r"runs:/([0-9a-f]+)/([\w-]+)", uri):
        run_id, kind = m.groups()
        for v in client.search_model_versions(f"run_id='{run_id}'"):
            if v.tags.get("phi3ops.artifact_type") == kind:
                return v
        raise RegistryError(f"run {run_id} registered no {kind} with phi3ops on "
                            f"{safe_uri(client.tracking_uri)}; {REFUSE}. Give a registered version "
                            "(models:/NAME/VERSION) or the adapter directory.")
    raise RegistryError(f"'{uri}' is no model phi3ops can load: give {FORMS}.")


def _download(client: MlflowClient, source: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dst), tracking_uri=client.tracking_uri))


def _refuse(version: ModelVersion, why: str) -> RegistryError:
    return RegistryError(f"refusing {version.name} v{version.version}: {why}; {REFUSE}. Load "
                         "a version `phi3ops run` registered (see `phi3ops promote`), and ask "
                         "whoever added this one to remove it if you did not expect it.")


def check_own(client: MlflowClient, version: ModelVersion, dst: Path,
              recorded: bool = True) -> dict:
    """The version's python_function flavor, read from its MLmodel as YAML data, when phi3ops
    registered it: its tags, a models-from-code loader running phi3ops' file, only phi3ops'
    artifact names. Anything else (a pickled python_model, other code) is refused unread.
    `recorded`: its files' hashes must have been recorded (at registration, or by `trust`)."""
    missing = [tag for tag in OWN_TAGS if tag not in version.tags and tag != MANIFEST_TAG]
    if missing:
        raise _refuse(version, f"it lacks phi3ops' registration tags ({', '.join(missing)})")
    if recorded and MANIFEST_TAG not in version.tags:
        raise RegistryError(
            f"refusing {version.name} v{version.version}: it was registered before phi3ops "
            f"recorded the sha256 of a version's files (tag {MANIFEST_TAG}), so nothing can "
            "show they are unchanged since. If you know they are, record them as they are now: "
            f"`phi3ops trust --version {version.version}`; otherwise retrain and promote anew.")
    root = client.get_model_version_download_uri(version.name, version.version)
    try:
        mlmodel = yaml.safe_load(_download(client, f"{root}/MLmodel", dst).read_text())
        flavors = mlmodel["flavors"]
        flavor = flavors["python_function"]
        artifacts = flavor.get("artifacts") or {}
    except (MlflowException, OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise _refuse(version, f"its MLmodel cannot be read as phi3ops' ({e})") from e
    problems = []
    if set(flavors) != {"python_function"}:
        problems.append(f"its flavors are {sorted(flavors)}, not python_function alone")
    if flavor.get("loader_module") != CODE_LOADER:
        problems.append(f"its loader is {flavor.get('loader_module')}, not models-from-code")
    if "python_model" in flavor:
        problems.append(f"it holds a pickled python_model ({flavor['python_model']})")
    if (PurePosixPath(str(flavor.get("model_code_path"))).name != CODE_FILE
            or flavor.get("code") not in (None, CODE_DIR)):
        problems.append(f"its code is not phi3ops' {CODE_FILE} (and {CODE_DIR}/)")
    if not artifacts or not set(artifacts) <= ARTIFACT_NAMES:
        problems.append(f"its artifacts {sorted(artifacts)} are not {sorted(ARTIFACT_NAMES)}")
    for spec in artifacts.values():
        path = PurePosixPath(str((spec or {}).get("path")))
        if path.parts[:1] != ("artifacts",) or ".." in path.parts or len(path.parts) != 2:
            problems.append(f"an artifact path {path} is outside artifacts/")
    if problems:
        raise _refuse(version, "; ".join(problems))
    return flavor


def download_verified(client: MlflowClient, version: ModelVersion, flavor: dict,
                      dst: Path) -> dict[str, Path]:
    """Download the artifacts and check every file against the manifest recorded at
    registration: a file changed, added or removed since is refused before anything reads it."""
    try:
        expected = json.loads(version.tags[MANIFEST_TAG])
    except ValueError:
        expected = None
    if not isinstance(expected, dict):
        raise _refuse(version, f"its tag {MANIFEST_TAG} is not a manifest")
    local, found = _download_files(client, version, flavor, dst)
    changed = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    missing, added = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if changed or missing or added:
        raise RegistryError(
            f"refusing {version.name} v{version.version}: its files differ from the sha256 "
            f"manifest recorded at registration (tag {MANIFEST_TAG}): changed {changed}, "
            f"missing {missing}, added {added}. They were modified in the artifact store (or "
            "the tag was) after registration, so they are not what phi3ops trained and checked. "
            "Do not use this version: find out who changed it, delete it in the MLflow UI and "
            "run `phi3ops run --force` to register the model again.")
    return local


def _download_files(client: MlflowClient, version: ModelVersion, flavor: dict,
                    dst: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The artifact directories by name, and the sha256 of every file a load could read."""
    root = client.get_model_version_download_uri(version.name, version.version)
    local = {name: _download(client, f"{root}/{spec['path']}", dst / "files" / name)
             for name, spec in flavor["artifacts"].items()}
    found = {CODE_FILE: file_sha256(_download(client, f"{root}/{CODE_FILE}", dst / "code"))}
    if flavor.get("code"):  # registered since models ship chat_runtime.py
        shipped = _download(client, f"{root}/{CODE_DIR}", dst / "shipped")
        found.update({f"{CODE_DIR}/{rel}": h for rel, h in _hash_tree(shipped).items()})
    for name, directory in local.items():
        found.update({f"{name}/{rel}": h for rel, h in _hash_tree(directory).items()})
    return local, found


def record_manifest(tracking_uri: str, uri: str) -> ModelVersion:
    """`phi3ops trust`: for a version registered before phi3ops recorded hashes, record those of
    its files as they are now (trust on first use), so every later load checks them."""
    with loading_from(tracking_uri, uri) as client, \
            tempfile.TemporaryDirectory(prefix="phi3ops-trust-") as tmp:
        version = resolve(client, uri)
        if MANIFEST_TAG in version.tags:
            raise RegistryError(f"{version.name} v{version.version} already has its files' "
                                f"hashes (tag {MANIFEST_TAG}); they are never replaced.")
        flavor = check_own(client, version, Path(tmp), recorded=False)
        found = _download_files(client, version, flavor, Path(tmp))[1]
        client.set_model_version_tag(version.name, version.version, MANIFEST_TAG,
                                     _as_tag(found))
    return version


@contextmanager
def loading_from(tracking_uri: str, uri: str):
    """A registry client; what MLflow raises (unreachable, no permission) as one paragraph."""
    try:
        yield MlflowClient(tracking_uri, registry_uri=tracking_uri)
    except (MlflowException, OSError) as e:
        raise RegistryError(f"cannot load {uri} from {safe_uri(tracking_uri)}: {e}. Run `make "
                            "run` first, or check the alias (`phi3ops promote`).") from e


def inspect_version(tracking_uri: str, uri: str) -> ModelVersion:
    """Cheap check before heavy work: the version exists and phi3ops registered it (tags and
    MLmodel only; the weights are downloaded and verified when loaded)."""
    with loading_from(tracking_uri, uri) as client, \
            tempfile.TemporaryDirectory(prefix="phi3ops-check-") as tmp:
        version = resolve(client, uri)
        check_own(client, version, Path(tmp))
    return version


def fetch_verified(tracking_uri: str, uri: str, dst: Path) -> tuple[ModelVersion, dict]:
    """Download the files behind a model URI into `dst` and check them: the version, and what
    chat_runtime.ChatModel takes (adapter_dir, base_dir, config)."""
    with loading_from(tracking_uri, uri) as client:
        version = resolve(client, uri)
        flavor = check_own(client, version, dst)
        local = download_verified(client, version, flavor, dst)
    config = flavor.get("config") or {}
    if not isinstance(config.get("base_model"), str):
        raise _refuse(version, "its model config names no base model")
    return version, {"adapter_dir": str(local["adapter"]) if "adapter" in local else None,
                     "base_dir": str(local["base_model"]) if "base_model" in local else None,
                     "config": config}


def load_verified(tracking_uri: str, uri: str) -> ChatModel:
    """The chat model behind a model URI, loaded from verified files by phi3ops' code. The
    files are deleted once loaded: the weights are in memory, and a load never reuses what an
    earlier one downloaded (a shared cache could be swapped underneath)."""
    from phi3ops.model.inference import ChatModel

    with tempfile.TemporaryDirectory(prefix="phi3ops-model-", ignore_cleanup_errors=True) as tmp:
        return ChatModel(**fetch_verified(tracking_uri, uri, Path(tmp))[1])


def main(uri: str, dst: str, mlflow_timeout_s: str) -> int:
    """The helper process of phi3ops.serve.chat: wait for the server, fetch and verify into `dst`,
    then one JSON line (the files, or the user error). The tracking URI comes in the
    environment, never on a command line that `ps` shows."""
    from phi3ops.registry.mlflow_wait import wait_for_mlflow

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    try:
        wait_for_mlflow(tracking_uri, float(mlflow_timeout_s))
        version, files = fetch_verified(tracking_uri, uri, Path(dst))
    except RegistryError as e:
        print(json.dumps({"error": str(e)}))
        return 2
    print(json.dumps({"version": version.version, **files}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
