from fedlm.data.datamodule import FinancialPhraseBank, TextClassificationData, TextClassificationFiles
from fedlm.data.sources import DataError, Example

__all__ = ["DataError", "Example", "FinancialPhraseBank", "TextClassificationData", "TextClassificationFiles"]
