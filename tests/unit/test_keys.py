"""The API key file: key format, hashing, validation of entries, atomic 0600 writes."""

from __future__ import annotations

import stat

import pytest

from gateway.core.keys import KEY_PATTERN, KeyEntry, KeyFile, hash_key, new_key, read_key_file, write_key_file


def test_new_keys_match_the_pattern_and_carry_their_id():
    ids = set()
    for _ in range(50):
        key_id, key = new_key()
        m = KEY_PATTERN.fullmatch(key)
        assert m and m.group(1) == key_id
        ids.add(key_id)
    assert len(ids) == 50
    assert not KEY_PATTERN.fullmatch(key + "\n") and not KEY_PATTERN.fullmatch("igw_short_x")


def test_round_trip_and_mode(tmp_path):
    path = tmp_path / "keys.yaml"
    key_id, key = new_key()
    write_key_file(path, KeyFile(keys={key_id: KeyEntry(sha256=hash_key(key), tenant="acme")}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kf = read_key_file(path)
    assert kf.keys[key_id].sha256 == hash_key(key) and key not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["keys.yaml"]  # no temporary file left


@pytest.mark.parametrize(
    "entry, where",
    [
        ("{sha256: nothex, tenant: a}", "keys.k.sha256"),
        ("{sha256: " + "a" * 64 + ", tenant: a, priority_max: urgent}", "keys.k.priority_max"),
        (
            "{sha256: " + "a" * 64 + ", tenant: a, limits: {tokens_per_minute: 5000000000}}",
            "keys.k.limits.tokens_per_minute",
        ),
        ("{sha256: " + "a" * 64 + ", tenant: a, colour: red}", "keys.k.colour"),
    ],
)
def test_bad_entries_name_the_key(tmp_path, entry, where):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  k: {entry}\n")
    with pytest.raises(ValueError) as info:
        read_key_file(path)
    assert where in str(info.value)
