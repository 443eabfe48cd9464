"""Check a built Bento: models pinned to exact versions, the pinned requirements it ships, the
service importable from the Bento alone, no training code, onnxruntime-web for the page, a slim
non-root Dockerfile."""

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import bentoml

PROJECT = Path(__file__).resolve().parent.parent
REQUIRED_MODELS = {"preprocessor", "xgboost"}  # the default serving flavor
FORBIDDEN_PACKAGES = ("mlflow", "xgboost")  # training-only / the CUDA-pulling wheel
# onnxruntime-web for the page's "Score in this browser", fetched by .ci/onnxruntime-web
VENDOR_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm.gz")
PIN = re.compile(r"^([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)")
# run inside the Bento's src/ with nothing of the project on sys.path
IMPORT_PROBE = """
import sys
import service
assert service.__file__.startswith(sys.argv[1]), service.__file__
for name in ("training", "batch", "tests", "benchmarks"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"{name} is importable next to the Bento's service")
assert "mlflow" not in sys.modules, "importing the service imports mlflow"
print(service.Scoring.name)
"""


def pins(text: str) -> dict[str, str]:
    """{normalised name: version} of the `name==version` lines of a requirements file."""
    found = {}
    for line in text.splitlines():
        if match := PIN.match(line.strip()):
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[3]
    return found


def check_models(bento: bentoml.Bento) -> list[str]:
    models = {str(m.tag) for m in bento.info.all_models}
    components = {t.split(":")[0].rsplit("-", 1)[-1] for t in models}
    problems = []
    if not components >= REQUIRED_MODELS:
        problems.append(f"models {sorted(models)} lack {sorted(REQUIRED_MODELS - components)}")
    if any(t.endswith(":latest") for t in models):
        problems.append(f"models not pinned: {sorted(models)}")
    return problems


def check_requirements(bento: bentoml.Bento) -> list[str]:
    text = Path(bento.path_of("env/python/requirements.txt")).read_text()
    shipped, locked = pins(text), pins((PROJECT / "requirements/serving.txt").read_text())
    problems = [f"the Bento ships {p!r}" for p in FORBIDDEN_PACKAGES if p in shipped]
    if "xgboost-cpu" not in shipped:
        problems.append("the Bento does not pin xgboost-cpu")
    drift = {n: (shipped.get(n), v) for n, v in locked.items() if shipped.get(n) != v}
    if drift:
        problems.append(f"requirements differ from requirements/serving.txt: {drift}")
    if shipped.get("bentoml") != version("bentoml"):
        problems.append(f"bentoml {shipped.get('bentoml')} shipped, {version('bentoml')} built")
    unpinned = [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "-")) and not PIN.match(line)
    ]
    if unpinned:
        problems.append(f"unpinned requirements: {unpinned}")
    return problems


def check_sources(bento: bentoml.Bento) -> list[str]:
    src = Path(bento.path_of("src"))
    sources = {p.name for p in src.iterdir()}
    problems = []
    if sources & {"training", "batch", "tests", "benchmarks"}:
        problems.append(f"the Bento ships training, batch, tests or benchmarks: {sorted(sources)}")
    ort = src / "api" / "ui" / "ort"
    if missing := [name for name in VENDOR_FILES if not (ort / name).is_file()]:
        problems.append(f"the Bento lacks onnxruntime-web (bash .ci/onnxruntime-web): {missing}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(src)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        problems.append(f"the service does not import from the Bento alone: {probe.stderr[-2000:]}")
    return problems


def check_dockerfile(bento: bentoml.Bento) -> list[str]:
    dockerfile = Path(bento.path_of("env/docker/Dockerfile")).read_text()
    problems = []
    if "FROM ${BASE_IMAGE}" not in dockerfile:
        problems.append("the Dockerfile is not from packaging/Dockerfile.j2")
    if re.search(r"apt-get|build-essential|\bgit\b", dockerfile):
        problems.append("the Dockerfile installs system packages (compilers, git)")
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.MULTILINE)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"the image would run as {users[-1] if users else 'root'}")
    return problems


def main(tag: str) -> int:
    bento = bentoml.bentos.get(tag)
    problems = [
        *check_models(bento),
        *check_requirements(bento),
        *check_sources(bento),
        *check_dockerfile(bento),
    ]
    for problem in problems:
        print(f"bento check: {problem}", file=sys.stderr)
    models = sorted(str(m.tag) for m in bento.info.all_models)
    sources = sorted(p.name for p in Path(bento.path_of("src")).iterdir())
    print(f"bento {tag}: models {models}; sources {sources}; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
