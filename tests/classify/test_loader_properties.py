"""Policy files round-trip through the loader; broken ones fail with a ``PolicyError`` (issue #9).

The loader compiles YAML into frozen dataclasses and throws the YAML away, so a round trip needs
the inverse: :func:`document_of` writes a compiled ``Policy`` back as a policy document. Then
``load(dump(load(f))) == load(f)`` says compilation keeps everything the classifier and proxy use,
and does so the same way every time. Documents are drawn from strategies keyed by the pydantic
models of ``revive/classify/schema.py`` (:func:`model_doc` refuses a model whose fields the
strategy does not cover, so a new schema field cannot slip past these tests). Broken documents
are valid ones with one mutation: an unknown key or a wrong type at any model field, found by
walking the document alongside the models.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from revive.classify import FailureClass, HeaderStamp, Policy, load_policies, load_policy
from revive.classify.classifier import (
    BodySource,
    HeaderSource,
    JsonSource,
    LiteralSource,
    Rule,
    Source,
)
from revive.classify.model import KEY_PLACEHOLDER
from revive.classify.schema import (
    ClassifyModel,
    ExceptionModel,
    HeaderStampModel,
    JsonBodyStampModel,
    LookupModel,
    MutatingModel,
    PolicyModel,
    ProbeModel,
    ReconcileModel,
    RetryModel,
    RuleModel,
    SourceModel,
    WhenModel,
    parse_status,
)
from revive.errors import PolicyError

POLICY_DIR = Path(__file__).parents[2] / "policies"
SHIPPED = sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))
PROPS = settings(max_examples=120, deadline=None, derandomize=True, database=None)


# -- compiled policy → document ---------------------------------------------------------------


def pointer(tokens: tuple[str, ...]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _source_doc(source: Source) -> dict[str, Any]:
    match source:
        case JsonSource(tokens, match, fmt):
            doc: dict[str, Any] = {"json": pointer(tokens)}
            if match is not None:
                doc["match"] = match.pattern
            if fmt is not None:
                doc["format"] = fmt
            return doc
        case BodySource(pattern):
            return {"body": pattern.pattern}
        case HeaderSource(name, pattern):
            return {"header": name} | ({"regex": pattern.pattern} if pattern else {})
        case LiteralSource(value):
            return {"literal": value}
    raise AssertionError(f"unknown source {source!r}")


def _rule_doc(rule: Rule) -> dict[str, Any]:
    when: dict[str, Any] = {}
    if rule.statuses is not None:
        when["status"] = sorted(rule.statuses)
    if rule.headers:
        when["header"] = {name: rx.pattern for name, rx in rule.headers}
    if rule.json_equals:
        when["json"] = {pointer(t): list(v) for t, v in rule.json_equals}
    if rule.json_regex:
        when["json_regex"] = {pointer(t): rx.pattern for t, rx in rule.json_regex}
    if rule.body is not None:
        when["body"] = rule.body.pattern
    if rule.code_in is not None:
        when["code_in"] = sorted(rule.code_in)
    doc = {"id": rule.id, "when": when, "class": rule.failure_class.value}
    return doc | ({"code": [_source_doc(s) for s in rule.own_code]} if rule.own_code else {})


def document_of(policy: Policy, defaults: Policy | None = None) -> dict[str, Any]:
    """The policy document that loads (with ``defaults``) into ``policy``; only what it holds."""
    c = policy.classifier
    inherited_code = len(defaults.classifier.code) if defaults else 0
    inherited_message = len(defaults.classifier.message) if defaults else 0
    own = dict(c.own_counts)
    doc: dict[str, Any] = {
        "retry": asdict(policy.retry),
        "mutating": {
            "methods": sorted(policy.mutating_methods),
            "except": [{"method": m, "path": rx.pattern} for m, rx in policy.mutating_exceptions],
        },
        "idempotency_header": policy.idempotency_header,
        "inspect_success_bodies": policy.inspect_success_bodies,
        "refresh_token_rotates": policy.refresh_token_rotates,
        "probe": None if policy.probe is None else {
            "method": policy.probe.method, "path": policy.probe.path,
            "expect_status": list(policy.probe.expect_status),
        },
        "reconcile": [],
        "code": [_source_doc(s) for s in c.code[: len(c.code) - inherited_code]],
        "message": [_source_doc(s) for s in c.message[: len(c.message) - inherited_message]],
        "classify": {p.value: [_rule_doc(r) for r in c.rules(p)[: own[p]]] for p in own},
    }
    for r in policy.reconcile:
        stamp = (
            {"kind": "header", "name": r.stamp.name, "value": r.stamp.value}
            if isinstance(r.stamp, HeaderStamp)
            else {"kind": "json_body", "pointer": r.stamp.pointer, "entry": r.stamp.entry}
        )
        lk = r.lookup
        doc["reconcile"].append({
            "name": r.name, "method": r.method, "path": r.path.pattern, "stamp": stamp,
            "lookup": {"method": lk.method, "path": lk.path, "query": dict(lk.query),
                       "found_when_nonempty": lk.found_pointer, "attempts": lk.attempts,
                       "interval_s": lk.interval_s},
            "committed_status": r.committed_status,
        })
    return doc


def dump(doc: Any) -> str:
    # sort_keys=False: the order of conditions and sources is part of the compiled policy
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def write(path: Path, doc: Any) -> Path:
    path.write_text(dump(doc), encoding="utf-8")
    return path


def same(a: Policy, b: Policy) -> bool:
    return a == replace(b, file=a.file)


# -- strategies, keyed by the schema models ---------------------------------------------------


def model_doc(
    model: type[BaseModel], require: tuple[str, ...] = (), /, **fields: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """A document strategy for ``model``: one strategy per field (by alias), no more, no less.

    ``require`` makes optional fields always present (a model validator may need them).
    """
    by_alias = {f.alias or name: f for name, f in model.model_fields.items()}
    if set(fields) != set(by_alias):
        raise AssertionError(f"{model.__name__}: strategies for {sorted(fields)}, "
                             f"fields {sorted(by_alias)}")
    needed = {k for k, f in by_alias.items() if f.is_required()} | set(require)
    required = {k: s for k, s in fields.items() if k in needed}
    optional = {k: s for k, s in fields.items() if k not in needed}
    return st.fixed_dictionaries(required, optional=optional)


text = st.text(st.characters(codec="utf-8"), max_size=12)
regex = st.one_of(
    text.map(re.escape),
    st.sampled_from(["", r"^\s*<", r"(?i)rate limit", r"\b(AADSTS\d+)", r"\berror=\"?(\w+)",
                     r"^(?i:Throttled|Busy)$", "."]),
)
token = st.text(st.characters(codec="utf-8"), max_size=6)
pointers = st.lists(token, max_size=3).map(lambda ts: pointer(tuple(ts)))
rule_id = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,10}\Z")
method = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "REPORT"])
path = st.text(max_size=10).map(lambda t: "/" + t)
code = st.integers(1, 5)
status_item = st.one_of(
    st.integers(100, 599),
    code.map(lambda n: f"{n}xx"),
    st.tuples(st.integers(100, 599), st.integers(0, 99)).map(
        lambda t: f"{t[0]}-{min(599, t[0] + t[1])}"
    ),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
header_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)


def unique_lower(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    # header names are compared lower-cased, so 'A' and 'a' would be one condition twice
    return st.lists(st.tuples(header_names, values), max_size=3,
                    unique_by=lambda kv: kv[0].lower()).map(dict)


when = model_doc(
    WhenModel,
    status=st.one_of(status_item, st.lists(status_item, min_size=1, max_size=3)),
    header=unique_lower(regex),
    json=st.dictionaries(pointers, st.one_of(scalar, st.lists(scalar, max_size=3)), max_size=3),
    json_regex=st.dictionaries(pointers, regex, max_size=2),
    body=regex,
    code_in=st.lists(st.one_of(text, st.integers()), max_size=3),
)
source = st.one_of(
    # exactly one kind per source: the json kind here (it alone takes match/format), the rest below
    model_doc(SourceModel, ("json",), json=pointers, match=regex,
              format=text.map(lambda t: t + "{}"), body=st.nothing(), header=st.nothing(),
              regex=st.nothing(), literal=st.nothing()),
    st.builds(lambda b: {"body": b}, regex),
    st.builds(lambda h, r: {"header": h} | ({"regex": r} if r is not None else {}),
              header_names, st.none() | regex),
    st.builds(lambda v: {"literal": v}, text),
)
sources = st.one_of(source, st.lists(source, max_size=3))
rule = model_doc(
    RuleModel, id=rule_id, when=when, **{"class": st.sampled_from([c.value for c in FailureClass])},
    code=st.none() | sources, note=st.none() | text,
)
rules = st.lists(rule, max_size=4, unique_by=lambda r: r["id"])
floats = st.floats(min_value=0, allow_nan=False)
stamp = st.one_of(
    model_doc(HeaderStampModel, kind=st.just("header"), name=st.from_regex(r"\A[A-Za-z0-9-]+\Z"),
              value=text.map(lambda t: t + KEY_PLACEHOLDER)),
    model_doc(JsonBodyStampModel, kind=st.just("json_body"), pointer=pointers,
              entry=st.dictionaries(text, scalar, max_size=2).map(
                  lambda d: d | {"value": KEY_PLACEHOLDER})),
)
lookup = model_doc(
    LookupModel, method=method, path=path.map(lambda p: p + KEY_PLACEHOLDER),
    query=st.dictionaries(text, text, max_size=2), found_when_nonempty=pointers,
    attempts=st.integers(1, 20), interval_s=floats,
)
reconcile = model_doc(
    ReconcileModel, name=rule_id, method=method, path=regex, stamp=stamp, lookup=lookup,
    committed_status=st.integers(200, 299),
)
policy_docs = model_doc(
    PolicyModel,
    description=st.none() | text,
    retry=model_doc(RetryModel, attempts=st.integers(1, 20), base_backoff_s=floats,
                    max_backoff_s=floats, honour_retry_after=st.booleans(),
                    max_retry_after_s=floats),
    mutating=model_doc(MutatingModel, methods=st.lists(method, max_size=3),
                       **{"except": st.lists(model_doc(ExceptionModel, method=method, path=regex),
                                             max_size=2)}),
    idempotency_header=st.none() | header_names,
    inspect_success_bodies=st.booleans(),
    refresh_token_rotates=st.booleans(),
    probe=st.none() | model_doc(ProbeModel, method=method, path=path,
                                expect_status=st.lists(st.integers(100, 599), min_size=1,
                                                       max_size=3)),
    reconcile=st.lists(reconcile, max_size=2, unique_by=lambda r: r["name"]),
    code=sources,
    message=sources,
    classify=model_doc(ClassifyModel, api_call=rules, token_refresh=rules),
)


@pytest.fixture(scope="module")
def oauth2() -> Policy:
    return load_policy(POLICY_DIR / "oauth2.yaml")


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_round_trips(name: str, oauth2: Policy, tmp_path: Path) -> None:
    """load → dump → load gives an equal policy, alone and on top of the oauth2 defaults."""
    for defaults in (None, None if name == "oauth2" else oauth2):
        first = load_policy(POLICY_DIR / f"{name}.yaml", defaults)
        doc = document_of(first, defaults)
        second = load_policy(write(tmp_path / f"{name}.yaml", doc), defaults)
        assert same(first, second)
        assert document_of(second, defaults) == doc


def test_round_trip_through_load_policies(tmp_path: Path) -> None:
    shipped = load_policies(POLICY_DIR)
    defaults = shipped["oauth2"]
    for name, policy in shipped.items():
        doc = document_of(policy, None if name == "oauth2" else defaults)
        write(tmp_path / f"{name}.yaml", doc)
    again = load_policies(tmp_path)
    assert set(again) == set(shipped)
    assert all(same(shipped[n], again[n]) for n in shipped)


def test_generated_documents_round_trip(oauth2: Policy, tmp_path_factory: pytest.TempPathFactory
                                        ) -> None:
    where = tmp_path_factory.mktemp("generated") / "acme.yaml"

    @PROPS
    @given(doc=policy_docs, with_defaults=st.booleans())
    def check(doc: dict[str, Any], with_defaults: bool) -> None:
        defaults = oauth2 if with_defaults else None
        first = load_policy(write(where, doc), defaults)
        _assert_reflects(first, doc)
        dumped = document_of(first, defaults)
        second = load_policy(write(where, dumped), defaults)
        assert same(first, second)
        assert document_of(second, defaults) == dumped

    check()


def _assert_reflects(policy: Policy, doc: dict[str, Any]) -> None:
    """The compiled policy says what the document said (not only what it says of itself)."""
    model = PolicyModel.model_validate(doc)
    assert asdict(policy.retry) == model.retry.model_dump()
    assert policy.mutating_methods == frozenset(model.mutating.methods)
    assert [r.name for r in policy.reconcile] == [r.name for r in model.reconcile]
    for phase, count in policy.classifier.own_counts:
        written = getattr(model.classify, phase.value)
        compiled = policy.classifier.rules(phase)[:count]
        assert [(r.id, r.failure_class) for r in compiled] == [(w.id, w.class_) for w in written]
        for r, w in zip(compiled, written):
            items = w.when.status if isinstance(w.when.status, list) else [w.when.status]
            expected = None if w.when.status is None else {
                s for item in items for s in parse_status(item)
            }
            assert r.statuses == expected


# -- broken documents ---------------------------------------------------------------------------


def _models(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model an annotation can hold, in declaration order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models(arg) if m not in found]
    return found


def _fits(model: type[BaseModel], value: dict[str, Any]) -> bool:
    kind = model.model_fields.get("kind")
    return kind is None or value.get("kind") in typing.get_args(kind.annotation)


def model_nodes(
    model: type[BaseModel], doc: dict[str, Any], at: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], type[BaseModel], dict[str, Any]]]:
    """Every mapping in ``doc`` that a schema model validates: (path, model, mapping)."""
    yield at, model, doc
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    for key, value in doc.items():
        if key in fields:
            yield from _nodes(fields[key].annotation, value, (*at, key))


def _nodes(annotation: Any, value: Any, at: tuple[str | int, ...]) -> Iterator[Any]:
    models = _models(annotation)
    if isinstance(value, dict):
        for model in models:
            if _fits(model, value):
                yield from model_nodes(model, value, at)
                return
    elif isinstance(value, list) and models:
        for i, item in enumerate(value):
            yield from _nodes(annotation, item, (*at, i))


def _aliases(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)


def _at(doc: Any, at: tuple[str | int, ...]) -> Any:
    for step in at:
        doc = doc[step]
    return doc


def _assert_names(exc: PolicyError, where: Path, at: tuple[str | int, ...], key: str) -> None:
    assert exc.file == str(where) and str(exc).startswith(str(where))
    top = at[0] if at else key
    if top == "classify" and len(at) >= 3:
        assert exc.rule.startswith(f"classify.{at[1]}[{at[2]}]"), exc
    elif top == "reconcile" and len(at) >= 2:
        assert exc.rule.startswith(f"reconcile[{at[1]}]"), exc
    else:
        assert exc.rule == top or exc.rule.startswith(f"{top}."), exc
    assert key in f"{exc.rule}: {exc.reason}", exc


WRONG_FOR_SCALAR: dict[str, Any] = {"~wrong~": [1]}
WRONG_FOR_CONTAINER = 12345
shipped_docs = st.sampled_from(
    [yaml.safe_load((POLICY_DIR / f"{name}.yaml").read_text("utf-8")) for name in SHIPPED]
)
some_docs = st.one_of(shipped_docs, policy_docs)


def test_mutated_documents_fail_naming_file_and_field(tmp_path_factory: pytest.TempPathFactory
                                                      ) -> None:
    where = tmp_path_factory.mktemp("mutated") / "acme.yaml"

    @PROPS
    @given(doc=some_docs, data=st.data(), unknown=st.booleans())
    def check(doc: dict[str, Any], data: st.DataObject, unknown: bool) -> None:
        doc = copy.deepcopy(doc)  # shipped documents are shared between examples
        nodes = list(model_nodes(PolicyModel, doc))
        if unknown:
            at, model, node = data.draw(st.sampled_from(nodes))
            key = data.draw(st.text(min_size=1, max_size=12).filter(
                lambda k: k not in _aliases(model)))
            node[key] = data.draw(scalar)
        else:
            # every field present but a stamp's free-form ``entry`` (Any accepts anything)
            fields = [(at, k) for at, model, node in nodes for k in node
                      if k in _aliases(model) and k != "entry"]
            assume(fields)
            at, key = data.draw(st.sampled_from(fields))
            node = _at(doc, at)
            node[key] = (WRONG_FOR_CONTAINER if isinstance(node[key], (dict, list))
                         else WRONG_FOR_SCALAR)
        with pytest.raises(PolicyError) as info:
            load_policy(write(where, doc))
        _assert_names(info.value, where, at, key)
        if unknown:
            assert f"unknown key {key!r}" in info.value.reason

    check()


garbage = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8")),
    policy_docs.map(dump).flatmap(
        lambda t: st.integers(0, len(t)).map(lambda n: t[:n].encode("utf-8"))  # truncated
    ),
    st.sampled_from([b"\xff\xfe", b"- a\n- b\n", b"42", b"key: [unclosed", b"\t- x:", b"a: *b"]),
)


def test_any_file_content_loads_or_raises_policy_error(tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    """Whatever is in the file, the loader answers a Policy or a PolicyError naming the file."""
    where = tmp_path_factory.mktemp("garbage") / "acme.yaml"

    @PROPS
    @given(content=garbage)
    def check(content: bytes) -> None:
        where.write_bytes(content)
        try:
            policy = load_policy(where)
        except PolicyError as exc:
            assert exc.file == str(where) and exc.rule and exc.reason
        else:
            assert isinstance(policy, Policy) and policy.name == "acme"

    check()


def test_non_mapping_documents_name_the_yaml(tmp_path: Path) -> None:
    for doc in ([1, 2], "text", 42):
        with pytest.raises(PolicyError) as info:
            load_policy(write(tmp_path / "acme.yaml", doc))
        assert (info.value.rule, info.value.reason) == ("yaml", "the top level must be a mapping")


def test_the_walker_sees_every_schema_model() -> None:
    """Guard the mutation test: a shipped file with reconcile reaches every kind of node."""
    docs = [yaml.safe_load((POLICY_DIR / f"{n}.yaml").read_text("utf-8")) for n in SHIPPED]
    seen = {model for doc in docs for _, model, _ in model_nodes(PolicyModel, doc)}
    assert {PolicyModel, RetryModel, MutatingModel, ExceptionModel, ProbeModel, ReconcileModel,
            JsonBodyStampModel, LookupModel, SourceModel, ClassifyModel, RuleModel,
            WhenModel} <= seen


# -- what these properties found, pinned ------------------------------------------------------


@pytest.mark.parametrize("key", ["int", "a(b)", ",", "list[x]"])
def test_an_unknown_key_that_looks_like_a_type_tag_is_still_named(key: str, tmp_path: Path
                                                                   ) -> None:
    """Keys matching pydantic's type-tag filter used to vanish: "policy: unknown key"."""
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path / "acme.yaml", {"retry": {key: 1}}))
    assert (info.value.rule, info.value.reason) == (f"retry.{key}", f"unknown key {key!r}")


def test_a_bad_source_in_a_list_names_its_key(tmp_path: Path) -> None:
    """``code: source | [source]``: the list branch's error is the one that helps."""
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path / "acme.yaml", {"code": [{"json": "/error", "jsn": 1}]}))
    assert info.value.rule == "code.0.jsn" and info.value.reason.startswith("unknown key 'jsn'")
