"""Load ``policies/*.yaml`` once at start-up: validate, compile, fail loudly.

Every problem -- YAML syntax, unknown key, bad regex or JSON pointer, unknown class -- becomes
``PolicyError(file, rule, reason)``; pydantic and PyYAML exceptions never leave this module.
``oauth2.yaml`` holds the RFC 6749/6750 defaults: it is loaded first and its rules (and code
sources) are appended after every provider's own, so unmatched answers still get a class.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from revive.classify.classifier import (
    BodySource,
    Classifier,
    HeaderSource,
    JsonSource,
    LiteralSource,
    Rule,
    Source,
)
from revive.classify.model import (
    HeaderStamp,
    JsonBodyStamp,
    Lookup,
    Phase,
    Policy,
    ProbeSpec,
    ReconcileRule,
    RetryPolicy,
)
from revive.classify.pointer import compile_pointer
from revive.classify.schema import (
    HeaderStampModel,
    PolicyModel,
    ReconcileModel,
    RuleModel,
    SourceModel,
    WhenModel,
    parse_status,
)
from revive.errors import PolicyError

DEFAULTS_NAME = "oauth2"
_TYPE_TAG = re.compile(r"[\[\](),]|^(int|str|float|bool|list|dict|none|union)$")


def load_policies(policy_dir: Path) -> dict[str, Policy]:
    """Load every ``*.yaml`` in ``policy_dir``, keyed by file stem; ``oauth2`` is required.

    Raises:
        PolicyError: the directory or ``oauth2.yaml`` is missing, or any file is invalid.
    """
    policy_dir = Path(policy_dir)
    defaults_path = policy_dir / f"{DEFAULTS_NAME}.yaml"
    if not defaults_path.is_file():
        raise PolicyError(str(defaults_path), "file", "missing: the oauth2 defaults are required")
    defaults = load_policy(defaults_path)
    policies = {DEFAULTS_NAME: defaults}
    for path in sorted(policy_dir.glob("*.yaml")):
        if path.stem != DEFAULTS_NAME:
            policies[path.stem] = load_policy(path, defaults)
    return policies


def load_policy(path: Path, defaults: Policy | None = None) -> Policy:
    """Load one policy file; its name is the file stem.

    Args:
        path: the YAML file.
        defaults: a loaded policy (normally ``oauth2``) whose rules and code sources apply
            after this file's own; None loads the file alone.

    Raises:
        PolicyError: naming the file, the rule (or field) and the reason.
    """
    file = str(path)
    raw = _read_yaml(path)
    try:
        model = PolicyModel.model_validate(raw)
    except ValidationError as exc:
        rule, reason = _describe(exc, raw)
        raise PolicyError(file, rule, reason) from exc
    try:
        return _compile(path.stem, file, model, defaults)
    except (ValueError, re.error) as exc:  # validated above; kept as a guard with a clear name
        raise PolicyError(file, "compile", str(exc)) from exc


def _read_yaml(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(file, "file", f"cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(file, "yaml", f"YAML syntax error at {where}{problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PolicyError(file, "yaml", "the top level must be a mapping")
    return data


def _describe(exc: ValidationError, raw: dict[str, Any]) -> tuple[str, str]:
    """Turn pydantic's most specific error into (rule or field, readable reason)."""
    errors = exc.errors()
    # A union (``code: source | [source]``) reports one error per branch; the deepest one is
    # the branch that matched the input's shape and names the bad key, not "should be a list".
    err = max(errors, key=lambda e: len(e["loc"]))
    loc = [p for p in err["loc"] if isinstance(p, int) or not _TYPE_TAG.search(str(p))]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        key = err["loc"][-1]  # the user's own key: never drop it as a type tag ("int", "a(b)")
        if not loc or loc[-1] != key:
            loc.append(key)
        msg = f"unknown key {str(key)!r}"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    if loc and loc[0] == "classify" and len(loc) >= 3 and isinstance(loc[2], int):
        phase, index, rest = str(loc[1]), loc[2], loc[3:]
        section = raw.get("classify")
        rules = section.get(phase) if isinstance(section, dict) else None
        rule_id = _rule_id(rules, index)
        rule = f"classify.{phase}[{index}]" + (f" ({rule_id})" if rule_id else "")
        return rule, _join(rest, msg) + more
    if loc and loc[0] == "reconcile" and len(loc) >= 2 and isinstance(loc[1], int):
        return f"reconcile[{loc[1]}]", _join(loc[2:], msg) + more
    field = ".".join(str(p) for p in loc) or "policy"
    return field, msg + more


def _rule_id(rules: Any, index: int) -> str | None:
    if isinstance(rules, list) and 0 <= index < len(rules) and isinstance(rules[index], dict):
        rule_id = rules[index].get("id")
        return str(rule_id) if rule_id is not None else None
    return None


def _join(rest: list[Any] | tuple[Any, ...], msg: str) -> str:
    where = ".".join(str(p) for p in rest)
    return f"{where}: {msg}" if where else msg


# -- compilation -------------------------------------------------------------------------------


def _compile(name: str, file: str, model: PolicyModel, defaults: Policy | None) -> Policy:
    default_code: tuple[Source, ...] = ()
    default_message: tuple[Source, ...] = ()
    fallback: dict[Phase, tuple[Rule, ...]] = {Phase.API_CALL: (), Phase.TOKEN_REFRESH: ()}
    if defaults is not None:
        default_code = defaults.classifier.code
        default_message = defaults.classifier.message
        fallback = {p: defaults.classifier.rules(p) for p in Phase}
    policy_code = _sources(model.code) + default_code
    phases: dict[Phase, tuple[Rule, ...]] = {}
    counts = []
    for phase in Phase:
        own = tuple(_rule(name, r, policy_code) for r in getattr(model.classify, phase.value))
        # fallback rules keep their own code sources but prefer this provider's defaults
        inherited = tuple(replace(r, code=r.own_code + policy_code) for r in fallback[phase])
        phases[phase] = own + inherited
        counts.append((phase, len(own)))
    classifier = Classifier(
        policy=name,
        api_call=phases[Phase.API_CALL],
        token_refresh=phases[Phase.TOKEN_REFRESH],
        message=_sources(model.message) + default_message,
        code=policy_code,
        own_counts=tuple(counts),
        inspect_success_bodies=model.inspect_success_bodies,
    )
    mutating = model.mutating
    return Policy(
        name=name,
        file=file,
        retry=RetryPolicy(**model.retry.model_dump()),
        mutating_methods=frozenset(m.upper() for m in mutating.methods),
        idempotency_header=model.idempotency_header,
        inspect_success_bodies=model.inspect_success_bodies,
        refresh_token_rotates=model.refresh_token_rotates,
        reconcile=tuple(_reconcile(r) for r in model.reconcile),
        probe=(
            ProbeSpec(model.probe.method, model.probe.path, tuple(model.probe.expect_status))
            if model.probe
            else None
        ),
        classifier=classifier,
        mutating_exceptions=tuple((e.method, re.compile(e.path)) for e in mutating.except_),
    )


def _rule(policy: str, model: RuleModel, policy_code: tuple[Source, ...]) -> Rule:
    when: WhenModel = model.when
    own_code = _sources(model.code) if model.code is not None else ()
    return Rule(
        policy=policy,
        id=model.id,
        failure_class=model.class_,
        statuses=_statuses(when.status),
        headers=tuple((k.lower(), re.compile(v)) for k, v in when.header.items()),
        json_equals=tuple(
            (compile_pointer(p), tuple(v) if isinstance(v, list) else (v,))
            for p, v in when.json_.items()
        ),
        json_regex=tuple((compile_pointer(p), re.compile(v)) for p, v in when.json_regex.items()),
        body=re.compile(when.body) if when.body is not None else None,
        code_in=frozenset(str(c).upper() for c in when.code_in) if when.code_in else None,
        own_code=own_code,
        code=own_code + policy_code,
    )


def _statuses(spec: int | str | list[int | str] | None) -> frozenset[int] | None:
    if spec is None:
        return None
    items = spec if isinstance(spec, list) else [spec]
    return frozenset(s for item in items for s in parse_status(item))


def _sources(spec: SourceModel | list[SourceModel] | None) -> tuple[Source, ...]:
    if spec is None:
        return ()
    items = spec if isinstance(spec, list) else [spec]
    return tuple(_source(s) for s in items)


def _source(model: SourceModel) -> Source:
    if model.json_ is not None:
        return JsonSource(
            compile_pointer(model.json_),
            re.compile(model.match) if model.match is not None else None,
            model.format,
        )
    if model.body is not None:
        return BodySource(re.compile(model.body))
    if model.header is not None:
        return HeaderSource(
            model.header.lower(), re.compile(model.regex) if model.regex is not None else None
        )
    assert model.literal is not None  # the schema guarantees exactly one kind
    return LiteralSource(model.literal)


def _reconcile(model: ReconcileModel) -> ReconcileRule:
    stamp: JsonBodyStamp | HeaderStamp
    if isinstance(model.stamp, HeaderStampModel):
        stamp = HeaderStamp(model.stamp.name, model.stamp.value)
    else:
        stamp = JsonBodyStamp(model.stamp.pointer, model.stamp.entry)
    lk = model.lookup
    return ReconcileRule(
        name=model.name,
        method=model.method,
        path=re.compile(model.path),
        stamp=stamp,
        lookup=Lookup(
            method=lk.method,
            path=lk.path,
            query=tuple(lk.query.items()),
            found_pointer=lk.found_when_nonempty,
            attempts=lk.attempts,
            interval_s=lk.interval_s,
            found_tokens=compile_pointer(lk.found_when_nonempty),
        ),
        committed_status=model.committed_status,
    )
