from fedlm.data.datamodule import FinancialPhraseBank, RecordFiles, TaskData
from fedlm.data.records import Record
from fedlm.data.sources import DataError
from fedlm.data.wordnet import WordNet

__all__ = ["DataError", "FinancialPhraseBank", "Record", "RecordFiles", "TaskData", "WordNet"]
