"""Ed25519 signatures of stored models: signed at import, verified by the runners before a load.

Built on `cryptography` (small, well kept, already the standard): OpenSSF `model-signing` would
bring sigstore, in-toto and a large dependency tree into the serving image for a key-based
signature that fits in this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configuration.digests import sha256_of
from configuration.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:  # imported where used: a server without a public key never loads it (7 MiB
    # of each worker's memory)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

MANIFEST_FORMAT = "scoring-model-manifest/1"  # signed too: a signature means this and only this
LINEAGE_LABELS = ("registered_name", "registered_version", "alias", "run_id")
UNSIGNED_FILE = "model.yaml"  # BentoML's metadata file, which holds the signature itself
DEFAULT_KEY_DIR = PROJECT_ROOT / ".signing"
PRIVATE_KEY_FILE = "model-signing.pem"
PUBLIC_KEY_FILE = "model-signing.pub.pem"
PEM_START = "-----BEGIN"
KEY_ID_CHARS = 16


class SignatureError(RuntimeError):
    """A stored model's signature does not verify with the configured public key."""


def file_digests(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a stored model but model.yaml, by path relative to its folder."""
    digests = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        name = path.relative_to(model_dir).as_posix()
        if name != UNSIGNED_FILE:
            digests[name] = sha256_of(path)
    return digests


def manifest(tag: str, labels: Mapping[str, Any], files: Mapping[str, str]) -> bytes:
    """The canonical JSON that is signed: the tag, the lineage labels and the file hashes."""
    content = {
        "format": MANIFEST_FORMAT,
        "tag": tag,
        "labels": {name: labels.get(name) for name in LINEAGE_LABELS},
        "files": dict(files),
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def key_id(key: Ed25519PublicKey) -> str:
    """A short name of a public key: the start of the SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def sign_model_dir(
    model_dir: Path, tag: str, labels: Mapping[str, Any], key: Ed25519PrivateKey
) -> dict[str, Any]:
    """The metadata entries that sign a stored model's folder as it is now."""
    files = file_digests(model_dir)
    signature = key.sign(manifest(tag, labels, files))
    return {
        "signature": base64.b64encode(signature).decode(),
        "signing_key_id": key_id(key.public_key()),
        "signed_files": files,
    }


def verify_model_dir(
    model_dir: Path,
    tag: str,
    labels: Mapping[str, Any],
    metadata: Mapping[str, Any],
    key: Ed25519PublicKey,
) -> None:
    """Raise SignatureError, saying why, unless the signature in `metadata` verifies with `key`
    over the tag, the lineage labels and the files found in `model_dir`."""
    from cryptography.exceptions import InvalidSignature

    expected = key_id(key)

    def refuse(reason: str) -> SignatureError:
        return SignatureError(
            f"{tag}: signature does not verify with the configured public key (key id "
            f"{expected}): {reason}; refusing to load it"
        )

    signature, signed = metadata.get("signature"), metadata.get("signed_files")
    if not signature:
        raise refuse("unsigned (no signature in its metadata)")
    if metadata.get("signing_key_id") != expected:
        raise refuse(f"signed with another key (key id {metadata.get('signing_key_id')})")
    if not isinstance(signed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in signed.items()
    ):
        raise refuse("signature invalid (no signed file list in its metadata)")
    try:
        key.verify(base64.b64decode(str(signature), validate=True), manifest(tag, labels, signed))
    except (InvalidSignature, binascii.Error):
        raise refuse(
            "signature invalid (the tag, a lineage label or a signed file hash changed since "
            "it was signed)"
        ) from None
    found = file_digests(model_dir)
    for name in sorted(signed.keys() | found.keys()):
        if name not in found:
            raise refuse(f"file {name} of the signed manifest is missing")
        if name not in signed:
            raise refuse(f"file {name} is not in the signed manifest")
        if found[name] != signed[name]:
            raise refuse(f"file {name} differs from the signed manifest")


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The public key (of a private key) as PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


@lru_cache
def load_public_key(value: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text (e.g. an env var fed by a Kubernetes Secret) or from
    the path of a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    is_pem = value.lstrip().startswith(PEM_START)
    key = serialization.load_pem_public_key(value.encode() if is_pem else Path(value).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{'PEM text' if is_pem else value}: not an Ed25519 public key")
    return key


def default_signing_key(directory: Path = DEFAULT_KEY_DIR) -> Ed25519PrivateKey:
    """The key in `directory`, generated the first time (private key mode 0600, its public key
    beside it), so that the demo signs its imports with nothing configured."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not private_path.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor, scratch = tempfile.mkstemp(dir=directory)  # mode 0600
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(pem)
            # a link never replaces a file: of two concurrent first imports, one key wins whole
            os.link(scratch, private_path)
        except FileExistsError:
            pass
        finally:
            os.unlink(scratch)
    key = load_private_key(private_path)
    if not public_path.exists() or public_path.read_bytes() != public_pem(key):
        public_path.write_bytes(public_pem(key))
    return key


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The key imports sign with: `model_signing_key`, else the project's generated key."""
    if settings.model_signing_key is not None:
        return load_private_key(settings.model_signing_key)
    return default_signing_key()
