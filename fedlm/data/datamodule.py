"""LightningDataModules for text classification with the model's prompt template.

The module owns the tokenizer and template (they depend on the backbone), so a datamodule holds raw
examples until the model connects its template in ``setup``; each split is then encoded once.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from fedlm.data.sources import (
    Agreement,
    DataError,
    Example,
    phrasebank_file,
    read_phrasebank,
    read_table,
    split_examples,
)
from fedlm.model.template import EncodedExample, PromptTemplate, TemplateError

SPLITS_FOR_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class EncodedDataset(Dataset):
    def __init__(self, examples: list[EncodedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.examples[index]


class TextClassificationData(L.LightningDataModule):
    """Base class: subclasses say where the examples come from (``load_splits``)."""

    def __init__(self, batch_size: int = 16, eval_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"data.batch_size={batch_size} must be positive.")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, list[Example]] = {}
        self.template: PromptTemplate | None = None
        self._encoded: dict[str, EncodedDataset] = {}

    def load_splits(self) -> dict[str, list[Example]]:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if not self.splits:
            self.splits = self.load_splits()
        for split in SPLITS_FOR_STAGE.get(stage, ()):
            if not self.splits.get(split):
                raise DataError(f"the {split!r} split is empty ({type(self).__name__}); check the data path and sizes.")

    def connect(self, template: PromptTemplate) -> None:
        """Called by the model: encode with its tokenizer and template."""
        if template is not self.template:
            self.template, self._encoded = template, {}

    def encoded(self, split: str) -> EncodedDataset:
        if self.template is None:
            raise RuntimeError("the datamodule is not connected to a model template; call connect(model.template).")
        if split not in self._encoded:
            examples = []
            for example in self.splits[split]:
                try:
                    examples.append(self.template.encode(example.text, example.label))
                except TemplateError as err:
                    raise DataError(f"{example.origin}: {err}") from None
            self._encoded[split] = EncodedDataset(examples)
        return self._encoded[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        assert self.template is not None
        return DataLoader(
            self.encoded(split),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=self.template.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class FinancialPhraseBank(TextClassificationData):
    """Financial PhraseBank v1.0, split by NeMo's protocol (all-agree: 1811/226/227).

    Args:
        path: the ``FinancialPhraseBank-v1.0`` folder; defaults to the ``FEDLM_FPB_DIR`` environment variable.
        agreement: which file: sentences with at least 50, 66, 75 percent or all annotators agreeing.
    """

    def __init__(
        self,
        path: str | None = None,
        agreement: Agreement = "all",
        train_fraction: float = 0.8,
        split_seed: int = 1234,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.path, self.agreement = path, agreement
        self.train_fraction, self.split_seed = train_fraction, split_seed

    def load_splits(self) -> dict[str, list[Example]]:
        examples = read_phrasebank(phrasebank_file(self.path, self.agreement))
        return split_examples(examples, self.train_fraction, self.split_seed)


class TextClassificationFiles(TextClassificationData):
    """Your own task from ``.jsonl`` or ``.csv`` files.

    Give ``val_file`` and ``test_file`` both, or neither: then ``train_file`` is split like Financial
    PhraseBank (``train_fraction`` for training, the rest halved into val and test). Labels must be keys of
    ``model.label_words``.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        train_fraction: float = 0.8,
        split_seed: int = 1234,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if (val_file is None) != (test_file is None):
            raise DataError("give data.val_file and data.test_file both, or neither (then train_file is split).")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.text_field, self.label_field = text_field, label_field
        self.train_fraction, self.split_seed = train_fraction, split_seed

    def load_splits(self) -> dict[str, list[Example]]:
        read = lambda file: read_table(Path(file).expanduser(), self.text_field, self.label_field)  # noqa: E731
        if self.files["val"] is None:
            return split_examples(read(self.files["train"]), self.train_fraction, self.split_seed)
        return {split: read(file) for split, file in self.files.items()}
