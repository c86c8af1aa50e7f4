"""The one ownership rule for object references (common.references): a tenant may name objects inside its own
storage prefix or an operator allow-listed prefix, nothing else, and the answer never depends on the store."""
from __future__ import annotations

import uuid

import pytest

from common.errors import InvalidRequest
from common.references import resolve_tenant_object
from common.settings import Settings, StorageSettings

STORAGE = StorageSettings(url="s3://letterpress-test/images")
TENANT = uuid.UUID("0b9f6a52-5d1c-4f8e-9a57-3c2d1e0f4a11")
OTHER = uuid.UUID("7c1e2d3f-4a5b-4c6d-8e7f-901a2b3c4d5e")
OWN = f"s3://letterpress-test/images/{TENANT}"
ALLOW = ["s3://shared-prompts/public/"]


def resolve(url, *, allow=ALLOW, storage=STORAGE, field="input_url"):
    return resolve_tenant_object(url, tenant_id=TENANT, storage_settings=storage, allow=allow, field=field)


def refused(url, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        resolve(url, **kwargs)
    return info.value


@pytest.mark.parametrize("url, bucket, key", [
    (f"{OWN}/prompts.jsonl", "letterpress-test", f"images/{TENANT}/prompts.jsonl"),
    (f"{OWN}/batches/{OTHER}/manifest.jsonl", "letterpress-test", f"images/{TENANT}/batches/{OTHER}/manifest.jsonl"),
    (f"{OWN}/a b/ünïcode.jsonl", "letterpress-test", f"images/{TENANT}/a b/ünïcode.jsonl"),
    ("s3://shared-prompts/public/x.jsonl", "shared-prompts", "public/x.jsonl"),
    ("s3://shared-prompts/public/deep/er/x.jsonl", "shared-prompts", "public/deep/er/x.jsonl"),
])
def test_own_prefix_and_allow_listed_prefixes_resolve_to_bucket_and_key(url, bucket, key):
    assert resolve(url) == (bucket, key)


@pytest.mark.parametrize("url", [
    # other tenants, the storage root, the bucket root, other buckets
    f"s3://letterpress-test/images/{OTHER}/batches/{uuid.uuid4()}/manifest.jsonl",
    f"s3://letterpress-test/images/{OTHER}/{uuid.uuid4()}/0.png",
    "s3://letterpress-test/images/x.jsonl",
    "s3://letterpress-test/x.jsonl",
    f"s3://other-bucket/images/{TENANT}/x.jsonl",
    "s3://shared-prompts/private/x.jsonl",
    "s3://shared-prompts/publicity/x.jsonl",      # segment compare: `public` is not a prefix of `publicity`
    "s3://shared-prompts/public",                 # the prefix itself names no object in it
    # sibling tenant ids and the prefix itself
    f"s3://letterpress-test/images/{TENANT}x/x.jsonl",
    f"s3://letterpress-test/images/{TENANT}-evil/x.jsonl",
    f"s3://letterpress-test/images/{str(TENANT)[:-1]}/x.jsonl",
    f"s3://letterpress-test/images/{TENANT}",
    f"s3://letterpress-test/images/{TENANT}/",
    f"s3://letterpress-test/images/{str(TENANT).upper()}/x.jsonl",
    f"s3://letterpress-test/imagesx/{TENANT}/x.jsonl",
    f"s3://letterpress-test/{TENANT}/x.jsonl",
    # path tricks
    f"{OWN}/../{OTHER}/x.jsonl",
    f"{OWN}/./x.jsonl",
    f"{OWN}/..",
    f"{OWN}/%2e%2e/{OTHER}/x.jsonl",
    f"{OWN}/%2E%2E/{OTHER}/x.jsonl",
    f"{OWN}/%252e%252e/{OTHER}/x.jsonl",
    f"{OWN}%2f..%2f{OTHER}/x.jsonl",
    f"{OWN}//x.jsonl",
    f"s3://letterpress-test//images/{TENANT}/x.jsonl",
    f"s3://letterpress-test/images//{TENANT}/x.jsonl",
    f"{OWN}/..\\..\\{OTHER}\\x.jsonl",
    f"{OWN}\\..\\{OTHER}/x.jsonl",
    f"{OWN}/x.jsonl\x00.png",
    f"{OWN}/x\n.jsonl",
    f"{OWN}/x.jsonl?versionId=1",
    f"{OWN}/x.jsonl#frag",
    "s3://shared-prompts/public/../private/x.jsonl",
    # malformed URLs and hosts
    f"s3://user@letterpress-test/images/{TENANT}/x.jsonl",
    f"s3://letterpress-test:9000/images/{TENANT}/x.jsonl",
    f"S3://letterpress-test/images/{TENANT}/x.jsonl",
    f"https://letterpress-test/images/{TENANT}/x.jsonl",
    f"file:///images/{TENANT}/x.jsonl",
    "s3://",
    "s3:///x.jsonl",
    "",
    None,
    f"{OWN}/{'a' * 1100}.jsonl",
])
def test_everything_else_is_refused_naming_the_field_with_one_message(url):
    error = refused(url)
    assert error.field == "input_url" and error.status_code == 422
    assert error.message == (f"input_url must be a plain s3:// URL inside your own storage prefix {OWN}/ "
                             "or an allowed prefix")


def test_the_field_name_is_the_callers():
    error = refused(f"s3://letterpress-test/images/{OTHER}/0.png", field="image_url")
    assert error.field == "image_url" and error.message.startswith("image_url must be")


def test_without_an_allow_list_only_the_own_prefix_is_accepted():
    assert resolve(f"{OWN}/x.jsonl", allow=[]) == ("letterpress-test", f"images/{TENANT}/x.jsonl")
    refused("s3://shared-prompts/public/x.jsonl", allow=[])


def test_allow_list_entries_compare_by_segment_with_or_without_trailing_slash():
    assert resolve("s3://shared-prompts/public/x.jsonl", allow=["s3://shared-prompts/public"])[1] == "public/x.jsonl"
    assert resolve("s3://whole-bucket/a/x.jsonl", allow=["s3://whole-bucket/"]) == ("whole-bucket", "a/x.jsonl")
    refused("s3://shared-prompts/publicx/x.jsonl", allow=["s3://shared-prompts/public"])


@pytest.mark.parametrize("entry", [
    "s3://letterpress-test/", "s3://letterpress-test", "s3://letterpress-test/images/", "s3://letterpress-test/images",
])
def test_an_allow_entry_covering_every_tenants_objects_is_ignored(entry):
    refused(f"s3://letterpress-test/images/{OTHER}/x.jsonl", allow=[entry])
    assert resolve(f"{OWN}/x.jsonl", allow=[entry])[1] == f"images/{TENANT}/x.jsonl"


def test_an_allow_entry_for_one_shared_folder_of_the_storage_bucket_is_honoured():
    shared = f"s3://letterpress-test/images/{OTHER}/shared/"
    assert resolve(f"{shared}x.jsonl", allow=[shared])[1] == f"images/{OTHER}/shared/x.jsonl"
    refused(f"s3://letterpress-test/images/{OTHER}/private/x.jsonl", allow=[shared])


@pytest.mark.parametrize("entry", ["https://example.com/", "s3://bad/../x/", "s3://b%2e/x/", "", "s3://"])
def test_malformed_allow_entries_never_match(entry):
    refused("https://example.com/x.jsonl", allow=[entry])
    refused("s3://bad/x/y.jsonl", allow=[entry])


def test_empty_storage_prefix_puts_tenants_at_the_bucket_root():
    storage = StorageSettings(url="s3://letterpress-test")
    assert resolve(f"s3://letterpress-test/{TENANT}/x.jsonl", storage=storage)[1] == f"{TENANT}/x.jsonl"
    error = refused(f"s3://letterpress-test/{OTHER}/x.jsonl", storage=storage)
    assert f"s3://letterpress-test/{TENANT}/" in error.message


def test_local_storage_leaves_only_the_allow_list():
    storage = StorageSettings(url="file:///srv/letterpress")
    assert resolve("s3://shared-prompts/public/x.jsonl", storage=storage) == ("shared-prompts", "public/x.jsonl")
    error = refused(f"s3://letterpress-test/images/{TENANT}/x.jsonl", storage=storage)
    assert error.field == "input_url" and "allowed prefix" in error.message


def test_the_setting_reads_a_json_list_from_the_environment(monkeypatch):
    monkeypatch.delenv("LETTERPRESS_API__INPUT_URL_ALLOW", raising=False)
    assert Settings().api.input_url_allow == []
    monkeypatch.setenv("LETTERPRESS_API__INPUT_URL_ALLOW", '["s3://shared-prompts/public/", "s3://b/p/"]')
    assert Settings().api.input_url_allow == ["s3://shared-prompts/public/", "s3://b/p/"]
