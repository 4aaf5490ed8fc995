"""`phi3ops reproduce --version N`: rebuild a registered version from its record, and compare.

    phi3ops reproduce --version 3 [--json]      # exit 0: reproducible, 1: it differs

From the version's lineage: a temporary git worktree at the recorded code rev (its src/phi3ops
and flows run, when the project holds them; else the installed phi3ops), the data at the
recorded data rev (DVC), and the resolved config its run logged. It trains and evaluates with
`phi3ops train` and `phi3ops evaluate` of that code, registers nothing, then compares every
adapter file's sha256 and the metrics with the registered ones. On the tiny profile on CPU a
version reproduces exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from phi3ops.config import file_sha256
from phi3ops.errors import Phi3opsError
from phi3ops.registry import history
from phi3ops.registry.client import Registry
from phi3ops.registry.trusted_load import MANIFEST_TAG

# Run by the worktree's own code, whichever layout its commit has (flat modules before the
# stage subpackages).
CODE_HASH = """import sys
from pathlib import Path
try:
    from phi3ops.registry import code_version
except ImportError:
    from phi3ops import code_version
print(code_version.current(Path(sys.argv[1])).hash)"""


@dataclass
class Reproduction:
    version: int
    ran: str  # whose code trained: the worktree at the recorded rev, or the installed package
    data_rev: str
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name: [registered, now]
    differences: list[str] = field(default_factory=list)

    @property
    def reproducible(self) -> bool:
        return not self.differences

    def render(self) -> str:
        lines = [f"v{self.version}: {'reproducible' if self.reproducible else 'NOT reproducible'}"
                 f" ({self.ran}, data at {self.data_rev[:12]})"]
        lines += [f"  {name:12s} registered {a:.6f}  now {b:.6f}"
                  + ("" if a == b else "  <- differs") for name, (a, b) in self.metrics.items()]
        lines += [f"  differs: {d}" for d in self.differences]
        return "\n".join(lines)


def _phi3ops(args: list[str], env: dict, root: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "phi3ops.cli", *args], env=env, cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise Phi3opsError(f"reproducing: `phi3ops {args[0]}` failed (exit {done.returncode}):"
                           f"\n{done.stderr[-2000:]}")
    return done.stdout


def reproduce(registry: Registry, root: Path, number: str) -> Reproduction:
    found = history.lineage(registry, number)
    manifest = json.loads(registry.client.get_model_version(
        registry.model, str(found["version"])).tags.get(MANIFEST_TAG, "{}"))
    code_rev = found["code"]["git_rev"].removesuffix("-dirty")
    data_rev = found["data"]["git_rev"].removesuffix("-dirty")
    with tempfile.TemporaryDirectory(prefix="phi3ops-reproduce-") as tmp:
        code = Path(tmp) / "code"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(code),
                        code_rev], check=True, capture_output=True)
        try:
            env = dict(os.environ)
            ran = "the installed phi3ops: the project holds no src/phi3ops"
            if (code / "src" / "phi3ops").is_dir():
                env["PYTHONPATH"] = os.pathsep.join([str(code / "src"), str(code)])
                ran = f"the code at {code_rev[:12]}"
            pipeline = Path(tmp) / "pipeline.yaml"
            pipeline.write_text(found["config"]["resolved"])
            common = ["--root", str(root), "--pipeline", str(pipeline), "--data-rev", data_rev]
            out = Path(tmp) / "run"
            _phi3ops(["train", *common, "--out", str(out)], env, root)
            scored = json.loads(_phi3ops(["evaluate", *common, "--model", str(out / "adapter"),
                                          "--json"], env, root).strip().splitlines()[-1])
            # The worktree as the project: its flows/ and lock (older code finds them itself).
            code_hash = subprocess.run([sys.executable, "-c", CODE_HASH, str(code)], env=env,
                                       capture_output=True, text=True, check=True).stdout.strip()
            adapter = {f"adapter/{p.relative_to(out / 'adapter').as_posix()}": file_sha256(p)
                       for p in sorted((out / "adapter").rglob("*")) if p.is_file()}
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(code)],
                           capture_output=True)
    result = Reproduction(int(found["version"]), ran, data_rev)
    if found["code"]["git_rev"].endswith("-dirty"):
        result.differences.append(f"it was trained from uncommitted changes to {code_rev[:12]}")
    if code_hash != found["code"]["hash"]:
        result.differences.append("code hash (the package, the flows, the lock, the installed "
                                  f"dependencies): {found['code']['hash']} then, {code_hash} now")
    if scored["dataset_md5"] != found["data"]["md5"]:
        result.differences.append(f"data md5 {found['data']['md5']} then, "
                                  f"{scored['dataset_md5']} now")
    registered = {k: v for k, v in manifest.items() if k.startswith("adapter/")}
    for name in sorted(registered.keys() | adapter.keys()):
        if registered.get(name) != adapter.get(name):
            result.differences.append(f"{name}: sha256 {registered.get(name, 'absent')} then, "
                                      f"{adapter.get(name, 'absent')} now")
    for name, value in scored["metrics"].items():
        before = found["metrics"].get(f"tuned_{name}")
        if before is not None:
            result.metrics[name] = [before, value]
            if before != value:
                result.differences.append(f"{name}: {before} then, {value} now")
    return result
