"""The cluster secret: where it is read from, what is refused, the keys derived from it."""
from __future__ import annotations

import os
import stat

import pytest

from exo_lab.config import load_config
from exo_lab.errors import ConfigError
from exo_lab.security import (MIN_SECRET_CHARS, PURPOSES, SECRET_ENV, derive_key, load_secret, new_secret,
                              secret_environment, write_secret_file)

CONFIG = """\
cluster_name: c
devices:
  - hostname: a
    roles: [coordinator, compute]
network:
  secret_file: {path}
"""


@pytest.fixture(autouse=True)
def no_secret_in_environment(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)


def config_with_secret_file(tmp_path, name="secrets/cluster.secret"):
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG.format(path=name))
    return load_config(folder / "config.yaml"), folder


def test_new_secrets_are_long_random_and_text():
    made = {new_secret() for _ in range(50)}
    assert len(made) == 50
    assert all(len(s) >= 40 and s.isascii() and s.isprintable() for s in made)


def test_environment_wins_over_the_config(tmp_path, monkeypatch):
    config, folder = config_with_secret_file(tmp_path)
    write_secret_file(folder / "secrets" / "cluster.secret", "from-the-file-0123456789")
    assert load_secret(config) == b"from-the-file-0123456789"
    monkeypatch.setenv(SECRET_ENV, "  from-the-environment-0123  \n")
    assert load_secret(config) == b"from-the-environment-0123"


def test_no_secret_anywhere_is_none():
    assert load_secret() is None
    assert load_secret(None) is None


def test_relative_secret_file_is_relative_to_the_config(tmp_path):
    config, folder = config_with_secret_file(tmp_path)
    assert config.network.secret_file == str((folder / "secrets" / "cluster.secret").absolute())


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX (Windows: test_windows.py)")
def test_written_secret_file_is_private_and_round_trips(tmp_path):
    path = write_secret_file(tmp_path / "deep" / "s", "x" * MIN_SECRET_CHARS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config, folder = config_with_secret_file(tmp_path, name=str(path))
    assert load_secret(config) == b"x" * MIN_SECRET_CHARS


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_secret_file_readable_by_others_is_refused_with_the_fix(tmp_path, mode):
    config, folder = config_with_secret_file(tmp_path)
    path = write_secret_file(folder / "secrets" / "cluster.secret", new_secret())
    path.chmod(mode)
    with pytest.raises(ConfigError, match=rf"chmod 600 {path}"):
        load_secret(config)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_an_existing_loose_file_is_made_private_before_the_secret_goes_in(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("old\n")
    path.chmod(0o644)
    sizes = []
    chmod = os.chmod
    monkeypatch.setattr(os, "chmod", lambda p, mode: (sizes.append(os.path.getsize(p)), chmod(p, mode)))
    write_secret_file(path, "s" * 32)
    assert sizes == [0] and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_secret_file_is_a_config_error(tmp_path):
    config, _ = config_with_secret_file(tmp_path)
    with pytest.raises(ConfigError, match="cannot read the cluster secret file"):
        load_secret(config)


@pytest.mark.parametrize("value", ["short", " " * 40, ""])
def test_short_secret_is_refused(monkeypatch, value):
    monkeypatch.setenv(SECRET_ENV, value)
    with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_CHARS}"):
        load_secret()


def test_derived_keys_are_stable_independent_and_never_the_secret():
    secret = b"correct horse battery staple!"
    keys = {purpose: derive_key(secret, purpose) for purpose in PURPOSES}
    assert all(len(key) == 32 for key in keys.values())
    assert len(set(keys.values())) == len(PURPOSES)
    assert keys["data-plane"] == derive_key(secret, "data-plane")
    assert keys["data-plane"] != derive_key(secret + b"?", "data-plane")
    assert all(secret not in key for key in keys.values())
    assert derive_key(b"x" * 1000, "data-plane") != derive_key(b"x" * 999, "data-plane")


@pytest.mark.parametrize("secret, purpose", [(b"", "data-plane"), (b"s" * 20, ""), (None, "data-plane")])
def test_derive_key_refuses_empty_inputs(secret, purpose):
    with pytest.raises(ValueError):
        derive_key(secret, purpose)


def test_secret_environment_round_trips_through_load_secret(monkeypatch):
    secret = new_secret().encode()
    for name, value in secret_environment(secret).items():
        monkeypatch.setenv(name, value)
    assert load_secret() == secret


# ------------------------------------------------------------------ signed requests (one scheme)
def test_a_signed_request_is_accepted_once_fresh_and_never_replayed_or_altered(monkeypatch):
    """The join service and the storage PC's file service share security.sign / Nonces: a
    stamp is accepted once, a stale one never, a signature over other bytes never."""
    import time

    from exo_lab import security
    from exo_lab.engine.fetch import auth_header, check_auth

    secret, nonces = new_secret().encode(), security.Nonces()
    header = auth_header(secret, "GET", "/exo-lab/storage/m/file")
    assert check_auth(secret, "GET", "/exo-lab/storage/m/file", header, nonces)
    assert not check_auth(secret, "GET", "/exo-lab/storage/m/file", header, nonces)        # replayed
    assert not check_auth(secret, "GET", "/exo-lab/storage/m/other", auth_header(secret, "GET", "/x"), nonces)
    assert not check_auth(new_secret().encode(), "GET", "/x", auth_header(secret, "GET", "/x"), nonces)
    ts, nonce = security.new_stamp()
    assert not nonces.accept(str(int(ts) - security.MAX_STAMP_AGE_S - 5), nonce)             # stale
    monkeypatch.setattr(time, "time", lambda: float(ts) + 3 * security.MAX_STAMP_AGE_S)
    assert nonces.accept(str(int(time.time())), "a-new-nonce") and len(nonces) == 1         # old ones forgotten


def test_the_join_proof_binds_its_label_and_fields():
    from exo_lab.membership.discovery import sign, verify

    secret = new_secret().encode()
    fields = {"cluster": "c", "device": "system-b", "ts": "1", "nonce": "n"}
    proof = sign(secret, "join", fields)
    assert verify(secret, "join", fields, proof)
    assert not verify(secret, "welcome", fields, proof)              # made for another message
    assert not verify(secret, "join", {**fields, "device": "system-c"}, proof)
    assert not verify(new_secret().encode(), "join", fields, proof)
