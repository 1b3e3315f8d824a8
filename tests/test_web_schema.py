"""Property-based run of the documented API (schemathesis): no server errors, one error shape."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from raresift.web import create_app  # noqa: E402


def test_every_documented_operation_answers_per_its_schema(embedded_project):
    project, _, _ = embedded_project
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", create_app(project, who="fuzz"))
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 10
    seen: dict[str, set[int]] = {}

    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            seen.setdefault(f"{case.method} {op.path}", set()).add(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
            if response.status_code >= 400:
                err = response.json()["error"]
                assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
            else:
                case.validate_response(response, checks=[response_schema_conformance])

        check()
    assert len(seen) == len(operations)
