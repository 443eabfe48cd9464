"""Check a built Bento: models pinned to exact versions, the requirements it ships, no training."""

import sys
from pathlib import Path

import bentoml

REQUIRED_MODELS = {"preprocessor", "xgboost"}  # the default serving flavor
FORBIDDEN_PACKAGES = ("mlflow", "xgboost==")  # training-only / the CUDA-pulling wheel


def main(tag: str) -> int:
    bento = bentoml.bentos.get(tag)
    models = {str(m.tag) for m in bento.info.all_models}
    components = {t.split(":")[0].rsplit("-", 1)[-1] for t in models}
    problems = []
    if not components >= REQUIRED_MODELS:
        problems.append(f"models {sorted(models)} lack {sorted(REQUIRED_MODELS - components)}")
    if any(t.endswith(":latest") for t in models):
        problems.append(f"models not pinned: {sorted(models)}")
    text = Path(bento.path_of("env/python/requirements.txt")).read_text()
    for package in FORBIDDEN_PACKAGES:
        if any(line.startswith(package) for line in text.splitlines()):
            problems.append(f"the Bento ships {package!r}")
    if "xgboost-cpu==" not in text:
        problems.append("the Bento does not pin xgboost-cpu")
    sources = {p.name for p in Path(bento.path_of("src")).iterdir()}
    if "training" in sources or "tests" in sources:
        problems.append(f"the Bento ships training or tests: {sorted(sources)}")
    for problem in problems:
        print(f"bento check: {problem}", file=sys.stderr)
    print(f"bento {tag}: models {sorted(models)}; sources {sorted(sources)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
