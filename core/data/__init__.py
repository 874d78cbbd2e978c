"""Datasets: formats, validation, media decoding, splits and few-shot sampling."""
from core.data.errors import DatasetError, Problem
from core.data.limits import DEFAULT_LIMITS, Limits
from core.data.reader import QA, Dataset, Item, read_dataset
from core.data.sampling import few_shot

__all__ = ["DEFAULT_LIMITS", "QA", "Dataset", "DatasetError", "Item", "Limits", "Problem", "few_shot", "read_dataset"]
