"""Request and response bodies of the HTTP API (DESIGN.md, Contract 3), as pydantic v2 models.

Everything that can be checked without the model is checked here, so the OpenAPI schema at /docs
states it; the limits that depend on the bundle or on settings (threshold <= ln(num_labels),
max_items) are checked by the route, with the same error shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr, ValidationInfo, field_validator

MAX_BUDGET_MS = 60_000.0


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",  # a misspelt option ("threshold") must not be silently ignored
        json_schema_extra={
            "examples": [
                {"text": "a gripping, beautifully shot film"},
                {"text": ["loved it", "a waste of two hours"], "entropy_threshold": 0.2, "latency_budget_ms": 50},
            ]
        },
    )

    text: StrictStr | list[StrictStr] = Field(description="one text, or a list of texts classified independently")
    text_pair: StrictStr | list[StrictStr] | None = Field(
        None, description="second segment for pair tasks (NLI, paraphrase): one per text, in the same form as text"
    )
    entropy_threshold: StrictFloat | None = Field(
        None, ge=0.0, allow_inf_nan=False,
        description="exit at the first layer whose entropy (nats) is strictly below this; 0 = full depth; "
        "at most ln(number of labels); default: the bundle's calibrated threshold",
    )
    latency_budget_ms: StrictFloat | None = Field(
        None, gt=0.0, le=MAX_BUDGET_MS, allow_inf_nan=False,
        description="server-side budget from arrival; a row stops before the layer predicted to overrun it "
        "(it always gets at least exit 1) and is flagged budget_exhausted",
    )

    @field_validator("text", "text_pair")
    @classmethod
    def _no_blank_text(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        texts = _as_list(value)
        if not texts:
            raise ValueError("must hold at least one text")
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise ValueError("empty or whitespace only" if isinstance(value, str) else f"items {blank} are empty or whitespace only")
        return value

    @field_validator("text_pair")
    @classmethod
    def _pairs_match_texts(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        text = info.data.get("text")  # absent when text itself failed: that error is reported already
        if value is None or text is None:
            return value
        if isinstance(text, str) != isinstance(value, str):
            raise ValueError("text_pair must have the same form as text (both strings or both lists)")
        if len(_as_list(text)) != len(_as_list(value)):
            raise ValueError(f"text_pair has {len(_as_list(value))} items but text has {len(_as_list(text))}")
        return value

    @property
    def texts(self) -> list[str]:
        return _as_list(self.text)

    @property
    def text_pairs(self) -> list[str] | None:
        return None if self.text_pair is None else _as_list(self.text_pair)


class ItemResult(BaseModel):
    label: str = Field(description="the most probable label at the exit the item left from")
    probabilities: dict[str, float] = Field(description="probability of every label at that exit (they sum to 1)")
    exit_layer: int = Field(description="1-based exit the answer comes from")
    layers_used: int = Field(description="encoder layers run for this item")
    entropy: float = Field(description="entropy (nats) of the answering exit")
    budget_exhausted: bool = Field(description="the latency budget stopped the item before it was confident")
    truncated: bool = Field(description="the input was longer than the model's max length and was cut")
    latency_ms: float = Field(description="server-side time from the request's arrival to this item's answer")


class ClassifyResponse(BaseModel):
    results: list[ItemResult] = Field(description="one per text, in request order")
    latency_ms: float = Field(description="server-side time for the whole request")


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_request, too_many_items, overloaded")
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody
