"""Signed models: what the import signs, what a runner with the public key refuses, and the gap
left without it (a file changed together with its hash in model.yaml still loads)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import time
from pathlib import Path

import bentoml
import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from configuration import Settings, get_settings
from configuration.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    SignatureError,
    default_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    public_pem,
    sign_model_dir,
    verify_model_dir,
)
from runners.artifacts import IntegrityError, verified_file, warn_signatures_unverified

from .harness import free_port, run_python, serve_command, show_log, start_process, stop

TAG = "churn-xgboost:v1-0123456789ab"
LABELS = {"registered_name": "churn-xgboost", "registered_version": "1", "alias": "champion"}
REFUSED = "signature does not verify with the configured public key"


def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.ubj").write_bytes(b"\x7b\x00booster")
    (folder / "reference.json").write_text('{"scores": {}}')
    (folder / "model.yaml").write_text("metadata: {}\n")
    return folder


def test_a_signed_model_verifies_and_model_yaml_is_not_signed(tmp_path):
    key = Ed25519PrivateKey.generate()
    folder = model_dir(tmp_path)
    metadata = sign_model_dir(folder, TAG, LABELS, key)
    assert sorted(metadata["signed_files"]) == ["model.ubj", "reference.json"]
    assert metadata["signing_key_id"] == key_id(key.public_key())
    (folder / "model.yaml").write_text("metadata: {signature: here}\n")  # holds the signature
    verify_model_dir(folder, TAG, LABELS, metadata, key.public_key())


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda f, m: (f / "model.ubj").write_bytes(b"evil"), "file model.ubj differs from the"),
        (
            lambda f, m: m["signed_files"].update({"model.ubj": "0" * 64}),
            "signature invalid (the tag, a lineage label or a signed file hash changed",
        ),
        (lambda f, m: m.pop("signature"), "unsigned (no signature in its metadata)"),
        (lambda f, m: (f / "reference.json").unlink(), "file reference.json of the signed manif"),
        (lambda f, m: (f / "extra.pkl").write_bytes(b""), "file extra.pkl is not in the signed"),
        (lambda f, m: m.update(signature="AAAA"), "signature invalid"),
        (lambda f, m: m.update(signature="not base64!"), "signature invalid"),
        (lambda f, m: m.pop("signed_files"), "signature invalid (no signed file list"),
    ],
    ids=["file", "stored-hash", "unsigned", "missing", "extra", "other-sig", "garbage", "no-list"],
)
def test_a_tampered_model_is_refused_saying_why(tmp_path, tamper, reason):
    key = Ed25519PrivateKey.generate()
    folder = model_dir(tmp_path)
    metadata = sign_model_dir(folder, TAG, LABELS, key)
    tamper(folder, metadata)
    with pytest.raises(SignatureError) as refused:
        verify_model_dir(folder, TAG, LABELS, metadata, key.public_key())
    message = str(refused.value)
    assert message.startswith(f"{TAG}: {REFUSED} (key id {key_id(key.public_key())}): ")
    assert reason in message and message.endswith("refusing to load it")


@pytest.mark.parametrize(
    ("tag", "labels"),
    [
        ("churn-xgboost:v2-0123456789ab", LABELS),
        (TAG, {**LABELS, "registered_version": "2"}),
        (TAG, {**LABELS, "alias": "challenger"}),
        (TAG, {**LABELS, "run_id": "another"}),
    ],
    ids=["tag", "registered_version", "alias", "run_id"],
)
def test_a_changed_tag_or_lineage_label_is_refused(tmp_path, tag, labels):
    key = Ed25519PrivateKey.generate()
    folder = model_dir(tmp_path)
    metadata = sign_model_dir(folder, TAG, LABELS, key)
    with pytest.raises(SignatureError, match=r"signature invalid \(the tag, a lineage label"):
        verify_model_dir(folder, tag, labels, metadata, key.public_key())


def test_a_model_signed_with_another_key_is_refused(tmp_path):
    signer, configured = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    folder = model_dir(tmp_path)
    metadata = sign_model_dir(folder, TAG, LABELS, signer)
    with pytest.raises(SignatureError) as refused:
        verify_model_dir(folder, TAG, LABELS, metadata, configured.public_key())
    assert str(refused.value) == (
        f"{TAG}: {REFUSED} (key id {key_id(configured.public_key())}): signed with another key "
        f"(key id {key_id(signer.public_key())}); refusing to load it"
    )


def test_the_public_key_is_read_from_pem_text_or_a_file(tmp_path):
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "key.pub.pem"
    path.write_bytes(public_pem(key))
    from_text, from_file = load_public_key(public_pem(key).decode()), load_public_key(str(path))
    assert key_id(from_text) == key_id(from_file) == key_id(key.public_key())


def test_the_default_key_is_generated_once_private_and_beside_its_public_key(tmp_path):
    folder = tmp_path / ".signing"
    first = default_signing_key(folder)
    assert stat.S_IMODE((folder / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert (folder / PUBLIC_KEY_FILE).read_bytes() == public_pem(first)
    assert key_id(default_signing_key(folder).public_key()) == key_id(first.public_key())
    assert sorted(p.name for p in folder.iterdir()) == [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]


# ---- through the real store: the demo's imports ----------------------------------------------
def session_public_key() -> str:
    """The public key of the key the session's imports signed with, as PEM text."""
    settings = get_settings()
    assert settings.model_signing_key is not None
    return public_pem(load_private_key(settings.model_signing_key)).decode()


def keyed() -> Settings:
    return get_settings().model_copy(update={"model_public_key": session_public_key()})


def copy_of(model: bentoml.Model, tmp_path: Path) -> Path:
    """A copy of a stored model's folder, outside the session store (other tests use it)."""
    return Path(shutil.copytree(model.path, tmp_path / "copy"))


def load(folder: Path) -> bentoml.Model:
    return bentoml.models.Model.from_path(folder)


def edit_model_yaml(folder: Path, edit) -> None:
    info = yaml.safe_load((folder / "model.yaml").read_text())
    edit(info)
    (folder / "model.yaml").write_text(yaml.safe_dump(info))


def swap_model_file(folder: Path) -> None:
    """The attack: a different model.ubj, and its SHA-256 written into model.yaml."""
    path = folder / "model.ubj"
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_model_yaml(folder, lambda info: info["metadata"].update(sha256=digest))


def test_every_imported_model_is_signed_over_all_its_files(demo_models):
    settings, public = keyed(), load_public_key(session_public_key())
    for model in demo_models.values():
        metadata = model.info.metadata
        assert metadata["signing_key_id"] == key_id(public)
        files = {p.name for p in Path(model.path).iterdir()} - {"model.yaml"}
        assert set(metadata["signed_files"]) == files
        for key in ("file", "encoder", "reference"):
            if key in metadata:
                assert verified_file(model, key, settings=settings).exists()


def test_a_swapped_model_file_with_its_hash_updated_loads_only_without_the_key(
    demo_models, tmp_path
):
    folder = copy_of(demo_models["xgboost"], tmp_path)
    swap_model_file(folder)
    tampered = load(folder)
    # the documented gap: the hash stored beside the file was changed with it
    assert verified_file(tampered, settings=get_settings()) == folder / "model.ubj"
    with pytest.raises(SignatureError) as refused:
        verified_file(tampered, settings=keyed())
    assert str(refused.value).startswith(f"{tampered.tag}: {REFUSED} (key id ")
    assert "file model.ubj differs from the signed manifest" in str(refused.value)


def test_a_changed_label_or_a_removed_signature_in_the_store_is_refused(demo_models, tmp_path):
    folder = copy_of(demo_models["xgboost"], tmp_path)
    edit_model_yaml(folder, lambda info: info["labels"].update(registered_version="999"))
    with pytest.raises(SignatureError, match="signature invalid"):
        verified_file(load(folder), settings=keyed())
    edit_model_yaml(folder, lambda info: info["metadata"].pop("signature"))
    with pytest.raises(SignatureError, match=r"unsigned \(no signature"):
        verified_file(load(folder), settings=keyed())


def test_a_stored_hash_changed_alone_is_refused_by_the_hash_check(demo_models, tmp_path):
    """The signature still verifies (it holds its own file hashes), the file matches them, and
    the hash in model.yaml that now disagrees with the file is refused as before."""
    folder = copy_of(demo_models["xgboost"], tmp_path)
    edit_model_yaml(folder, lambda info: info["metadata"].update(sha256="0" * 64))
    with pytest.raises(IntegrityError, match=r"expected 0{64}; refusing to load it"):
        verified_file(load(folder), settings=keyed())


def test_without_the_public_key_a_worker_warns_once(demo_models, caplog):
    warn_signatures_unverified.cache_clear()
    with caplog.at_level(logging.WARNING, logger="runners.artifacts"):
        for _ in range(3):
            verified_file(demo_models["xgboost"], settings=get_settings())
        verified_file(demo_models["xgboost"], settings=keyed())
    warnings = [r for r in caplog.records if "SCORING_MODEL_PUBLIC_KEY is unset" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


@pytest.mark.process
def test_the_runners_load_signed_models_with_the_key_from_an_env_var(demo_models):
    """As a runner worker starts, with the public key's PEM text in SCORING_MODEL_PUBLIC_KEY."""
    script = (
        "import logging, service\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from runners.preprocessor import Preprocessor\n"
        "from runners.xgboost_runner import XGBoostRunner\n"
        "from runners.sklearn_runner import SklearnRunner\n"
        "for svc in (Preprocessor, XGBoostRunner, SklearnRunner):\n"
        "    svc.inner()\n"
        "print('loaded')\n"
    )
    env = {"SCORING_MODEL_PUBLIC_KEY": session_public_key()}
    result = run_python("-c", script, env=env, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "loaded"
    assert "SCORING_MODEL_PUBLIC_KEY is unset" not in result.stderr


@pytest.mark.e2e
def test_a_served_tampered_model_is_refused_and_never_ready(demo_models, tmp_path):
    """A real `bentoml serve` over a copy of the store whose served XGBoost model was swapped
    (file and hash): the runner refuses it, /readyz stays 503 and the log says why."""
    home = tmp_path / "bentoml"
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    served = demo_models["xgboost"]
    folder = home / "models" / served.tag.name / served.tag.version
    swap_model_file(folder)
    key = tmp_path / "model-signing.pub.pem"
    key.write_text(session_public_key())
    log = tmp_path / "serve.log"
    port = free_port()
    env = {"BENTOML_HOME": str(home), "SCORING_MODEL_PUBLIC_KEY": str(key)}
    process = start_process(serve_command(port), log, env)
    refusal = f"SignatureError: {served.tag}: {REFUSED}"  # raised in the runner's start-up
    try:
        deadline = time.monotonic() + 120
        while refusal not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        assert f"{refusal} (key id {key_id(load_public_key(str(key)))})" in text, text[-3000:]
        assert "file model.ubj differs from the signed manifest; refusing to load it" in text
        statuses = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(10):
                statuses.append(client.get("/readyz").status_code)
                time.sleep(0.5)
        assert set(statuses) == {503}, statuses
    finally:
        stop(process)
        show_log(log)


@pytest.mark.process
def test_a_server_without_a_public_key_never_loads_cryptography():
    """Without SCORING_MODEL_PUBLIC_KEY nothing is verified with a key, so the service and its
    runners do not import `cryptography` (7 MiB of each worker's memory); signing and verifying
    import it where they run (the tests above)."""
    code = (
        "import sys, service\n"
        "import runners.preprocessor, runners.xgboost_runner, runners.sklearn_runner\n"
        "assert 'cryptography' not in sys.modules, sorted(m for m in sys.modules if 'crypto' in m)"
    )
    done = run_python("-c", code, unset=["SCORING_MODEL_PUBLIC_KEY"])
    assert done.returncode == 0, done.stderr[-2000:]
