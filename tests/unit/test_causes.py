"""A failure's cause in one line and its full text capped (conveyor.causes), as the API
server's Status and a status's message use them. The same failures on the sandbox:
tests/cluster/test_readable_errors.py."""

from __future__ import annotations

import json

from conveyor.causes import CAUSE_LIMIT, DETAILS_LIMIT, capped, drop_long_values, short_cause
from conveyor.cluster.apply import ApplyError
from conveyor.cluster.client import ApiError
from conveyor.cluster.objects import ObjectRef
from conveyor.reconcile.status import AppStatus

TEMPLATE = {
    "labels": {"job-name": "migrate", "controller-uid": "9e013859-cbf4-472f-8e99-a7928fff42ae"},
    "Spec": {"Containers": [{"Name": "main", "Image": "registry.local/migrate:2", "Env": None}]},
}
# What kube-apiserver 1.36 answers to a changed Job template (a 422, the value quoted).
IMMUTABLE = {
    "kind": "Status",
    "status": "Failure",
    "reason": "Invalid",
    "code": 422,
    "message": f'Job.batch "migrate" is invalid: spec.template: Invalid value: '
    f"{json.dumps(TEMPLATE)}: field is immutable",
    "details": {
        "name": "migrate",
        "kind": "Job",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": f"Invalid value: {json.dumps(TEMPLATE)}: field is immutable",
                "field": "spec.template",
            }
        ],
    },
}


def test_a_long_refused_value_is_left_out_and_a_short_one_kept() -> None:
    assert drop_long_values(IMMUTABLE["message"]) == (  # type: ignore[arg-type]
        'Job.batch "migrate" is invalid: spec.template: field is immutable'
    )
    go_literal = (
        "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string"
        '{"app":"web2", "tier": "a: b"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: '
        "field is immutable"
    )
    assert drop_long_values(go_literal) == "spec.selector: field is immutable"
    quoted = 'metadata.name: Invalid value: "' + "x" * 100 + '": must be no more than 63'
    assert drop_long_values(quoted) == "metadata.name: must be no more than 63"
    short = 'spec.replicas: Invalid value: -1: must be greater than or equal to 0; name: Invalid value: "Bad_Name": a lowercase RFC 1123 label'  # noqa: E501
    assert drop_long_values(short) == short
    assert drop_long_values("Invalid value: {unbalanced") == "Invalid value: {unbalanced"


def test_a_cause_is_one_line_and_capped() -> None:
    lines = "admission webhook denied the request:\n\nresource blocked\n  rule: 'no'\n"
    assert short_cause(lines) == "admission webhook denied the request: resource blocked rule: 'no'"
    assert short_cause("a\x00b") == "a\\x00b"
    long = short_cause("why " * 400)
    assert len(long) == CAUSE_LIMIT and long.endswith("...")
    decoded = (
        'Deployment in version "v1" cannot be handled as a Deployment: json: cannot unmarshal '
        "string into Go struct field DeploymentSpec.spec.replicas of type int32"
    )
    assert short_cause(decoded).endswith(": spec.replicas: cannot unmarshal string into int32")
    assert capped("x" * 10, 10) == "x" * 10
    cut = capped("x" * 10_000)
    kept = cut.index(".")
    assert len(cut) <= DETAILS_LIMIT and cut.endswith(f"... ({10_000 - kept} more characters)")


def test_an_api_error_is_said_by_its_causes_and_an_apply_error_keeps_the_full_text() -> None:
    error = ApiError(422, "Invalid", str(IMMUTABLE["message"]), body=IMMUTABLE)
    assert error.cause == "spec.template: field is immutable"
    plain = ApiError(403, "Forbidden", 'admission webhook "x" denied the request:\n\nno\n')
    assert plain.cause == 'admission webhook "x" denied the request: no'
    ref = ObjectRef("batch/v1", "Job", "prod", "migrate")
    applied = ApplyError.of([(ref, error)])
    assert str(applied) == "Job prod/migrate: spec.template: field is immutable"
    assert applied.details.startswith("Job prod/migrate: HTTP 422 Invalid: Job.batch")
    assert '"Image": "registry.local/migrate:2"' in applied.details
    secret = ObjectRef("v1", "Secret", "prod", "db")
    quoting = ApiError(422, "Invalid", 'Secret "db" is invalid: data[token]: Invalid value')
    # A Secret's details are its cause alone: never more of what the server quoted.
    assert ApplyError.of([(secret, quoting)]).details == f"{secret}: {quoting.cause}"


def test_a_status_message_is_one_line_and_the_full_text_goes_to_details() -> None:
    status = AppStatus(scope="prod", app="migrate")
    status.set_message("Job prod/migrate: spec.template: field is immutable", details="HTTP 422")
    assert (status.message, status.details) == (
        "Job prod/migrate: spec.template: field is immutable",
        "HTTP 422",
    )
    status.set_message("line one\nline two")
    assert (status.message, status.details) == ("line one line two", "line one\nline two")
    status.set_message("applied revision abc", details="applied revision abc")
    assert status.details is None  # nothing more to say
    status.set_message("x" * 5000)
    assert len(status.message) == CAUSE_LIMIT and len(str(status.details)) <= DETAILS_LIMIT
    assert str(status.details).startswith("x" * 4000)
    body = status.status_body()
    assert body["details"] == status.details
    assert AppStatus.from_object({"spec": {}, "status": body}).details == status.details
