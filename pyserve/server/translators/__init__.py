"""The translators, one per task, registered once: the only place the server reads a model's task.

    translator = translators.for_model(model)
    request = await translator.infer_request(model, tensors, parameters, caller)

A new family adds its task's translator here (and an engine); no front-end changes.
"""

from .base import Caller, Outcome, TensorSignature, Translator, Unsupported
from .embedding import EmbeddingTranslator
from .image import ImageTranslator
from .tensor import TensorTranslator
from .text import TextTranslator

_BY_TASK: dict[str, Translator] = {}


def register(translator: Translator) -> None:
    """Serve `translator.task` through `translator` (a later one for the same task replaces it)."""
    _BY_TASK[translator.task] = translator


for _translator in (TextTranslator(), ImageTranslator(), TensorTranslator(), EmbeddingTranslator()):
    register(_translator)


def for_model(model) -> Translator:
    """The translator of a served model's task; a task with none serves no protocol at all."""
    translator = _BY_TASK.get(model.task)
    if translator is None:
        return Translator()  # every operation answers Unsupported
    return translator


def text_model(model):
    """`model` if it serves the text routes, else the one clear error."""
    if not for_model(model).text:
        raise Unsupported(model, "text completions or chat")
    return model


__all__ = ["Caller", "Outcome", "TensorSignature", "Translator", "Unsupported", "for_model", "register",
           "text_model"]
