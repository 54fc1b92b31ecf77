"""T-Patcher editing of Hugging Face models."""

from .adapters import SUPPORTED_FAMILIES, FamilyAdapter, find_adapter
from .editor import Editor
from .types import EditError, EditorConfig, EditRequest, EditResult

__all__ = ["Editor", "EditorConfig", "EditRequest", "EditResult", "EditError", "FamilyAdapter", "find_adapter",
           "SUPPORTED_FAMILIES"]
