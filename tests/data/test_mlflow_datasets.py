"""The run's datasets: the DVC md5 as digest, the DVC path at its rev as source, no secrets."""

import json
import subprocess

from phi3ops.data.mlflow_datasets import DvcDatasetSource, repo_url, splits


def test_splits_name_the_dvc_version_and_the_origin_without_credentials(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert repo_url(tmp_path) == str(tmp_path), "no remote: the path"
    subprocess.run(["git", "-C", str(tmp_path), "remote", "add", "origin",
                    "https://ann:s3cret@git.example.com/team/chat.git"], check=True)
    found = splits(tmp_path, "data", "9a5d08c4058224da5231dca64b40f248.dir", "abc-dirty", 90, 10)
    train, held_out = found["training"], found["evaluation"]
    assert (train.name, held_out.name) == ("data-train", "data-held-out")
    assert train.digest == held_out.digest == "9a5d08c4058224da5231dca64b40f248.dir"
    assert json.loads(held_out.to_dict()["profile"]) == {"num_rows": 10}
    source = DvcDatasetSource.from_json(train.source.to_json())
    assert source.to_dict() == {"repo": "https://git.example.com/team/chat.git", "path": "data",
                                "rev": "abc"}
    assert "s3cret" not in json.dumps(train.to_dict())
