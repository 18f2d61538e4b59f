"""Pydantic models of the policy YAML: the file format, validated strictly (``extra="forbid"``).

These models only describe and check the file; :mod:`revive.classify.loader` compiles them into
the frozen dataclasses of :mod:`revive.classify.model`. Regexes and JSON pointers are checked
here so that the error location names the exact rule and field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from revive.classify.model import KEY_PLACEHOLDER, FailureClass
from revive.classify.pointer import compile_pointer


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regex {value!r}: {exc}") from exc
    return value


def _check_pointer(value: str) -> str:
    compile_pointer(value)  # ValueError carries the reason
    return value


def _check_status(value: int | str) -> int | str:
    parse_status(value)
    return value


Regex = Annotated[str, AfterValidator(_check_regex)]
Pointer = Annotated[str, AfterValidator(_check_pointer)]
StatusItem = Annotated[int | str, AfterValidator(_check_status)]
JsonScalar = str | int | float | bool | None
RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
Method = Annotated[str, Field(pattern=r"^[A-Z]+$")]


def parse_status(value: int | str) -> range:
    """``404`` -> one status; ``"400-499"`` -> inclusive range; ``"4xx"`` -> 400..499."""
    if isinstance(value, bool):
        raise ValueError("status must be a number, 'NNN-NNN' or 'Nxx'")
    if isinstance(value, int):
        lo = hi = value
    else:
        text = value.strip().lower()
        if m := re.fullmatch(r"([1-5])xx", text):
            lo, hi = int(m.group(1)) * 100, int(m.group(1)) * 100 + 99
        elif m := re.fullmatch(r"(\d{3})\s*-\s*(\d{3})", text):
            lo, hi = int(m.group(1)), int(m.group(2))
        elif re.fullmatch(r"\d{3}", text):
            lo = hi = int(text)
        else:
            raise ValueError(f"bad status {value!r}: use a number, 'NNN-NNN' or 'Nxx'")
    if not (100 <= lo <= hi <= 599):
        raise ValueError(f"bad status {value!r}: must lie within 100-599, low before high")
    return range(lo, hi + 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WhenModel(_Strict):
    """Conditions of a rule; all given ones must hold. An empty ``when`` matches everything."""

    status: StatusItem | list[StatusItem] | None = None
    header: dict[str, Regex] = Field(default_factory=dict)  # name -> regex searched in its value
    json_: dict[Pointer, JsonScalar | list[JsonScalar]] = Field(
        default_factory=dict, alias="json"
    )  # pointer -> value, or any of a list of values
    json_regex: dict[Pointer, Regex] = Field(default_factory=dict)
    body: Regex | None = None  # searched in the body text
    code_in: list[str | int] | None = None  # the rule's extracted code is one of these


class SourceModel(_Strict):
    """Where a provider code (or message) comes from; exactly one of json/body/header/literal."""

    json_: Pointer | None = Field(default=None, alias="json")
    match: Regex | None = None  # with json: keep the value only if it matches (group 1 if any)
    format: str | None = None  # with json: "{}" replaced by the value, e.g. "AADSTS{}"
    body: Regex | None = None
    header: str | None = None
    regex: Regex | None = None  # with header
    literal: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SourceModel:
        kinds = [k for k in ("json_", "body", "header", "literal") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of json, body, header, literal")
        if (self.match is not None or self.format is not None) and self.json_ is None:
            raise ValueError("match and format apply to json sources only")
        if self.regex is not None and self.header is None:
            raise ValueError("regex applies to header sources only (use body: for the body)")
        if self.format is not None and "{}" not in self.format:
            raise ValueError("format must contain '{}'")
        return self


Sources = SourceModel | list[SourceModel]


class RuleModel(_Strict):
    """One classification rule: conditions, the class it yields and where its code comes from."""

    id: RuleId
    when: WhenModel = Field(default_factory=WhenModel)
    class_: FailureClass = Field(alias="class")
    code: Sources | None = None
    note: str | None = None  # why the rule exists (source, reasoning); not used at runtime


class ClassifyModel(_Strict):
    api_call: list[RuleModel] = Field(default_factory=list)
    token_refresh: list[RuleModel] = Field(default_factory=list)


class RetryModel(_Strict):
    attempts: int = Field(default=3, ge=1, le=20)
    base_backoff_s: float = Field(default=0.2, ge=0)
    max_backoff_s: float = Field(default=5.0, ge=0)
    honour_retry_after: bool = True
    max_retry_after_s: float = Field(default=30.0, ge=0)


class ExceptionModel(_Strict):
    method: Method
    path: Regex


class MutatingModel(_Strict):
    methods: list[Method] = Field(default_factory=lambda: ["POST", "PUT", "PATCH", "DELETE"])
    except_: list[ExceptionModel] = Field(default_factory=list, alias="except")


class ProbeModel(_Strict):
    method: Method = "GET"
    path: str = Field(pattern=r"^/")
    expect_status: list[int] = Field(default_factory=lambda: [200], min_length=1)


class JsonBodyStampModel(_Strict):
    kind: Literal["json_body"]
    pointer: Pointer  # the array to append to
    entry: Any

    @model_validator(mode="after")
    def _has_key(self) -> JsonBodyStampModel:
        if KEY_PLACEHOLDER not in repr(self.entry):
            raise ValueError(f"stamp entry must contain {KEY_PLACEHOLDER}")
        return self


class HeaderStampModel(_Strict):
    kind: Literal["header"]
    name: str = Field(pattern=r"^[A-Za-z0-9-]+$")
    value: str = KEY_PLACEHOLDER

    @model_validator(mode="after")
    def _has_key(self) -> HeaderStampModel:
        if KEY_PLACEHOLDER not in self.value:
            raise ValueError(f"stamp value must contain {KEY_PLACEHOLDER}")
        return self


class LookupModel(_Strict):
    method: Method = "GET"
    path: str = Field(pattern=r"^/")
    query: dict[str, str] = Field(default_factory=dict)
    found_when_nonempty: Pointer
    attempts: int = Field(default=3, ge=1, le=20)
    interval_s: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _has_key(self) -> LookupModel:
        if KEY_PLACEHOLDER not in self.path and not any(
            KEY_PLACEHOLDER in v for v in self.query.values()
        ):
            raise ValueError(f"lookup path or query must contain {KEY_PLACEHOLDER}")
        return self


class ReconcileModel(_Strict):
    name: RuleId
    method: Method
    path: Regex
    stamp: JsonBodyStampModel | HeaderStampModel = Field(discriminator="kind")
    lookup: LookupModel
    committed_status: int = Field(default=200, ge=200, le=299)


class PolicyModel(_Strict):
    """A whole ``policies/<provider>.yaml`` file."""

    description: str | None = None
    retry: RetryModel = Field(default_factory=RetryModel)
    mutating: MutatingModel = Field(default_factory=MutatingModel)
    idempotency_header: str | None = None
    inspect_success_bodies: bool = False
    refresh_token_rotates: bool = False
    probe: ProbeModel | None = None
    reconcile: list[ReconcileModel] = Field(default_factory=list)
    code: Sources = Field(default_factory=list)  # default provider_code sources, in order
    message: Sources = Field(default_factory=list)  # human message sources, in order
    classify: ClassifyModel = Field(default_factory=ClassifyModel)

    @model_validator(mode="after")
    def _unique_ids(self) -> PolicyModel:
        for phase in ("api_call", "token_refresh"):
            seen: set[str] = set()
            for rule in getattr(self.classify, phase):
                if rule.id in seen:
                    raise ValueError(f"classify.{phase}: duplicate rule id {rule.id!r}")
                seen.add(rule.id)
        names = [r.name for r in self.reconcile]
        if len(names) != len(set(names)):
            raise ValueError("reconcile: duplicate name")
        return self
