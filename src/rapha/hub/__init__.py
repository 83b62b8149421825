"""The hub: FastAPI app, database, routing and job services (DESIGN.md, "Parts").

* :mod:`rapha.hub.settings`: typed ``hub.toml`` that refuses default secrets;
* :mod:`rapha.hub.db`: SQLAlchemy 2 models and Alembic migrations (SQLite, PostgreSQL);
* :mod:`rapha.hub.auth`: API keys and node request signatures;
* :mod:`rapha.hub.services`: who may do what (the service layer), the operator's audit
  trail;
* :mod:`rapha.hub.stores`: the attestation verifier's stores on the database;
* :mod:`rapha.hub.artifacts`: content-addressed bundles and outboxes;
* :mod:`rapha.hub.profiles`: the dataset profiles nodes publish, and the matcher;
* :mod:`rapha.hub.jobs`: the job lifecycle, leases and fencing tokens;
* :mod:`rapha.hub.settlement`: deposits seen on chain, verified delivery, settlement and
  the release of results;
* :mod:`rapha.hub.app`: the HTTP API.
"""

__all__: list[str] = []
