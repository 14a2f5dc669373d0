"""The content of validation.json, shared by the validate step and its HTML report."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProblemEntry(BaseModel):
    file: str
    line: int | None
    message: str


class Counts(BaseModel):
    samples: int
    images: int = Field(..., description="Distinct image URLs")
    classes: int
    classes_present: int = Field(..., description="Classes that are the primary label of at least one sample")
    multi_label_samples: int
    errors: int
    warnings: int
    modes: dict[str, int] = Field(default_factory=dict, description="Decoded images per PIL mode")


class ValidationResult(BaseModel):
    """The content of validation.json."""

    ok: bool
    dataset_dir: str
    settings: dict[str, float | int]
    counts: Counts
    per_class: dict[str, int] = Field(..., description="Images per class (primary label), in label order")
    errors: list[ProblemEntry]
    warnings: list[ProblemEntry]
