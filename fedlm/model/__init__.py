from fedlm.model.backbone import Backbone, BackboneNotFoundError, load_backbone
from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig
from fedlm.model.prompted import PromptedLM
from fedlm.model.template import PromptTemplate, TemplateError

__all__ = [
    "Backbone",
    "BackboneNotFoundError",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTemplate",
    "PromptedLM",
    "TemplateError",
    "load_backbone",
]
