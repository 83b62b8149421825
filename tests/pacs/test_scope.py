"""The scope: typed configuration, the queries built from it, and the gate every query passes."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import pytest

from rapha.config import load_settings
from rapha.errors import ConfigError, ScopeError, UsageError
from rapha.pacs import Scope, ScopeSettings, StudyQuery, check_query, queries_for

SCOPE = Scope(
    modalities=frozenset({"CR", "DX"}),
    body_parts=frozenset({"CHEST"}),
    date_from=datetime.date(2020, 1, 1),
    date_to=datetime.date(2020, 12, 31),
    max_studies=100,
)
GOOD = {"ModalitiesInStudy": "CR", "StudyDate": "20200101-20201231", "limit": "100"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modalities": frozenset()}, "modalities must not be empty"),
        ({"modalities": frozenset({"cr"})}, "upper-case"),
        ({"modalities": frozenset({"C*"})}, "without wildcards"),
        ({"body_parts": frozenset()}, "body_parts must not be empty"),
        ({"body_parts": frozenset({"CHEST?"})}, "without wildcards"),
        ({"date_from": datetime.date(2021, 1, 1)}, "date_from must not be after"),
        ({"max_studies": 0}, "max_studies must be a positive"),
        ({"study_uids": frozenset()}, "study_uids, when given, must not be empty"),
        ({"study_uids": frozenset({"1.2.3?x=1"})}, "study_uids must be UIDs"),
        ({"accessions": frozenset({"A*"})}, "exact values"),
    ],
)
def test_scope_refuses_invalid_values(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        dataclasses.replace(SCOPE, **change)  # type: ignore[arg-type]


def test_scope_settings_read_from_toml_and_normalise_codes(tmp_path: Path) -> None:
    path = tmp_path / "scope.toml"
    path.write_text(
        'modalities = ["cr", " DX "]\nbody_parts = ["chest"]\n'
        "date_from = 2020-01-01\ndate_to = 2020-12-31\nmax_studies = 100\n"
    )

    scope = load_settings(ScopeSettings, path, env={}).to_scope()

    assert scope == SCOPE


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('modalities = []\nbody_parts = ["CHEST"]\n', "modalities"),
        ('modalities = ["CR"]\nbody_parts = ["*"]\n', "body_parts"),
        ('modalities = ["CR"]\nbody_parts = ["CHEST"]\nstudy_uids = []\n', "study_uids"),
    ],
)
def test_scope_settings_refuse_unbounded_values(tmp_path: Path, toml: str, field: str) -> None:
    path = tmp_path / "scope.toml"
    path.write_text(toml + "date_from = 2020-01-01\ndate_to = 2020-12-31\nmax_studies = 5\n")

    with pytest.raises(ConfigError, match=field):
        load_settings(ScopeSettings, path, env={})


def test_scope_settings_refuse_a_reversed_window(tmp_path: Path) -> None:
    path = tmp_path / "scope.toml"
    path.write_text(
        'modalities = ["CR"]\nbody_parts = ["CHEST"]\n'
        "date_from = 2021-01-01\ndate_to = 2020-12-31\nmax_studies = 5\n"
    )

    with pytest.raises(ConfigError, match="date_from must not be after date_to"):
        load_settings(ScopeSettings, path, env={})


def test_scope_settings_refuse_a_missing_cap(tmp_path: Path) -> None:
    path = tmp_path / "scope.toml"
    path.write_text(
        'modalities = ["CR"]\nbody_parts = ["CHEST"]\n'
        "date_from = 2020-01-01\ndate_to = 2020-12-31\n"
    )

    with pytest.raises(ConfigError, match="max_studies"):
        load_settings(ScopeSettings, path, env={})


def test_one_query_per_modality_with_exact_values() -> None:
    queries = queries_for(SCOPE)

    assert [q.params() for q in queries] == [
        {"ModalitiesInStudy": m, "StudyDate": "20200101-20201231", "limit": "100", "offset": "0"}
        for m in ("CR", "DX")
    ]
    for query in queries:
        check_query(query, SCOPE)


def test_allow_list_gives_one_exact_query_per_modality_and_study() -> None:
    scope = dataclasses.replace(SCOPE, study_uids=frozenset({"1.2.3", "1.2.4"}))

    queries = queries_for(scope, limit=10)

    assert [(q.modality, dict(q.extra), q.limit) for q in queries] == [
        ("CR", {"StudyInstanceUID": "1.2.3"}, 10),
        ("CR", {"StudyInstanceUID": "1.2.4"}, 10),
        ("DX", {"StudyInstanceUID": "1.2.3"}, 10),
        ("DX", {"StudyInstanceUID": "1.2.4"}, 10),
    ]
    for query in queries:
        check_query(query, scope)


def test_accession_allow_list_queries_by_accession() -> None:
    scope = dataclasses.replace(SCOPE, accessions=frozenset({"ACC00001"}))

    queries = queries_for(scope)

    assert [dict(q.extra) for q in queries] == [{"AccessionNumber": "ACC00001"}] * 2
    for query in queries:
        check_query(query, scope)


def test_a_page_size_above_the_cap_is_refused() -> None:
    with pytest.raises(ScopeError, match="max_studies"):
        queries_for(SCOPE, limit=101)


def test_describe_names_allow_list_keys_but_not_their_values() -> None:
    query = queries_for(dataclasses.replace(SCOPE, accessions=frozenset({"ACC00001"})))[0]

    described = query.describe()

    assert described["allow_list_keys"] == ["AccessionNumber"]
    assert "ACC00001" not in repr(described)


@pytest.mark.parametrize(
    ("params", "rule"),
    [
        ({}, "no modality"),
        ({"StudyDate": "20200101-20201231", "limit": "10"}, "no modality"),
        ({"ModalitiesInStudy": "", "StudyDate": "20200101-20201231", "limit": "10"}, "no modality"),
        ({"ModalitiesInStudy": "CR", "limit": "10"}, "no study-date range"),
        ({"ModalitiesInStudy": "CR", "StudyDate": "20200101-", "limit": "10"}, "both bounds"),
        ({"ModalitiesInStudy": "CR", "StudyDate": "-20201231", "limit": "10"}, "both bounds"),
        ({"ModalitiesInStudy": "CR", "StudyDate": "20200101", "limit": "10"}, "both bounds"),
        ({**GOOD, "ModalitiesInStudy": "*"}, "wildcard"),
        ({**GOOD, "ModalitiesInStudy": "C?"}, "wildcard"),
        ({**GOOD, "ModalitiesInStudy": "%2A"}, "wildcard"),
        ({**GOOD, "AccessionNumber": "*"}, "wildcard"),
        ({**GOOD, "StudyDate": "2020*"}, "wildcard"),
        ({**GOOD, "ModalitiesInStudy": "CT"}, "not one the scope allows"),
        ({**GOOD, "ModalitiesInStudy": "CR\\CT"}, "not one the scope allows"),
        ({**GOOD, "StudyDate": "20190101-20201231"}, "outside the scope's window"),
        ({**GOOD, "StudyDate": "20201231-20200101"}, "outside the scope's window"),
        ({**GOOD, "StudyDate": "20201301-20201231"}, "invalid date"),
        ({k: v for k, v in GOOD.items() if k != "limit"}, "no limit"),
        ({**GOOD, "limit": "101"}, "between 1 and max_studies"),
        ({**GOOD, "limit": "0"}, "between 1 and max_studies"),
        ({**GOOD, "limit": "-5"}, "whole number"),
        ({**GOOD, "offset": "x"}, "whole number"),
        ({**GOOD, "PatientName": "DOE^JOHN"}, "only ModalitiesInStudy"),
        ({**GOOD, "fuzzymatching": "true"}, "only ModalitiesInStudy"),
        ({**GOOD, "00080061": "CR"}, "more than once"),
    ],
)
def test_check_query_refuses_unbounded_queries(params: dict[str, str], rule: str) -> None:
    with pytest.raises(ScopeError, match=rule):
        check_query(params, SCOPE)


def test_refusal_messages_never_quote_the_query() -> None:
    with pytest.raises(ScopeError) as refused:
        check_query({**GOOD, "AccessionNumber": "SECRET-ACC-123*"}, SCOPE)

    assert "SECRET-ACC-123" not in str(refused.value)


def test_check_query_accepts_a_bounded_query_by_tag_or_keyword() -> None:
    check_query(GOOD, SCOPE)
    check_query({"00080061": "DX", "00080020": "20200301-20200302", "limit": "1"}, SCOPE)


def test_allow_lists_bound_the_identifiers_a_query_may_name() -> None:
    scope = dataclasses.replace(SCOPE, study_uids=frozenset({"1.2.3"}))

    check_query({**GOOD, "StudyInstanceUID": "1.2.3"}, scope)
    with pytest.raises(ScopeError, match="allow-list"):
        check_query({**GOOD, "StudyInstanceUID": "1.2.4"}, scope)


def test_a_study_query_object_is_checked_like_its_parameters() -> None:
    query = StudyQuery("CR", datetime.date(2020, 1, 1), datetime.date(2020, 12, 31), limit=500)

    with pytest.raises(ScopeError, match="max_studies"):
        check_query(query, SCOPE)
