"""Data layer: dataset_info registry, readers, chat templates, tokenisation + masking, collator, demo corpus."""

from dataflex.data.collator import DataCollatorForCausalLM
from dataflex.data.dataset_info import (
    DatasetAttr,
    DatasetInfo,
    load_dataset_info,
    parse_dataset_names,
    resolve_datasets,
)
from dataflex.data.demo import demo_texts, make_demo_data
from dataflex.data.processing import (
    DATA_CODE_VERSION,
    IGNORE_INDEX,
    build_dataset,
    build_dataset_cached,
    dataset_fingerprint,
    dataset_metadata,
    domain_names,
    processing_fingerprint,
    split_validation,
    tokenizer_fingerprint,
)
from dataflex.data.readers import read_rows, sample_rows, source_hashes
from dataflex.data.templates import TEMPLATES, Template, get_template, register_template

__all__ = [
    "DATA_CODE_VERSION",
    "IGNORE_INDEX",
    "TEMPLATES",
    "DataCollatorForCausalLM",
    "DatasetAttr",
    "DatasetInfo",
    "Template",
    "build_dataset",
    "build_dataset_cached",
    "dataset_fingerprint",
    "dataset_metadata",
    "demo_texts",
    "domain_names",
    "get_template",
    "load_dataset_info",
    "make_demo_data",
    "parse_dataset_names",
    "processing_fingerprint",
    "read_rows",
    "register_template",
    "resolve_datasets",
    "sample_rows",
    "source_hashes",
    "split_validation",
    "tokenizer_fingerprint",
]
