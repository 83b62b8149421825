"""The DICOMweb source on a real Orthanc: refused queries never leave, paging that survives
servers misusing ``offset``, what is sent (no wildcards), what is never logged, and PACS
authentication (HTTP Basic, bearer token, client TLS certificate with a custom CA).

A :class:`~support.proxy.RecordingProxy` on loopback sits between the source and Orthanc
where a test needs to see the requests or to change the server's behaviour.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapha.errors import ConfigError, RemoteError, ScopeError
from rapha.pacs import BasicAuth, BearerToken, ClientCert, DicomWebSource, StudyQuery
from support.orthanc import OrthancServer, free_port, start_orthanc, upload_folder
from support.proxy import ProxyTls, RecordedRequest, RecordingProxy
from support.tls import Pki, make_pki

from .conftest import (
    PAGING_CR_STUDIES,
    PAGING_FIRST_STUDY_INSTANCES,
    PAGING_SCOPE,
    Pacs,
    read,
)

USER, PASSWORD, TOKEN = "rapha-node", "pacs-Pa55word-for-tests", "token-0123456789abcdef"


@pytest.fixture
def orthanc_with_paging(pacs: Pacs, paging_archive: Path) -> OrthancServer:
    pacs.load(paging_archive)
    return pacs.server


@pytest.fixture(scope="module")
def expected(paging_archive: Path) -> dict[str, list[str]]:
    """CR study UID -> its sorted SOP UIDs, read from the files with pydicom."""
    found: dict[str, list[str]] = {}
    for path in sorted(paging_archive.iterdir()):
        ds = read(path, header_only=True)
        if ds.Modality == "CR":
            found.setdefault(ds.StudyInstanceUID, []).append(ds.SOPInstanceUID)
    return {uid: sorted(sops) for uid, sops in sorted(found.items())}


def _study_searches(proxy: RecordingProxy) -> list[RecordedRequest]:
    return [r for r in proxy.requests if r.path.endswith("/studies")]


def _everything(source: DicomWebSource) -> dict[str, list[str]]:
    return {
        uid: [i.ref.sop_uid for i in source.instances(PAGING_SCOPE, uid) if i.ref]
        for uid in source.studies(PAGING_SCOPE)
    }


# -- refused queries never leave ---------------------------------------------------------

BROAD_QUERIES = {
    "no keys at all": {},
    "no modality": {"StudyDate": "20200101-20201231", "limit": "10"},
    "no dates": {"ModalitiesInStudy": "CR", "limit": "10"},
    "open date range": {"ModalitiesInStudy": "CR", "StudyDate": "20200101-", "limit": "10"},
    "bare wildcard": {"ModalitiesInStudy": "*", "StudyDate": "20200101-20201231", "limit": "10"},
    "encoded wildcard": {
        "ModalitiesInStudy": "%2A",
        "StudyDate": "20200101-20201231",
        "limit": "10",
    },
    "no limit": {"ModalitiesInStudy": "CR", "StudyDate": "20200101-20201231"},
    "limit above the cap": {
        "ModalitiesInStudy": "CR",
        "StudyDate": "20200101-20201231",
        "limit": "51",
    },
    "patient search": {
        "ModalitiesInStudy": "CR",
        "StudyDate": "20200101-20201231",
        "limit": "10",
        "PatientName": "CANARY*",
    },
}


def test_refused_queries_never_reach_orthanc(orthanc_with_paging: OrthancServer) -> None:
    audited: list[dict[str, str | list[str]]] = []
    with RecordingProxy(orthanc_with_paging.dicomweb_url) as proxy:
        source = DicomWebSource(proxy.url, on_query=audited.append)

        for name, params in BROAD_QUERIES.items():
            with pytest.raises(ScopeError, match="query refused"):
                source.search_studies(params, PAGING_SCOPE)
            assert proxy.requests == [], f"'{name}' reached the server"
        with pytest.raises(ScopeError, match="max_studies"):
            source.search_studies(
                StudyQuery("CR", PAGING_SCOPE.date_from, PAGING_SCOPE.date_to, limit=1000),
                PAGING_SCOPE,
            )
        refused = proxy.requests
        accepted = source.search_studies(
            {"ModalitiesInStudy": "CR", "StudyDate": "20200101-20201231", "limit": "10"},
            PAGING_SCOPE,
        )

    assert refused == []
    assert len(accepted) == PAGING_CR_STUDIES  # the proxy does forward what is allowed
    assert len(proxy.requests) == 1
    assert audited == [  # only the query that was sent, described by its scope
        {
            "modality": "CR",
            "study_date": "20200101-20201231",
            "limit": "10",
            "offset": "0",
            "allow_list_keys": [],
        }
    ]


def test_every_query_sent_is_exact_and_bounded(
    orthanc_with_paging: OrthancServer, expected: dict[str, list[str]]
) -> None:
    with RecordingProxy(orthanc_with_paging.dicomweb_url) as proxy:
        found = _everything(DicomWebSource(proxy.url, page_size=2))

    assert found == expected
    for request in proxy.requests:
        # Never a wildcard, encoded or not: Orthanc 1.10 matches "%2A" literally.
        assert not re.search(r"[*?]|%2A|%3F", request.raw_query, re.IGNORECASE)
    for request in _study_searches(proxy):
        query = dict(request.query)
        assert query["ModalitiesInStudy"] in PAGING_SCOPE.modalities
        assert query["StudyDate"] == "20200101-20201231"
        assert 1 <= int(query["limit"]) <= PAGING_SCOPE.max_studies
        assert "PatientName" not in query


# -- paging --------------------------------------------------------------------------------


def test_paging_is_complete_on_orthanc(
    orthanc_with_paging: OrthancServer, expected: dict[str, list[str]]
) -> None:
    # Orthanc 1.10 applies limit before offset when it matches ModalitiesInStudy, so its
    # second page is empty although more studies match; the source re-asks from offset 0.
    with RecordingProxy(orthanc_with_paging.dicomweb_url) as proxy:
        studies = DicomWebSource(proxy.url, page_size=2).studies(PAGING_SCOPE)

    assert studies == list(expected)
    assert len(_study_searches(proxy)) <= 2 * PAGING_CR_STUDIES + 2


@pytest.mark.parametrize(
    "ignored", [{"offset"}, {"limit"}, {"offset", "limit"}], ids=["offset", "limit", "both"]
)
def test_a_server_that_ignores_paging_neither_loops_nor_duplicates_nor_misses(
    orthanc_with_paging: OrthancServer, expected: dict[str, list[str]], ignored: set[str]
) -> None:
    with RecordingProxy(orthanc_with_paging.dicomweb_url, strip_params=frozenset(ignored)) as proxy:
        found = _everything(DicomWebSource(proxy.url, page_size=2))

    assert found == expected  # all studies and all five instances of the first, once each
    searches = _study_searches(proxy)
    assert len(searches) <= 2 * PAGING_CR_STUDIES + 2
    first = next(iter(expected))
    listings = [  # QIDO-RS series and instance searches of the five-instance study
        r
        for r in proxy.requests
        if first in r.path and r.path.rstrip("/").endswith(("/series", "/instances"))
    ]
    assert len(listings) <= 2 * PAGING_FIRST_STUDY_INSTANCES + 4


def test_exactly_the_cap_is_proven_complete_by_splitting_the_date_range(
    orthanc_with_paging: OrthancServer, expected: dict[str, list[str]]
) -> None:
    # Orthanc's misapplied offset leaves a full answer at the cap that cannot show whether
    # more studies match; the source searches each half of the date window instead.
    scope = dataclasses.replace(PAGING_SCOPE, max_studies=PAGING_CR_STUDIES)
    with RecordingProxy(orthanc_with_paging.dicomweb_url) as proxy:
        studies = DicomWebSource(proxy.url, page_size=2).studies(scope)

    assert studies == list(expected)
    windows = {dict(r.query)["StudyDate"] for r in _study_searches(proxy)}
    assert "20200101-20201231" in windows
    assert len(windows) > 1
    assert all(int(dict(r.query)["limit"]) <= PAGING_CR_STUDIES for r in _study_searches(proxy))


def test_a_server_that_ignores_query_keys_is_refused(orthanc_with_paging: OrthancServer) -> None:
    # Without ModalitiesInStudy, Orthanc answers with the DX study too: the answer does not
    # match the query, so the source stops instead of paging through the whole archive.
    with RecordingProxy(
        orthanc_with_paging.dicomweb_url, strip_params=frozenset({"ModalitiesInStudy"})
    ) as proxy:
        source = DicomWebSource(proxy.url)

        with pytest.raises(RemoteError, match="do not match"):
            source.studies(PAGING_SCOPE)


def test_more_matching_studies_than_the_cap_are_refused_without_asking_for_more(
    orthanc_with_paging: OrthancServer,
) -> None:
    scope = dataclasses.replace(PAGING_SCOPE, max_studies=5)
    with RecordingProxy(orthanc_with_paging.dicomweb_url) as proxy:
        source = DicomWebSource(proxy.url, page_size=2)

        with pytest.raises(ScopeError, match="more than max_studies"):
            source.studies(scope)

    assert all(int(dict(r.query)["limit"]) <= 5 for r in _study_searches(proxy))


# -- PHI never logged ------------------------------------------------------------------------


def test_qido_answers_and_identifiers_are_never_logged(
    orthanc_with_paging: OrthancServer,
    paging_archive: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets: set[str] = set()
    for path in paging_archive.iterdir():
        ds = read(path, header_only=True)
        secrets |= {str(ds.PatientName), ds.PatientID, ds.AccessionNumber}
        secrets |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    caplog.set_level(logging.DEBUG)
    source = DicomWebSource(orthanc_with_paging.dicomweb_url, page_size=2)

    found = _everything(source)
    logging.getLogger("urllib3.connectionpool").debug("control record outside a request")

    assert found
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "control record outside a request" in logged  # logging itself still works
    assert [s for s in secrets if s in logged] == []


# -- authentication ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_orthanc(
    tmp_path_factory: pytest.TempPathFactory, paging_archive: Path
) -> Iterator[OrthancServer]:
    """A second Orthanc that requires HTTP Basic credentials."""
    try:
        server = start_orthanc(
            tmp_path_factory.mktemp("orthanc-basic"), username=USER, password=PASSWORD
        )
    except FileNotFoundError as exc:
        pytest.skip(f"Orthanc is not installed: {exc}")
    with server:
        upload_folder(server, paging_archive)
        yield server


def test_basic_auth(basic_orthanc: OrthancServer, expected: dict[str, list[str]]) -> None:
    source = DicomWebSource(basic_orthanc.dicomweb_url, auth=BasicAuth(USER, PASSWORD))

    assert _everything(source) == expected


@pytest.mark.parametrize("auth", [BasicAuth(USER, "wrong-password-123"), None])
def test_basic_auth_refused(basic_orthanc: OrthancServer, auth: BasicAuth | None) -> None:
    source = DicomWebSource(basic_orthanc.dicomweb_url, auth=auth)

    with pytest.raises(RemoteError, match=r"HTTP 401.*credentials") as failed:
        source.studies(PAGING_SCOPE)

    assert "wrong-password" not in str(failed.value)


def test_bearer_token(orthanc_with_paging: OrthancServer, expected: dict[str, list[str]]) -> None:
    with RecordingProxy(orthanc_with_paging.dicomweb_url, require_bearer=TOKEN) as proxy:
        found = _everything(DicomWebSource(proxy.url, auth=BearerToken(TOKEN)))

    assert found == expected
    assert {r.authorization for r in proxy.requests} == {f"Bearer {TOKEN}"}


def test_bearer_token_refused(orthanc_with_paging: OrthancServer) -> None:
    with RecordingProxy(orthanc_with_paging.dicomweb_url, require_bearer=TOKEN) as proxy:
        source = DicomWebSource(proxy.url, auth=BearerToken("not-the-token"))

        with pytest.raises(RemoteError, match="HTTP 401") as failed:
            source.studies(PAGING_SCOPE)

    assert "not-the-token" not in str(failed.value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_gateway(orthanc_with_paging: OrthancServer, pki: Pki) -> Iterator[RecordingProxy]:
    """HTTPS in front of Orthanc that requires a client certificate from the test CA."""
    tls = ProxyTls(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with RecordingProxy(orthanc_with_paging.dicomweb_url, tls=tls) as proxy:
        yield proxy


def test_client_certificate_with_a_custom_ca(
    tls_gateway: RecordingProxy,
    pki: Pki,
    expected: dict[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests lets this variable override a session's CA bundle; the source must not.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.other_ca))
    source = DicomWebSource(
        tls_gateway.url, auth=ClientCert(pki.client_cert, pki.client_key, ca=pki.ca)
    )

    found = _everything(source)

    assert tls_gateway.url.startswith("https://")
    assert found == expected


@pytest.mark.parametrize(
    "client",
    ["no client certificate", "certificate from another CA", "server checked with another CA"],
)
def test_tls_failures_are_remote_errors_and_nothing_is_sent(
    tls_gateway: RecordingProxy, pki: Pki, client: str
) -> None:
    if client == "no client certificate":
        source = DicomWebSource(tls_gateway.url, ca_bundle=pki.ca, attempts=1)
    elif client == "certificate from another CA":
        auth = ClientCert(pki.other_client_cert, pki.other_client_key, ca=pki.ca)
        source = DicomWebSource(tls_gateway.url, auth=auth, attempts=1)
    else:
        auth = ClientCert(pki.client_cert, pki.client_key, ca=pki.other_ca)
        source = DicomWebSource(tls_gateway.url, auth=auth, attempts=1)

    with pytest.raises(RemoteError, match="PACS"):
        source.studies(PAGING_SCOPE)

    assert tls_gateway.requests == []  # the handshake failed: no HTTP request was read


# -- configuration and errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "auth", "message"),
    [
        ("http://pacs.example.org/dicom-web", BasicAuth(USER, PASSWORD), "unencrypted"),
        ("http://10.1.2.3/dicom-web", BearerToken(TOKEN), "unencrypted"),
        ("http://127.0.0.1/dicom-web", ClientCert(Path("c.pem"), Path("k.pem")), "https"),
        ("pacs.example.org/dicom-web", None, "http:// or https://"),
        ("http://127.0.0.1/dicom-web", BasicAuth(USER, ""), "username and a password"),
    ],
)
def test_unsafe_or_broken_settings_are_refused(
    url: str, auth: BasicAuth | BearerToken | ClientCert | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        DicomWebSource(url, auth=auth)


def test_secrets_are_not_in_reprs() -> None:
    assert PASSWORD not in repr(BasicAuth(USER, PASSWORD))
    assert TOKEN not in repr(BearerToken(TOKEN))


def test_an_unreachable_pacs_is_a_remote_error_without_the_query() -> None:
    source = DicomWebSource(f"http://127.0.0.1:{free_port()}/dicom-web", attempts=2)

    with pytest.raises(RemoteError, match="cannot reach the PACS") as failed:
        source.studies(PAGING_SCOPE)

    assert "ModalitiesInStudy" not in str(failed.value)
    assert "2020" not in str(failed.value)
