"""Template filling keeps everything but the filled fields byte for byte."""

from __future__ import annotations

import difflib
import re

import pytest

from conveyor.publish.template import (
    Setting,
    Template,
    TemplateError,
    format_field_path,
    parse_field_path,
)
from tests.unit.conftest import EXAMPLE_APPS


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line.startswith(("+", "-")) and not line.startswith(("+++", "---"))
    ]


@pytest.mark.parametrize("app", ["ui", "api", "worker"])
def test_untouched_round_trip_is_identical(app: str) -> None:
    text = (EXAMPLE_APPS / app / ".flux.yaml").read_text()
    assert Template(text, source=".flux.yaml").render() == text


def test_other_indentation_styles_round_trip() -> None:
    text = (
        "kind: HelmRelease\nmetadata:\n    name: x   # four spaces\nspec:\n    valuesFrom:\n"
        "    - name: a\n      key: 'b'\n    values: {a: 1}\n"
    )
    assert Template(text, source="t").render() == text


def test_only_filled_fields_change_and_quoting_survives() -> None:
    text = (
        "---\n"
        "kind: HelmRelease\n"
        "metadata:\n"
        "  name: ui\n"
        "  annotations:\n"
        '    fluxcd.io/automated: "true"\n'
        "    filter.fluxcd.io/chart-image: 'FILLED_IN_BY_CI'\n"
        "spec:\n"
        "  values:\n"
        "    replicaCount: FILLED_IN_BY_CI  # how many\n"
        "    list:\n"
        "      - name: first\n"
        "# filled in by CI. do not modify.\n"
    )
    template = Template(text, source="t")
    template.assign(Setting.parse("HelmRelease:spec.values.replicaCount=3"))
    template.assign(
        Setting.parse("HelmRelease/ui:metadata.annotations[filter.fluxcd.io/chart-image]=glob:x-*")
    )
    template.assign(Setting.parse("HelmRelease:spec.values.list.0.name=renamed"))
    template.assign(Setting.parse("HelmRelease:metadata.labels.sandboxId=123"))
    out = template.render()
    assert sorted(changed_lines(text, out)) == sorted(
        [
            "-    filter.fluxcd.io/chart-image: 'FILLED_IN_BY_CI'",
            "-    replicaCount: FILLED_IN_BY_CI  # how many",
            "+    filter.fluxcd.io/chart-image: 'glob:x-*'",
            "+    replicaCount: 3                # how many",
            "-      - name: first",
            "+      - name: renamed",
            "+  labels:",
            '+    sandboxId: "123"',
        ]
    )
    assert out.endswith("# filled in by CI. do not modify.\n")
    assert template.leftover_markers() == []


def test_flux_v2_setter_gets_version_and_namespace() -> None:
    text = (EXAMPLE_APPS / "api" / ".flux.yaml").read_text()
    template = Template(text, source=".flux.yaml")
    template.fill_shortcuts(
        version="1.2.3",
        namespace="api-default",
        replicas=2,
        tag_filter=None,
        policy={"semver": {"range": ">=0.0.0"}},
        chart_ref="abc1234",
    )
    out = template.render()
    assert re.search(r'\n      tag: 1\.2\.3 +# \{"\$imagepolicy": "api-default:api:tag"\}\n', out)
    assert "    commit: abc1234\n" in out
    assert "  policy:\n    semver:\n      range: '>=0.0.0'\n" in out
    # The automation's source lives in flux-system: a namespace fill must not move it.
    assert "    namespace: flux-system\n" in out
    left = template.leftover_markers()
    assert "ImageUpdateAutomation/api spec.update.path" in left
    assert "HelmRelease/api spec.values.clusterEnv" in left


def test_leftover_setter_comment_is_reported() -> None:
    text = (
        "kind: HelmRelease\nspec:\n  values:\n"
        '    tag: 1.0.0 # {"$imagepolicy": "FILLED_IN_BY_CI:ui:tag"}\n'
    )
    assert Template(text, source="t").leftover_markers() == [
        "HelmRelease spec.values.tag (image policy comment)"
    ]


def test_field_paths_round_trip() -> None:
    path = parse_field_path("metadata.annotations[filter.fluxcd.io/chart-image]")
    assert path == ("metadata", "annotations", "filter.fluxcd.io/chart-image")
    assert format_field_path(path) == "metadata.annotations[filter.fluxcd.io/chart-image]"
    assert parse_field_path("spec.valuesFrom.0.name") == ("spec", "valuesFrom", 0, "name")


@pytest.mark.parametrize("bad", ["", "a..b", "a.", ".a", "a]b"])
def test_bad_field_paths_are_refused(bad: str) -> None:
    with pytest.raises(TemplateError, match="bad field path"):
        parse_field_path(bad)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("spec.values.x=1", "must look like Kind"),
        ("HelmRelease:spec.values.x", "must look like Kind"),
        ("Deployment:spec.replicas=1", "no Deployment documents"),
        ("HelmRelease:spec.chart.git.deeper=1", "spec.chart.git is a value"),
        ("HelmRelease:spec.valuesFrom.5.name=x", "index 5 past the end"),
    ],
)
def test_bad_settings_name_the_problem(setting: str, message: str) -> None:
    template = Template((EXAMPLE_APPS / "ui" / ".flux.yaml").read_text(), source=".flux.yaml")
    with pytest.raises(TemplateError, match=message):
        template.assign(Setting.parse(setting))


def test_ambiguous_document_must_be_named() -> None:
    text = "kind: ConfigMap\nmetadata:\n  name: a\n---\nkind: ConfigMap\nmetadata:\n  name: b\n"
    template = Template(text, source="t")
    with pytest.raises(TemplateError, match=r"2 ConfigMap documents.*Kind/name"):
        template.assign(Setting.parse("ConfigMap:data.x=1"))
    template.assign(Setting.parse("ConfigMap/b:data.x=1"))
    assert template.render().endswith("  name: b\ndata:\n  x: 1\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "is not a mapping"),
        ("# only a comment\n", "no YAML documents"),
    ],
)
def test_malformed_templates_are_refused(text: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        Template(text, source="t")


def test_keys_added_by_values_land_above_the_trailing_do_not_modify_comment() -> None:
    text = (EXAMPLE_APPS / "ui" / ".flux.yaml").read_text()
    assert text.endswith("# filled in by CI. do not modify.\n")
    template = Template(text, source=".flux.yaml")
    template.assign(Setting.from_target("HelmRelease:spec.values.newKey", "added"))
    template.assign(Setting.from_target("HelmRelease:spec.values.service.extra", 1))
    out = template.render()
    assert out.endswith("    newKey: added\n# filled in by CI. do not modify.\n"), out[-200:]
    assert "      port: 3000\n      extra: 1\n" in out
    assert out.count("# filled in by CI. do not modify.") == 1


@pytest.mark.parametrize(
    "value", ["FILL_ME_IN", "${REGISTRY}", "@REGISTRY@", "{{ .Values.tag }}", "CHANGEME"]
)
def test_values_that_look_like_other_placeholders_are_reported(value: str) -> None:
    text = f'kind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: "{value}"\n  b: AWS_REGION\n'
    assert Template(text, source="t.yaml").lookalike_markers(known=[]) == [
        f"ConfigMap/c data.a: {value}"
    ]
    assert Template(text, source="t.yaml").lookalike_markers(known=[value]) == []
