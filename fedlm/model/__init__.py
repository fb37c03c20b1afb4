from fedlm.model.backbone import Backbone, BackboneNotFoundError, load_backbone
from fedlm.model.module import CheckpointMismatchError, PTuningModule
from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig
from fedlm.model.template import PromptTemplate, TemplateError

__all__ = [
    "Backbone",
    "BackboneNotFoundError",
    "CheckpointMismatchError",
    "PTuningModule",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTemplate",
    "TemplateError",
    "load_backbone",
]
