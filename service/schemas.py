"""Request and response bodies of the HTTP API (DESIGN.md, Contract 3), as pydantic v2 models.

The request model is made per served bundle (`classify_request_model`), so the OpenAPI schema at
/docs states every limit the server enforces: the threshold's ceiling ln(number of labels), the
most texts per request, whether the model takes a text_pair at all.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr, StringConstraints, ValidationInfo, create_model, field_validator

MAX_BUDGET_MS = 60_000.0


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


class ClassifyRequestBase(BaseModel):
    model_config = ConfigDict(
        extra="forbid",  # a misspelt option ("threshold") must not be silently ignored
        json_schema_extra={
            "examples": [
                {"text": "a gripping, beautifully shot film"},
                {"text": ["loved it", "a waste of two hours"], "entropy_threshold": 0.2, "latency_budget_ms": 50},
            ]
        },
    )

    @property
    def texts(self) -> list[str]:
        return _as_list(self.text)  # type: ignore[attr-defined]

    @property
    def text_pairs(self) -> list[str] | None:
        if "text_pair" not in type(self).model_fields:  # a single-input model's (getattr's miss costs an exception each request)
            return None
        pair = self.text_pair  # type: ignore[attr-defined]
        return None if pair is None else _as_list(pair)


def _pairs_valid(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
    """One pair per text, in the same form. (Each text is checked by its type: the pattern rejects
    blank ones; lone surrogate escapes, which JSON admits, never get this far: pydantic's JSON
    parser refuses them, and the server answers 400.)"""
    text = info.data.get("text")  # absent when text itself failed: that error is reported already
    if value is None or text is None:
        return value
    if isinstance(text, str) != isinstance(value, str):
        raise ValueError("text_pair must have the same form as text (both strings or both lists)")
    if len(_as_list(text)) != len(_as_list(value)):
        raise ValueError(f"text_pair has {len(_as_list(value))} items but text has {len(_as_list(text))}")
    return value


def classify_request_model(max_threshold: float, max_items: int, pair_input: bool) -> type[ClassifyRequestBase]:
    """The POST /classify body for a bundle with this entropy ceiling, item limit and input kind."""
    text = Annotated[StrictStr, StringConstraints(pattern=r"\S")]  # not empty, not whitespace only: stated in the schema
    texts = text | Annotated[list[text], Field(min_length=1, max_length=max_items)]
    fields: dict[str, Any] = {
        "text": (texts, Field(description=f"one text, or a list of at most {max_items} texts classified independently")),
        "entropy_threshold": (StrictFloat | None, Field(
            None, ge=0.0, le=max_threshold, allow_inf_nan=False,
            description="exit at the first layer whose entropy (nats) is strictly below this; 0 = full depth; "
            f"at most ln(number of labels) = {max_threshold:.6f}; default: the bundle's calibrated threshold",
        )),
        "latency_budget_ms": (StrictFloat | None, Field(
            None, gt=0.0, le=MAX_BUDGET_MS, allow_inf_nan=False,
            description="server-side budget from arrival; a row stops before the layer predicted to overrun it "
            "(it always gets at least exit 1) and is flagged budget_exhausted; it goes ahead of the queue, and a "
            "request whose predicted wait (the budgeted rows ahead of it, the step in progress) exceeds its budget gets 503",
        )),
    }
    validators = {}
    if pair_input:  # a single-input model has no text_pair field at all: sending one is a 422
        fields["text_pair"] = (texts | None, Field(
            None, description="second segment for pair tasks (NLI, paraphrase): one per text, in the same form as text"))
        validators["pairs_valid"] = field_validator("text_pair")(_pairs_valid)
    return create_model("ClassifyRequest", __base__=ClassifyRequestBase, __validators__=validators, **fields)


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
